"""Ray Data's side of the inputs: a Dataset from local paths, folders, globs and remote
prefixes (read as bytes on the workers), and the images a batch of it holds.

Decoding stays :mod:`awt_engine.inputs`' (bytes are decoded as their files would be), so
every row equals the local run's. Ray is imported by the caller (:mod:`awt_engine.distributed`).
"""

from __future__ import annotations

from pathlib import Path


def batch_inputs(batch: dict) -> list:
    """The images of a Ray Data batch: decoded arrays (``read_images``' ``image``), file
    bytes (``read_binary_files``' ``bytes``, decoded as the file would be) or paths."""
    from awt_engine.inputs import EncodedImage

    if "image" in batch:
        return list(batch["image"])
    paths = [str(p) for p in batch["path"]]
    if "bytes" in batch:  # None where a row is a local path (a union with local inputs)
        return [
            p if raw is None else EncodedImage(p, bytes(raw))
            for p, raw in zip(paths, batch["bytes"], strict=True)
        ]
    return paths


def input_dataset(ray, inputs):
    """(Dataset, unreadable folders) from a Dataset, or local paths, folders and globs and
    remote URIs (``s3://bucket/prefix/``: read as binary files by Ray, on the workers)."""
    if isinstance(inputs, ray.data.Dataset):
        return inputs, []
    if isinstance(inputs, str | Path):
        inputs = [inputs]
    from awt_engine.inputs.files import is_remote

    inputs = [str(p) for p in inputs]
    remote = [p for p in inputs if is_remote(p)]
    local = [p for p in inputs if not is_remote(p)]
    parts, unreadable = [], []
    if local:
        from awt_engine.inputs.files import find_images

        found = find_images(local)
        unreadable = found.unreadable
        parts.append(ray.data.from_items([{"path": str(p)} for p in found.images]))
    if remote:
        from awt_engine.inputs.files import input_extensions

        # videos too, as a local folder's listing has them: each gets its row (an error
        # row for now: videos are decoded from local files), none is dropped unseen
        exts = sorted(e.lstrip(".") for e in input_extensions())
        parts.append(
            ray.data.read_binary_files(
                remote, include_paths=True, file_extensions=exts
            ).select_columns(["path", "bytes"])
        )
    if len(parts) == 2:  # a union's columns must agree: local rows get no bytes
        parts[0] = parts[0].map_batches(_with_no_bytes, batch_format="pyarrow")
        parts[1] = parts[1].map_batches(_local_first, batch_format="pyarrow")
    ds = parts[0] if len(parts) == 1 else parts[0].union(parts[1])
    return ds, unreadable


def _with_no_bytes(table):
    import pyarrow as pa

    return table.append_column("bytes", pa.nulls(table.num_rows, pa.binary()))


def _local_first(table):
    return table.select(["path", "bytes"])
