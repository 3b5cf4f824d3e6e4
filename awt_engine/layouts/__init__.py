"""Data set layouts: the readers behind :func:`awt_engine.labelled.load_labelled`.

Each layout (a :class:`~awt_engine.layouts.base.Layout` registered into
:data:`~awt_engine.layouts.base.LAYOUTS`, one module each) finds a data set's image paths
and label indices and its class names in label order; none opens an image. Where a
registry data set's files live is data in :mod:`awt_engine.layouts.catalog`. A new layout
is a new module here with a ``@register_layout`` class, imported below. Layouts, tried in
this order:

1. **CoOp split files** (registry data sets that have one). CoOp's benchmark folders keep
   ``split_zhou_<Name>.json`` = ``{"train" | "val" | "test": [[impath, label, classname],
   ...]}`` in the data set's folder, with ``impath`` relative to its image folder:

   ============== ================ ===================================== =====================
   data set       folder           split file                            image folder
   ============== ================ ===================================== =====================
   dtd            dtd              split_zhou_DescribableTextures.json   images
   eurosat        eurosat          split_zhou_EuroSAT.json               2750
   oxford_pets    oxford_pets      split_zhou_OxfordPets.json            images
   oxford_flowers oxford_flowers   split_zhou_OxfordFlowers.json         jpg
   food101        food-101         split_zhou_Food101.json               images
   caltech101     caltech-101      split_zhou_Caltech101.json            101_ObjectCategories
   stanford_cars  stanford_cars    split_zhou_StanfordCars.json          (the folder itself)
   sun397         sun397           split_zhou_SUN397.json                SUN397
   ucf101         ucf101           split_zhou_UCF101.json                UCF-101-midframes
   ============== ================ ===================================== =====================

   An ``impath`` not under the image folder is looked for under the data set folder, the
   given root and (once, for the first such path) folders up to three levels below.

2. **FGVC-Aircraft lists**: ``images_variant_<split>.txt`` (lines ``<image id> <variant
   name>``), images ``images/<id>.jpg``, class order ``variants.txt`` when the registry
   has none; in ``fgvc_aircraft/`` (CoOp), ``fgvc-aircraft-2013b/data/`` or ``data/``.

4. **Folders of class folders** (ImageFolder; the fallback, asked last): every immediate subfolder holding images is
   a class, its images (and videos) found recursively by extension
   (:data:`IMAGE_EXTENSIONS`, :data:`~awt_engine.inputs.VIDEO_EXTENSIONS`). The
   folder used is, in order: a data set's known image folder (``imagenet/images``,
   ``imagenetv2/imagenetv2-matched-frequency-format-val``, ``imagenet-sketch/images`` or
   ``sketch``, ``imagenet-adversarial/imagenet-a``, ``imagenet-rendition/imagenet-r``,
   ``dtd/images``, ``eurosat/2750``, ``food-101/images``,
   ``caltech-101/101_ObjectCategories``, ``ucf101/UCF-101-midframes``, then UCF101's
   videos ``UCF-101/`` (the download: one folder of ``.avi`` clips per class),
   ``CUB_200_2011/images``, ``256_ObjectCategories``), the data set's folder, or the root.
   A folder whose only image-holding subfolder is ``images/`` is entered; a folder whose
   image-holding subfolders are all split names (train/val/test...) is entered at
   ``split`` (``"test"`` falls back to ``val/`` when there is no ``test/``: ImageNet
   evaluates on its validation set).
   A class folder (or a folder inside one) that cannot be listed (permission denied) is a
   :class:`DatasetLayoutError` naming it, not skipped: without its images the
   evaluation would silently measure a different data set.

Labels of class folders:

* **WordNet ids** (``n01440764``...; ImageNet, -Sketch, -A, -R): when there is one
  folder per class, the label is the folder's position in sorted order, which is the
  standard label order (ImageNet-1k's, and the ascending-ImageNet-index order the registry
  uses for the 200 ImageNet-A/R classes). With only some of the 1000 ImageNet wnid
  folders present, a CoOp ``classnames.txt`` (``<wnid> <name>`` per line, all 1000 wnids)
  next to the images supplies the order; partial ImageNet-A/R copies are refused.
* **Numbers** (ImageNetV2's ``0``..``999``): the number is the label (0-based when a
  ``0`` folder exists or for ImageNetV2; 1-based when the highest label's number is
  present instead, as in some Flowers-102 copies).
* **Names**: matched to the class names leniently (case, ``_``/``-``/spaces, then all
  punctuation ignored; a ``001.`` numeric prefix as in CUB and Caltech-256 dropped), plus
  the renamings CoOp applies (EuroSAT ``AnnualCrop`` -> "annual crop land" ...,
  Caltech-101 ``Faces`` -> "face" ...). Names that match nothing are an error listing
  them with the closest class names. Split-file class names are matched the same way, and
  the names win over the file's integer labels when the two disagree.

With no data set, the class names are the folder names (sorted; numerically when all are
numbers), or the explicit ``classes`` the folders are matched to.

3. **Own descriptions** (:mod:`~awt_engine.layouts.described`, asked before 4.): a name the
registry does not know but a description cache has (``cache import``,
``describe --name``) reads the root as folders of class folders, matched to the cache's
classes by name (case, ``_``/``-``/spaces, then punctuation ignored); see
:mod:`awt_engine.layouts.described`.

Not read: raw ImageNet validation files without wnid folders, Oxford Pets / Flowers /
Stanford Cars / SUN397 without their CoOp split files (their images are not in class
folders), the official Food-101 / CUB / UCF101 list files (their folders are read
instead, all images of every split).
"""

# The order of these imports is the order of LAYOUTS (the class-folder fallback stays last).
from awt_engine.layouts import coop, fgvc, described, class_folders  # noqa: F401, I001
from awt_engine.layouts.base import (
    LAYOUTS,
    DatasetFiles,
    DatasetLayoutError,
    LabelledData,
    LabelledItem,
    Layout,
    LayoutRequest,
    find_layout,
    register_layout,
)

__all__ = [
    "LAYOUTS",
    "DatasetFiles",
    "DatasetLayoutError",
    "LabelledData",
    "LabelledItem",
    "Layout",
    "LayoutRequest",
    "find_layout",
    "register_layout",
]
