"""The frozen towers as ONNX files, with the preprocessing written beside them.

:func:`export_onnx` writes, into a folder:

* ``image.onnx``: normalised pixels ``pixels`` [N, 3, R, R] float32 -> ``embeddings``
  [N, D], L2-normalised (what :meth:`~awt_engine.backbone.ClipBackbone.encode_images`
  returns);
* ``text.onnx``: token ids ``ids`` [N, L] int64 from the model's own tokenizer ->
  ``embeddings`` [N, D], L2-normalised;
* with a label set, ``classes.onnx``: image ``embeddings`` [N, D] -> ``logits`` [N, C], CLIP's
  zero-shot head (``logit_scale * cos`` to each class's normalised mean prompt embedding, the
  text tower already run over the label set's prompts);
* with ``int8``, ``image.int8.onnx`` and ``text.int8.onnx``: ONNX Runtime's dynamic int8
  quantisation of the two towers' MatMul weights (per channel; the projection stays
  float32: :func:`quantise_onnx`);
* ``preprocess.json``: the model, its fingerprint, the preprocessing (resize the shorter side
  to R with the given interpolation, centre crop R x R, RGB in [0, 1], then ``(x - mean) /
  std`` per channel, NCHW), the tokenizer's context length, the logit scale, the class names,
  and every file with its inputs and outputs.

The graphs come from ``torch.onnx.export`` (the torch.export path; needs onnxscript), with a
dynamic batch axis; :func:`ort_session` opens one in ONNX Runtime on the CPU with a given
number of threads. Everything ONNX is imported lazily (:data:`INSTALL_HINT`).

Axes: N rows (images or token sequences), R image side, L context length, D embedding width,
C classes.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

INSTALL_HINT = (
    "ONNX export and ONNX Runtime need onnx, onnxruntime and onnxscript: "
    "pip install 'awt-engine[onnx]' (or: uv sync --extra onnx)"
)
OPSET = 18  # the torch.export-based exporter's default in torch 2.6-2.13
MANIFEST = "preprocess.json"


def onnx_modules() -> tuple[Any, Any]:
    """(onnx, onnxruntime), imported lazily (ImportError with the install hint)."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx.export's torch.export path needs it)
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return onnx, onnxruntime


class _ImageTower(torch.nn.Module):
    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, R, R] -> [N, D] unit rows."""
        return F.normalize(self.clip.encode_image(pixels), dim=-1)


class _TextTower(torch.nn.Module):
    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[N, L] int64 -> [N, D] unit rows."""
        return F.normalize(self.clip.encode_text(ids), dim=-1)


class _ClassHead(torch.nn.Module):
    def __init__(self, class_embeds: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("weight", class_embeds.detach().float().clone())  # [C, D]
        self.scale = float(scale)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[N, D] unit rows -> [N, C] logits."""
        return self.scale * embeddings @ self.weight.T


def _export(module: torch.nn.Module, example: torch.Tensor, names: tuple[str, str], path: Path):
    """One graph with a dynamic first axis, written as a single file."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    with _quiet("torch.onnx"), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecations
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=[names[0]],
            output_names=[names[1]],
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Only errors from logger ``name`` (the root logger: "")."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def quantise_onnx(src: Path, dst: Path, embed_dim: int | None = None) -> None:
    """ONNX Runtime's dynamic int8 quantisation of ``src`` into ``dst``: the MatMul weights
    in int8, one scale per output column (per channel), the activations quantised per tensor
    as they come; the patch-embedding Conv, the token-embedding Gather and the projection
    into the ``embed_dim``-wide embedding (the last MatMul with a constant [*, embed_dim]
    weight) stay float32. On ViT-B-32 that cuts the mean 1 - cosine to fp32 2.6-fold against ORT's
    defaults (all ops, per tensor) at the same speed: ``benchmarks/bench_cpu.py``."""
    onnx, _ = onnx_modules()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = _projection(onnx.load(str(src)), embed_dim) if embed_dim else []
    with _quiet(""):  # its advice to pre-process the graph first goes to the root logger
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=QUANTISED_OPS,
            per_channel=True,
            nodes_to_exclude=keep,
        )


# Only weight MatMuls (ORT's dynamic mode also leaves activation x activation MatMuls alone):
# its defaults add ConvInteger for the patch embedding, whose per-tensor error was the
# largest single one measured (max 1 - cos 1.7e-3 against 2.5e-4 without it, ViT-B-32).
QUANTISED_OPS = ["MatMul"]


