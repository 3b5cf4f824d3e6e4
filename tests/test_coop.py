"""CoOp: frozen-model equivalence at initialisation, learning, its class-specific variant."""

import pytest
import torch

import awt_engine
from awt_engine.backbone import load_backbone
from awt_engine.classifier import Classifier
from awt_engine.evaluate import evaluate
from awt_engine.labelled import load_labelled
from awt_engine.labels import LabelSet
from awt_engine.methods import get_method
from awt_engine.training import load_trained, train

LABELS = LabelSet(
    ("cat", "sea_lion", "dog"), "a photo of a {}", (("furry",), ("wet.",), ("loyal",))
)


def _coop(model_dir, labels=LABELS, **cfg):
    spec = get_method("coop")
    net = spec.build(load_backbone(model_dir, device="cpu"), spec.config(**cfg))
    net.prepare(labels, seed=0)
    return net


@pytest.mark.parametrize("csc", [False, True])
def test_context_from_a_phrase_is_the_frozen_model(train_clip_dir, csc):
    net = _coop(train_clip_dir, ctx_init="a photo of a", csc=csc)
    texts = [t for row in LABELS.prompt_texts() for t in row]  # "a photo of a cat." ...
    frozen = net.backbone.encode_text(texts).view(3, 2, -1)
    with torch.no_grad():
        got = net.class_embeddings(LABELS)
    torch.testing.assert_close(got, frozen, atol=1e-5, rtol=0)
    with torch.enable_grad():  # also on the slower autograd path
        got = net.class_embeddings(LABELS)
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), frozen, atol=1e-5, rtol=0)


def test_name_position_and_context_length(train_clip_dir):
    for pos in ("middle", "front"):
        net = _coop(train_clip_dir, n_ctx=4, class_position=pos)
        assert net.ctx.shape == (4, 64) and net.class_embeddings(LABELS.bare()).shape == (3, 1, 32)
    assert _coop(train_clip_dir, ctx_init="a photo of a", n_ctx=16).ctx.shape == (4, 64)
    with pytest.raises(ValueError, match="class_position"):
        get_method("coop").config(class_position="left")


def test_only_the_context_gets_gradients(train_clip_dir):
    net = _coop(train_clip_dir, n_ctx=4)
    out = net.class_embeddings(LABELS.bare())
    out.sum().backward()
    assert net.ctx.grad is not None and net.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.backbone.model.parameters())


def test_class_specific_contexts_refuse_unseen_classes(train_clip_dir):
    net = _coop(train_clip_dir, n_ctx=4, csc=True)
    assert net.ctx.shape == (3, 4, 64)
    with pytest.raises(ValueError, match=r"class-specific contexts.*\bfox\b"):
        net.class_embeddings(LabelSet(("cat", "fox")))
    generic = _coop(train_clip_dir, n_ctx=4)
    assert generic.class_embeddings(LabelSet(("cat", "fox"))).shape[0] == 2  # shared context


def _accuracy(net_or_dir, data, classes):
    if isinstance(net_or_dir, str):
        clf = awt_engine.create_classifier(
            net_or_dir, classes=list(classes), scorer="clip", device="cpu", views=1
        )
    else:
        clf = Classifier(net_or_dir, LabelSet(classes), scorer="clip")
    return evaluate(clf, data, ["clip"], cache_root=None).metrics["clip"].acc1


def test_coop_learns_the_toy_task(toy_task, train_clip_dir, tmp_path):
    test = load_labelled(toy_task.root, split="test")
    zero_shot = _accuracy(train_clip_dir, test, test.classes)
    done = train(
        "coop",
        data_root=toy_task.root,
        output=tmp_path / "coop.safetensors",
        shots=4,
        seed=1,
        model=train_clip_dir,
        device="cpu",
        epochs=30,
        lr=0.05,
        batch_size=4,
        options={"csc": "true", "n_ctx": "4"},
    )
    r = done.result
    assert r.last_loss < r.first_loss / 2, r.losses
    trained = _accuracy(load_trained(done.path, device="cpu"), test, test.classes)
    assert trained >= zero_shot + 0.3, (zero_shot, trained)


def test_the_label_set_and_its_hash_are_built_once_not_per_step(train_clip_dir, monkeypatch):
    """CoOp and LAMM: three steps build train_labels.bare() and hash it once (the first
    step), with the same loss as rebuilding it."""
    from awt_engine.methods.base import TrainBatch

    counts = {"bare": 0, "key": 0}
    for name in counts:
        real = getattr(LabelSet, name)

        def spy(self, _real=real, _name=name):
            counts[_name] += 1
            return _real(self)

        monkeypatch.setattr(LabelSet, name, spy)
    g = torch.Generator().manual_seed(0)
    for method in ("coop", "lamm"):
        spec = get_method(method)
        net = spec.build(load_backbone(train_clip_dir, device="cpu"), spec.config())
        net.prepare(LABELS, seed=0)
        R = net.preprocess.size
        views = torch.randn(3, 1, 3, R, R, generator=g)
        batch = TrainBatch(views, torch.tensor([0, 1, 2]), 0, 0, g)
        for k in counts:
            counts[k] = 0
        losses = [net.training_loss(batch).total for _ in range(3)]
        assert counts == {"bare": 1, "key": 1}, method
        fresh = net.class_embeddings(LABELS.bare())[:, 0]  # the set rebuilt: same prompts
        assert torch.equal(fresh, net.class_embeddings(net.train_bare())[:, 0])
        assert all(torch.equal(x, losses[0]) for x in losses)
