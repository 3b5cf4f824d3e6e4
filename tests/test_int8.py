"""--precision int8: the towers quantised and run by ONNX Runtime on the CPU, tiny models.

Checked: the int8 embeddings stay within a cosine bound of fp32 and are finite unit rows;
scores and predictions stay finite and well-formed; the quantised graphs are written once
under the cache root and read back on the next load; the precision enters identities (so
every cache key) and eval records; CoOp runs at int8 (its learned prompts through the float32
text tower, its images through int8) while the methods that change a tower's inside are
refused before any weights load; threads default to the process's CPU affinity.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("onnxruntime", reason="int8 runs in ONNX Runtime (the onnx extra)")
pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript (the onnx extra)")

from awt_engine.backbone import load_backbone
from awt_engine.backbone.devices import default_threads, resolve_precision, set_threads
from awt_engine.backbone.int8 import FILES, check_int8_method

# Exporting and quantising the tiny towers takes 10-40 s on 2 shared cores, once per module.
pytestmark = pytest.mark.slow

COS_BOUND = 0.99  # int8 vs fp32 embeddings, per row (bench_cpu.py: 0.99993, B-32 and B-16)


@pytest.fixture(scope="module")
def towers(tiny_clip_dir):
    fp32 = load_backbone(tiny_clip_dir, device="cpu", precision="fp32")
    int8 = load_backbone(tiny_clip_dir, device="cpu", precision="int8")
    return fp32, int8


@pytest.fixture(scope="module", autouse=True)
def _module_cache(tmp_path_factory):
    """One cache root for the module: the quantised graphs are written once."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AWT_ENGINE_CACHE", str(tmp_path_factory.mktemp("int8-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _isolated_cache():
    """Overrides conftest's per-test cache root (this module shares one, above)."""


def test_int8_graphs_written_once_and_read_back(towers, tiny_clip_dir, monkeypatch):
    fp32, int8 = towers
    assert int8.precision == "int8" and int8.dtype == torch.float32
    assert fp32.precision == "float32" and fp32.int8 is None
    assert int8.fingerprint == fp32.fingerprint  # the same weights: checkpoints still match
    root = os.environ["AWT_ENGINE_CACHE"]
    assert str(int8.int8.folder).startswith(root)
    assert all((int8.int8.folder / f).is_file() for f in FILES)
    from awt_engine.backbone import onnx_export

    def no_export(*a, **k):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_export, "export_onnx", no_export)
    monkeypatch.setattr("awt_engine.backbone.int8.export_onnx", no_export)
    again = load_backbone(tiny_clip_dir, device="cpu", precision="int8")
    assert again.int8.folder == int8.int8.folder
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(again.encode_images(x), int8.encode_images(x))


def test_int8_embeddings_close_to_fp32_and_well_formed(towers):
    fp32, int8 = towers
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(24, 3, 32, 32, generator=g)
    texts = [f"a photo of a thing number {i}." for i in range(24)]
    for a, b in (
        (fp32.encode_images(pixels), int8.encode_images(pixels)),
        (fp32.encode_text(texts), int8.encode_text(texts)),
    ):
        assert b.shape == a.shape and b.dtype == torch.float32
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b.norm(dim=-1), torch.ones(len(b)), rtol=0, atol=1e-5)
        cos = F.cosine_similarity(a.double(), b.double(), dim=-1)
        assert cos.min() >= COS_BOUND, cos.min()
        assert not torch.equal(a, b)  # it really computed in int8


def test_int8_is_a_cpu_precision():
    with pytest.raises(ValueError, match="CPU path"):
        resolve_precision("int8", torch.device("cuda", 0))
    assert resolve_precision("int8", torch.device("cpu")) == "int8"
    with pytest.raises(ValueError, match="int8"):  # the choices listed
        resolve_precision("int4", torch.device("cpu"))


def _images(n):
    g = torch.Generator().manual_seed(1)
    return [
        Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=g).numpy().astype("uint8"))
        for _ in range(n)
    ]


def test_int8_classifier_scores_predictions_and_cache_keys(tiny_clip_dir):
    import awt_engine

    classes = ["cat", "dog", "car", "tree"]
    clfs = {
        p: awt_engine.create_classifier(
            tiny_clip_dir, classes=classes, views=4, device="cpu", precision=p
        )
        for p in ("fp32", "int8")
    }
    m8, m32 = clfs["int8"].model, clfs["fp32"].model
    assert m8.precision == "int8" and m8.identity.endswith("|int8")
    assert m8.identity != m32.identity  # every cache key hashes the identity
    preds = clfs["int8"].predict(_images(3), top_k=4)
    for p in preds:
        assert {x["label"] for x in p} == set(classes)
        scores = [x["score"] for x in p]
        assert all(math.isfinite(s) and 0 <= s <= 1 for s in scores)
        assert abs(sum(scores) - 1) < 1e-5
    s8, s32 = clfs["int8"].scores(_images(3)), clfs["fp32"].scores(_images(3))
    assert torch.isfinite(s8).all() and s8.shape == s32.shape == (3, len(classes))


