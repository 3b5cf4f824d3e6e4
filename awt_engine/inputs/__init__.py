"""Inputs: everything between what a user names and the views a model sees, in the
manner of ``torchvision.io``. One public surface over modules of one job each:

============  ================================================================
module        job
============  ================================================================
``base``      records and limits: ``DecodedImage``, ``EncodedImage``, errors
``files``     finding files: paths, folders, globs (remote prefixes: Ray)
``pil``       decoding one image file with Pillow (EXIF, huge-image reduction)
``arrays``    in-memory inputs: PIL images, numpy arrays, torch tensors
``frames``    a video's sampled frames and how many fit the pixel budget
``av_stream`` one video stream through PyAV (lazily imported)
``video``     decoding a video's sampled frames by seeking
``decode``    the budgeted decode scheduler (thread pool, input order)
``views``     view 0 and the seeded random crops of an image or a video
``batches``   the one batch function, ``view_batches``, and training's decode cache
============  ================================================================

Imports run down this table only (``base`` imports nothing of the package). Every
caller that needs views of inputs (classify, eval, explain, training, Ray) takes them
from :func:`view_batches`; each item carries its input index from start to end
(``ViewBatch.indices``, ``Failure.index``).

Public names load lazily (``__getattr__``, as ``awt_engine`` does), so importing one
submodule (``awt_engine.inputs.files``, which needs no torch) costs only that one.
"""

import importlib

_EXPORTS = {
    "DEFAULT_FRAMES": "awt_engine.inputs.base",
    "DEFAULT_MAX_PIXELS": "awt_engine.inputs.base",
    "DEFAULT_PIXEL_BUDGET": "awt_engine.inputs.base",
    "DecodedCache": "awt_engine.inputs.batches",
    "DecodedImage": "awt_engine.inputs.base",
    "EncodedImage": "awt_engine.inputs.base",
    "Failure": "awt_engine.inputs.batches",
    "FoundImages": "awt_engine.inputs.files",
    "IMAGE_EXTENSIONS": "awt_engine.inputs.base",
    "ImageDecodeError": "awt_engine.inputs.base",
    "OpenedVideo": "awt_engine.inputs.video",
    "REDUCE_MARGIN": "awt_engine.inputs.base",
    "UnreadableFolder": "awt_engine.inputs.files",
    "VIDEO_EXTENSIONS": "awt_engine.inputs.base",
    "VideoFrames": "awt_engine.inputs.frames",
    "ViewBatch": "awt_engine.inputs.batches",
    "ViewConfig": "awt_engine.inputs.views",
    "as_rgb_image": "awt_engine.inputs.arrays",
    "check_frame_count": "awt_engine.inputs.frames",
    "crop_boxes": "awt_engine.inputs.views",
    "decode_frames": "awt_engine.inputs.video",
    "decode_images": "awt_engine.inputs.decode",
    "discover_images": "awt_engine.inputs.files",
    "find_images": "awt_engine.inputs.files",
    "image_to_tensor": "awt_engine.inputs.views",
    "input_extensions": "awt_engine.inputs.files",
    "input_label": "awt_engine.inputs.base",
    "is_remote": "awt_engine.inputs.files",
    "is_video_path": "awt_engine.inputs.base",
    "load_image": "awt_engine.inputs.pil",
    "make_video_views": "awt_engine.inputs.views",
    "make_views": "awt_engine.inputs.views",
    "open_video": "awt_engine.inputs.video",
    "sample_times": "awt_engine.inputs.frames",
    "video_view_boxes": "awt_engine.inputs.views",
    "video_view_seed": "awt_engine.inputs.views",
    "view_batches": "awt_engine.inputs.batches",
    "view_boxes": "awt_engine.inputs.views",
    "view_seed": "awt_engine.inputs.views",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'awt_engine.inputs' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_EXPORTS)


__all__ = sorted(_EXPORTS)