def _projection(graph_model, embed_dim: int) -> list[str]:
    """The name of the last MatMul whose constant weight is [*, embed_dim] (the tower's
    projection; a graph holds its nodes in topological order), as a list (empty if none)."""
    shapes = {i.name: list(i.dims) for i in graph_model.graph.initializer}
    found = [
        n.name
        for n in graph_model.graph.node
        if n.op_type == "MatMul"
        and len(n.input) == 2
        and len(shapes.get(n.input[1], [])) == 2
        and shapes[n.input[1]][1] == embed_dim
    ]
    return found[-1:]


def ort_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session on ``path``, ``threads`` intra-op threads (None: the
    cores available to this process)."""
    from awt_engine.backbone.devices import default_threads

    _, ort = onnx_modules()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = default_threads() if threads is None else int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _check_exportable(backbone) -> None:
    params = list(backbone.model.parameters())
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        raise ValueError(
            "export writes the float32 towers: load the backbone with device='cpu', "
            f"precision='fp32' (got {backbone.device}, {backbone.precision})"
        )


def export_onnx(
    backbone,
    out_dir: str | Path,
    *,
    model_name: str,
    class_names: Sequence[str] | None = None,
    class_embeds: torch.Tensor | None = None,
    int8: bool = False,
    on_file: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the towers of a float32 CPU ``backbone`` as ONNX into ``out_dir`` (see the module
    docstring); ``class_embeds`` [C, D] (unit rows) with ``class_names`` add the zero-shot
    head; ``on_file(name)`` is called as each graph is written (progress: a tower's export
    or quantisation takes seconds to a minute). Returns the manifest also written to
    ``preprocess.json``."""
    _check_exportable(backbone)
    onnx, _ = onnx_modules()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    R = backbone.preprocess.size
    ids = backbone.tokenize(["a photo of a cat.", "a photo of a dog."])  # [2, L]
    if class_embeds is not None and (
        class_names is None or len(class_names) != class_embeds.shape[0]
    ):
        raise ValueError("class_embeds [C, D] needs the C class_names")
    clip = backbone.model
    files: dict[str, dict] = {}

    def written(name: str, entry: dict) -> None:
        files[name] = entry
        if on_file is not None:
            on_file(name)

    written("image.onnx", _write(_ImageTower(clip), torch.zeros(2, 3, R, R), "pixels", out))
    written("text.onnx", _write(_TextTower(clip), ids, "ids", out))
    if class_embeds is not None:
        head = _ClassHead(class_embeds, backbone.logit_scale)
        example = torch.zeros(2, backbone.embed_dim)
        written("classes.onnx", _write(head, example, "embeddings", out, output="logits"))
    if int8:
        for name in ("image", "text"):
            quantise_onnx(out / f"{name}.onnx", out / f"{name}.int8.onnx", backbone.embed_dim)
            written(f"{name}.int8.onnx", {**files[f"{name}.onnx"], "precision": "int8"})
    for name in files:
        onnx.checker.check_model(str(out / name))
    manifest = _manifest(backbone, model_name, ids.shape[1], class_names, files)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _write(module, example, input_name: str, out: Path, output: str = "embeddings") -> dict:
    name = {"pixels": "image.onnx", "ids": "text.onnx", "embeddings": "classes.onnx"}[input_name]
    _export(module, example, (input_name, output), out / name)
    shape = ["N", *example.shape[1:]]
    dtype = str(example.dtype).removeprefix("torch.")
    return {"input": {input_name: [shape, dtype]}, "output": output, "precision": "float32"}


def _manifest(backbone, model_name, context_length, class_names, files) -> dict[str, Any]:
    return {
        "format": "awt-engine-onnx/1",
        "model": model_name,
        "fingerprint": backbone.fingerprint,
        "weights": backbone.weights,
        "embed_dim": backbone.embed_dim,
        "logit_scale": backbone.logit_scale,
        "preprocess": {
            **asdict(backbone.preprocess),
            "steps": [
                "RGB, resize the shorter side to size (interpolation), centre crop size x size",
                "float32 in [0, 1], (x - mean) / std per channel, layout [N, 3, size, size]",
            ],
        },
        "tokenizer": {
            "open_clip": f"open_clip.get_tokenizer({model_name!r})",
            "context_length": int(context_length),
        },
        "classes": list(class_names) if class_names is not None else None,
        "files": files,
        "opset": OPSET,
        "torch": torch.__version__,
    }


__all__ = ["INSTALL_HINT", "MANIFEST", "export_onnx", "ort_session", "quantise_onnx"]
