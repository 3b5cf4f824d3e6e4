"""`awt-engine export --format onnx`: the towers in ONNX Runtime against the torch towers.

One export per module (tiny model, with a label set and --int8): the fp32 graphs must give
the torch towers' embeddings within 1e-4 relative at batch sizes other than the export's,
the class head CLIP's zero-shot logits (computed here from the torch embeddings), the int8
graphs finite unit rows close to fp32, and preprocess.json the model's preprocessing.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (the onnx extra)")
pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript (the onnx extra)")

from awt_engine.backbone import load_backbone
from awt_engine.backbone.onnx_export import ort_session
from awt_engine.cli import app
from tests.fixtures_clip import TINY_PREPROCESS_CFG

CLASSES = ["cat", "dog", "small red car"]


@pytest.fixture(scope="module")
def exported(tiny_clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    result = CliRunner().invoke(
        app,
        [
            "export",
            "--format",
            "onnx",
            "--model",
            tiny_clip_dir,
            "--classes",
            ",".join(CLASSES),
            "--template",
            "a photo of a {}.",
            "--int8",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    return out, load_backbone(tiny_clip_dir, device="cpu", precision="fp32"), result.output


def _run(path, name, x):
    return torch.from_numpy(ort_session(path, threads=1).run(None, {name: x.numpy()})[0])


def _rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.slow
def test_files_and_preprocessing_recorded(exported):
    out, bb, printed = exported
    names = {p.name for p in out.iterdir()}
    assert names == {
        "image.onnx",
        "text.onnx",
        "classes.onnx",
        "image.int8.onnx",
        "text.int8.onnx",
        "preprocess.json",
    }
    assert all(str(out / n) in printed for n in names)
    manifest = json.loads((out / "preprocess.json").read_text())
    pre = manifest["preprocess"]
    assert pre["size"] == TINY_PREPROCESS_CFG["size"]
    assert pre["mean"] == TINY_PREPROCESS_CFG["mean"] and pre["std"] == TINY_PREPROCESS_CFG["std"]
    assert pre["interpolation"] == TINY_PREPROCESS_CFG["interpolation"]
    assert manifest["classes"] == CLASSES
    assert manifest["fingerprint"] == bb.fingerprint
    assert manifest["tokenizer"]["context_length"] == bb.tokenize(["x"]).shape[1]
    assert manifest["files"]["image.onnx"]["input"] == {"pixels": [["N", 3, 32, 32], "float32"]}


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 5])
def test_fp32_towers_match_torch(exported, n):
    out, bb, _ = exported
    g = torch.Generator().manual_seed(n)
    pixels = torch.randn(n, 3, 32, 32, generator=g)
    want = bb.encode_images(pixels)  # [n, D]
    got = _run(out / "image.onnx", "pixels", pixels)
    assert got.shape == want.shape and _rel_err(got, want) <= 1e-4
    texts = [f"a photo of a {c}." for c in ["cat", "big dog", "tree", "x", "car"][:n]]
    ids = bb.tokenize(texts)  # [n, L]
    got_t = _run(out / "text.onnx", "ids", ids)
    assert got_t.shape == (n, bb.embed_dim) and _rel_err(got_t, bb.encode_text(texts)) <= 1e-4


@pytest.mark.slow
def test_class_head_is_clip_zero_shot(exported):
    out, bb, _ = exported
    class_emb = bb.encode_text([f"a photo of a {c}." for c in CLASSES])  # [C, D], one prompt
    img = bb.encode_images(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    want = bb.logit_scale * img.double() @ class_emb.double().T  # [4, C]
    got = _run(out / "classes.onnx", "embeddings", img)
    assert got.shape == (4, len(CLASSES)) and _rel_err(got, want) <= 1e-4


@pytest.mark.slow
def test_int8_graphs_are_close_and_well_formed(exported):
    out, bb, _ = exported
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    got = _run(out / "image.int8.onnx", "pixels", pixels)
    want = bb.encode_images(pixels)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(6), rtol=0, atol=1e-4)
    assert F.cosine_similarity(got, want, dim=-1).min() >= 0.99
    ids = bb.tokenize(["a photo of a cat.", "a dog"])
    got_t = _run(out / "text.int8.onnx", "ids", ids)
    assert torch.isfinite(got_t).all()
    assert F.cosine_similarity(got_t, bb.encode_text(["a photo of a cat.", "a dog"])).min() >= 0.99


@pytest.mark.slow
def test_int8_quantises_block_matmuls_per_channel_and_keeps_the_ends_float(exported):
    """What quantise_onnx promises, read off the int8 graphs: every weight MatMul of the
    blocks int8 with one scale per output column; the patch embedding (Conv), the token
    embedding (Gather) and the [width, D] projection left float32 on their own weights."""
    import onnx

    out, bb, _ = exported
    D = bb.embed_dim
    for name, first in (("image", "Conv"), ("text", "Gather")):
        graph = onnx.load(str(out / f"{name}.int8.onnx")).graph
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
        ops = [n.op_type for n in graph.node]
        assert first in ops and "ConvInteger" not in ops
        quantised = [
            n for n in graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")
        ]
        float_mm = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]
        # the one float weight MatMul left is the projection into the D-wide embedding
        assert [inits[n.input[1]].shape[1] for n in float_mm] == [D]
        assert inits[float_mm[0].input[1]].dtype.name == "float32"
        # TINY_MODEL_CFG: one block per tower; q/k/v in one MatMul, the attention's output
        # projection (a Gemm, quantised as a MatMul), the MLP's two
        assert len(quantised) == 4
        for node in quantised:
            assert node.op_type == "MatMulInteger"  # inputs: a, b, a zero point, b zero point
            weight, zero = inits[node.input[1]], inits[node.input[3]]
            assert weight.dtype.name == "int8" and weight.ndim == 2
            assert zero.shape == (weight.shape[1],)  # per output channel


def test_export_refuses_unknown_format(tmp_path):
    result = CliRunner().invoke(app, ["export", "--format", "tflite", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "only onnx" in result.output
