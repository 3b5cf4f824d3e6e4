"""The model factory (awt_engine/models/factory.py): a name or a checkpoint in, a model out.

It sits below the classifier, evaluation and training (tests/test_layers.py keeps it
there); a checkpoint's header arrives in the model's declared ``checkpoint`` field.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

import awt_engine
from awt_engine.checkpoints import read_checkpoint, read_checkpoint_header
from awt_engine.methods.base import TrainableBase
from awt_engine.models import factory
from awt_engine.models.base import Embedder, TrainedInfo, trained_info
from awt_engine.models.clip import ClipEmbedder

PACKAGE = Path(awt_engine.__file__).resolve().parent


def test_public_names_are_the_factorys():
    import awt_engine.classifier as classifier
    import awt_engine.training as training

    assert awt_engine.load_model is factory.load_model
    assert classifier.load_model is factory.load_model
    assert training.load_trained is factory.load_trained


def test_default_model_is_defined_once():
    """DEFAULT_MODEL (and DEFAULT_PRETRAINED) are assigned in one module only, and no other
    module spells the default model's name as a value."""
    assigned, spelled = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name) and t.id in ("DEFAULT_MODEL", "DEFAULT_PRETRAINED"):
                        assigned.append((t.id, path.relative_to(PACKAGE).as_posix()))
            if isinstance(node, ast.Constant) and node.value == factory.DEFAULT_MODEL:
                spelled.append(path.relative_to(PACKAGE).as_posix())
    assert sorted(assigned) == [
        ("DEFAULT_MODEL", "models/factory.py"),
        ("DEFAULT_PRETRAINED", "models/factory.py"),
    ]
    assert spelled == ["models/factory.py"]


def test_importing_the_factory_is_cheap_and_loads_no_caller():
    code = (
        "import sys; import awt_engine.models.factory as f; f.DEFAULT_MODEL; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(("
        "'awt_engine.training', 'awt_engine.classifier', 'awt_engine.evaluate', "
        "'awt_engine.cli', 'awt_engine.methods'))]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_checkpoint_is_a_declared_field():
    assert ClipEmbedder.__annotations__["checkpoint"] == "TrainedInfo | None"
    assert ClipEmbedder.checkpoint is None
    backbone = SimpleNamespace(logit_scale=100.0, preprocess=None, device="cpu", dtype="fp32")
    assert TrainableBase(backbone, None).checkpoint is None  # set only by load_trained


def test_zero_shot_model_has_no_checkpoint(tiny_clip_dir):
    net = factory.load_model(tiny_clip_dir, device="cpu")
    assert isinstance(net, ClipEmbedder) and isinstance(net, Embedder)
    assert net.checkpoint is None and trained_info(net) is None
    assert trained_info(object()) is None  # a user's model without the field


def test_checkpoint_loads_into_the_typed_field(coop_checkpoint):
    net = factory.load_model(checkpoint=coop_checkpoint, device="cpu")
    assert isinstance(net, TrainableBase) and isinstance(net, Embedder)
    info = trained_info(net)
    assert info == TrainedInfo(coop_checkpoint, read_checkpoint_header(coop_checkpoint))
    assert net.checkpoint is info and not hasattr(net, "checkpoint_header")
    header, tensors = read_checkpoint(coop_checkpoint)
    assert info.header == header and info.header["method"] == "coop"
    learned = net.learned_state()
    assert set(learned) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(learned[name].detach().float().cpu(), t), name


def test_classifier_takes_a_checkpoints_labels_from_its_field(coop_checkpoint):
    clf = awt_engine.create_classifier(checkpoint=coop_checkpoint, device="cpu", views=1)
    header = read_checkpoint_header(coop_checkpoint)
    assert clf.labels.classes == tuple(header["labels"]["classes"])
    assert clf.labels.template == header["labels"]["template"]


def test_the_default_weights_survive_pickling_as_the_same_object():
    """A ModelSource left at its default crosses to Ray actors by pickle; the factory
    tests the default by identity, so the copy must be the module's one instance."""
    import pickle

    from awt_engine.dispatch import ModelSource

    source = pickle.loads(pickle.dumps(ModelSource("RN50")))
    assert source.pretrained is factory.DEFAULT_WEIGHTS
    assert factory.weights_for("local-dir:/m", source.pretrained) is None
    assert factory.weights_for("RN50", source.pretrained) == "openai"
