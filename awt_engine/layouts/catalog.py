"""Where each registry data set's files live: its folder names, split file, image folders.

Data, not code: a layout module reads the :class:`~awt_engine.layouts.base.DatasetFiles`
of the requested data set and never tests a data set's name. A new data set whose files
follow an existing layout needs only its row here (and its registry entry).
"""

from __future__ import annotations

from pathlib import Path

from awt_engine.layouts.base import DatasetFiles

__all__ = ["DATASET_FILES", "candidate_bases", "files_for", "layout_hint"]

_EUROSAT_SYNONYMS = (
    # Folder names of the EuroSAT download (2750/<name>/) ...
    ("AnnualCrop", "annual crop land"),
    ("Forest", "forest"),
    ("HerbaceousVegetation", "brushland or shrubland"),
    ("Highway", "highway or road"),
    ("Industrial", "industrial buildings or commercial buildings"),
    ("Pasture", "pasture land"),
    ("PermanentCrop", "permanent crop land"),
    ("Residential", "residential buildings or homes or apartments"),
    ("River", "river"),
    ("SeaLake", "lake or sea"),
    # ... and CoOp's names for them (in split_zhou_EuroSAT.json).
    ("Annual Crop Land", "annual crop land"),
    ("Herbaceous Vegetation Land", "brushland or shrubland"),
    ("Highway or Road", "highway or road"),
    ("Industrial Buildings", "industrial buildings or commercial buildings"),
    ("Pasture Land", "pasture land"),
    ("Permanent Crop Land", "permanent crop land"),
    ("Residential Buildings", "residential buildings or homes or apartments"),
    ("Sea or Lake", "lake or sea"),
)

DATASET_FILES: dict[str, DatasetFiles] = {
    "dtd": DatasetFiles(
        folders=("dtd",),
        split_file="split_zhou_DescribableTextures.json",
        split_image_dir="images",
        image_dirs=("images",),
    ),
    "eurosat": DatasetFiles(
        folders=("eurosat", "EuroSAT"),
        split_file="split_zhou_EuroSAT.json",
        split_image_dir="2750",
        image_dirs=("2750",),
        synonyms=_EUROSAT_SYNONYMS,
    ),
    "oxford_pets": DatasetFiles(
        folders=("oxford_pets",),
        split_file="split_zhou_OxfordPets.json",
        split_image_dir="images",
    ),
    "oxford_flowers": DatasetFiles(
        folders=("oxford_flowers",),
        split_file="split_zhou_OxfordFlowers.json",
        split_image_dir="jpg",
    ),
    "fgvc_aircraft": DatasetFiles(
        folders=("fgvc_aircraft", "fgvc-aircraft-2013b/data", "fgvc-aircraft-2013b", "data"),
        list_glob="images_variant_*.txt",
    ),
    "food101": DatasetFiles(
        folders=("food-101", "food101"),
        split_file="split_zhou_Food101.json",
        split_image_dir="images",
        image_dirs=("images",),
    ),
    "caltech101": DatasetFiles(
        folders=("caltech-101", "caltech101"),
        split_file="split_zhou_Caltech101.json",
        split_image_dir="101_ObjectCategories",
        image_dirs=("101_ObjectCategories",),
        synonyms=(
            ("airplanes", "airplane"),
            ("Faces", "face"),
            ("Leopards", "leopard"),
            ("Motorbikes", "motorbike"),
        ),
        ignored=("BACKGROUND_Google", "Faces_easy"),
    ),
    "stanford_cars": DatasetFiles(
        folders=("stanford_cars",),
        split_file="split_zhou_StanfordCars.json",
        split_image_dir="",
    ),
    "sun397": DatasetFiles(
        folders=("sun397",),
        split_file="split_zhou_SUN397.json",
        split_image_dir="SUN397",
    ),
    "ucf101": DatasetFiles(
        folders=("ucf101", "UCF-101"),
        split_file="split_zhou_UCF101.json",
        split_image_dir="UCF-101-midframes",
        # CoOp's middle frames first; else the download's videos (UCF-101/<Class>/*.avi,
        # CamelCase folder names, which match the class names with "_" ignored)
        image_dirs=("UCF-101-midframes", "UCF-101"),
    ),
    "imagenet": DatasetFiles(folders=("imagenet",), image_dirs=("images",)),
    "imagenetv2": DatasetFiles(
        folders=("imagenetv2", "imagenet-v2"),
        image_dirs=(
            "imagenetv2-matched-frequency-format-val",
            "imagenetv2-threshold0.7-format-val",
            "imagenetv2-top-images-format-val",
        ),
        numeric_zero_based=True,
    ),
    "imagenet_sketch": DatasetFiles(
        folders=("imagenet-sketch", "imagenet_sketch"), image_dirs=("images", "sketch")
    ),
    "imagenet_a": DatasetFiles(
        folders=("imagenet-adversarial", "imagenet_a"), image_dirs=("imagenet-a",)
    ),
    "imagenet_r": DatasetFiles(
        folders=("imagenet-rendition", "imagenet_r"), image_dirs=("imagenet-r",)
    ),
    "cub": DatasetFiles(folders=("CUB_200_2011", "cub"), image_dirs=("images",)),
    "caltech256": DatasetFiles(
        folders=("caltech256", "caltech-256"), image_dirs=("256_ObjectCategories",)
    ),
}


def files_for(name: str | None) -> DatasetFiles:
    """The files of registry data set ``name``; nothing known for others (or None)."""
    return DATASET_FILES.get(name, DatasetFiles()) if name is not None else DatasetFiles()


def candidate_bases(root: Path, files: DatasetFiles) -> tuple[Path, ...]:
    """The root itself, then the data set's known folder names under it."""
    bases = [root]
    for name in files.folders:
        path = root / name
        if path.is_dir():
            bases.append(path)
    return tuple(bases)


def layout_hint(name: str, files: DatasetFiles, root: Path) -> str:
    """What the files of ``name`` were expected to look like, for an error message."""
    where = f"{str(root)!r}" + (
        f" or its subfolder {' or '.join(files.folders)}" if files.folders else ""
    )
    if files.split_file:
        return f" (for {name}, expected the CoOp split file {files.split_file} in {where}, or one folder per class)"
    if files.list_glob:
        example = files.list_glob.replace("*", "<split>")
        return f" (for {name}, expected {example} and images/ in {where})"
    if files.image_dirs:
        return f" (for {name}, expected {' or '.join(files.image_dirs)}/ with one folder per class in {where})"
    return ""