def test_int8_graphs_go_under_the_cache_dir_given(towers, tiny_clip_dir, tmp_path, monkeypatch):
    """--cache-dir (create_classifier's cache_dir) is where int8 writes its graphs, as for
    every other cache; the module's $AWT_ENGINE_CACHE only when none is given."""
    import awt_engine
    from awt_engine.backbone import int8 as int8_module

    roots = []

    def record(backbone, model_name, cache_root=None):
        roots.append(cache_root)
        return towers[1].int8  # the module's graphs: no second export

    monkeypatch.setattr(int8_module, "int8_towers", record)
    mine = tmp_path / "mine"
    for given in (mine, None):
        awt_engine.create_classifier(
            tiny_clip_dir, classes=["a", "b"], device="cpu", precision="int8", cache_dir=given
        )
    assert [str(r) for r in roots] == [str(mine), os.environ["AWT_ENGINE_CACHE"]]


def test_a_second_first_load_waits_for_the_export_in_progress(towers, tmp_path, monkeypatch):
    """Two processes loading int8 on a fresh cache (Ray actors on one machine): the one
    that finds the folder's lock held waits, then reads the graphs the holder wrote,
    exporting nothing itself."""
    import shutil
    import threading

    from awt_engine.backbone import int8 as int8_module
    from awt_engine.descriptions import locked

    fp32 = towers[0]
    key = int8_module.sha256_hex("awt-int8-onnx", str(int8_module.FORMAT), fp32.fingerprint)
    folder = tmp_path / "onnx-int8" / key[:32]
    folder.parent.mkdir(parents=True)
    held, done = threading.Event(), threading.Event()

    def other_process():
        with locked(folder):
            held.set()
            time.sleep(0.5)  # the export in progress
            shutil.copytree(towers[1].int8.folder, folder)
        done.set()

    def no_export(*a, **k):
        raise AssertionError("exported although another process was writing the graphs")

    monkeypatch.setattr(int8_module, "export_onnx", no_export)
    writer = threading.Thread(target=other_process)
    writer.start()
    assert held.wait(10)
    got = int8_module.int8_towers(fp32, "tiny", tmp_path)
    assert done.is_set() and got.folder == folder
    writer.join(10)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(got.encode_images(x), towers[1].int8.encode_images(x))


def test_eval_records_name_int8(tiny_clip_dir, toy_task, tmp_path):
    import awt_engine
    from awt_engine.evaluate import evaluate, result_records
    from awt_engine.labelled import load_labelled

    data = load_labelled(toy_task.root, split="test")
    clf = awt_engine.create_classifier(
        tiny_clip_dir, None, classes=list(data.classes), views=2, device="cpu", precision="int8"
    )
    result = evaluate(clf, data, ["clip", "awt"], cache_root=tmp_path)
    records = result_records(
        result, clf, model="tiny", data_root=toy_task.root, split="test", limit=None
    )
    assert len(records) == 2
    assert all(r["precision"] == "int8" for r in records.values())
    assert all("|int8" in r["model_identity"] for r in records.values())


def test_coop_checkpoint_runs_at_int8(coop_checkpoint):
    from awt_engine.labels import LabelSet
    from awt_engine.models.factory import load_model

    nets = {
        p: load_model(checkpoint=coop_checkpoint, device="cpu", precision=p)
        for p in ("fp32", "int8")
    }
    assert nets["int8"].precision == "int8" and "|int8" in nets["int8"].identity
    labels = nets["fp32"].train_labels
    assert isinstance(labels, LabelSet)
    # the learned prompts enter the float32 text tower: the class embeddings are fp32's
    emb = {p: n.class_embeddings(labels) for p, n in nets.items()}  # [C, P, D]
    torch.testing.assert_close(emb["int8"], emb["fp32"])
    views = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    img = {p: n.embed_views(views) for p, n in nets.items()}  # [2, 3, D]: through int8
    assert torch.isfinite(img["int8"]).all() and not torch.equal(img["int8"], img["fp32"])
    cos = F.cosine_similarity(img["int8"].flatten(0, 1), img["fp32"].flatten(0, 1), dim=-1)
    assert cos.min() >= COS_BOUND


def test_tower_changing_methods_refused_before_weights_load(coop_checkpoint, monkeypatch):
    from awt_engine import backbone as backbone_mod
    from awt_engine.checkpoints import CheckpointError
    from awt_engine.methods.awt_adapter import AWTAdapter
    from awt_engine.methods.clamp import CLAMP
    from awt_engine.methods.clip_lora import ClipLoRA
    from awt_engine.methods.coop import CoOp
    from awt_engine.methods.epalm import EPALM
    from awt_engine.methods.lamm import LAMM
    from awt_engine.methods.llamp import LLaMP
    from awt_engine.models.factory import load_model

    assert all(m.int8_refusal for m in (AWTAdapter, LLaMP, ClipLoRA, EPALM))
    assert not any(m.int8_refusal for m in (CoOp, LAMM, CLAMP))
    check_int8_method("coop", "", "int8")  # nothing to refuse
    check_int8_method("clip-lora", ClipLoRA.int8_refusal, "float32")

    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the refusal")

    monkeypatch.setattr(backbone_mod, "load_backbone", no_weights)
    monkeypatch.setattr(CoOp, "int8_refusal", "its prompts sit inside the tower (test)")
    with pytest.raises(CheckpointError, match=r"cannot run at precision int8: its prompts sit"):
        load_model(checkpoint=coop_checkpoint, device="cpu", precision="int8")


def test_threads_default_to_the_process_affinity():
    if hasattr(os, "sched_getaffinity"):
        assert default_threads() == len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_threads(None) == default_threads()
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError):
        set_threads(0)
