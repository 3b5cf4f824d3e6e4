"""LAMM: frozen-model equivalence at initialisation, its loss terms, learning, unseen classes."""

import pytest
import torch

from awt_engine.backbone import load_backbone
from awt_engine.classifier import Classifier
from awt_engine.evaluate import evaluate
from awt_engine.labelled import load_labelled
from awt_engine.labels import LabelSet
from awt_engine.methods import get_method
from awt_engine.methods.base import TrainBatch
from awt_engine.training import load_trained, train
from awt_engine.training.data import few_shot
from awt_engine.training.loop import TrainConfig, fit

# "sea lion" is two tokens, the others one: L = 1, so sea lion keeps its second token
LABELS = LabelSet(
    ("cat", "sea_lion", "dog"), "a photo of a {}", (("furry",), ("wet.",), ("loyal",))
)


def _lamm(model_dir, labels=LABELS, **cfg):
    spec = get_method("lamm")
    net = spec.build(load_backbone(model_dir, device="cpu"), spec.config(**cfg))
    net.prepare(labels, seed=0)
    return net


def _batch(net, n=4):
    g = torch.Generator().manual_seed(0)
    R = net.preprocess.size
    return TrainBatch(
        torch.randn(n, 1, 3, R, R, generator=g), torch.tensor([0, 1, 2, 0][:n]), 0, 0, g
    )


def test_initialisation_is_frozen_clip_and_the_regularisers_are_zero(train_clip_dir):
    net = _lamm(train_clip_dir, logit_loss="kl")
    assert net.n_label == 1 and net.label_tokens.shape == (3, 1, 64)
    texts = [t for row in LABELS.prompt_texts() for t in row]
    frozen = net.backbone.encode_text(texts).view(3, 2, -1)
    torch.testing.assert_close(net.class_embeddings(LABELS).detach(), frozen, atol=1e-5, rtol=0)
    out = net.training_loss(_batch(net))
    assert out.terms["param"].item() == 0.0
    assert out.terms["feature"].item() == pytest.approx(0.0, abs=1e-5)
    assert out.terms["logit"].item() == pytest.approx(0.0, abs=1e-5)  # the paper's KL
    code = _lamm(train_clip_dir, logit_loss="ce").training_loss(_batch(net))
    assert code.terms["logit"].item() > 1e-3  # the code's CE carries the target's entropy


def test_only_the_label_tokens_learn_unless_the_context_does_too(train_clip_dir):
    net = _lamm(train_clip_dir)
    net.training_loss(_batch(net)).total.backward()
    assert net.label_tokens.grad is not None and net.label_tokens.grad.abs().sum() > 0
    assert net.ctx.grad is None and set(net.learned_state()) == {"label_tokens"}
    assert all(p.grad is None for p in net.backbone.model.parameters())
    both = _lamm(train_clip_dir, learn_ctx=True)
    both.training_loss(_batch(both)).total.backward()
    assert both.ctx.grad is not None and set(both.learned_state()) == {"ctx", "label_tokens"}


def _fit(net, data, **kw):
    cfg = TrainConfig(epochs=kw.pop("epochs", 8), lr=kw.pop("lr", 0.1), batch_size=4, seed=1)
    return fit(net, data, cfg)


def test_the_parameter_term_keeps_the_labels_near_their_words(toy_task, train_clip_dir):
    data = few_shot(load_labelled(toy_task.root, split="train"), 2, seed=1)
    labels = LabelSet(data.classes)
    moved = {}
    for weight in (0.0, 1.0):
        net = _lamm(train_clip_dir, labels, param_weight=weight)
        _fit(net, data)
        moved[weight] = (net.label_tokens - net.initial_labels).norm().item()
    assert moved[1.0] < moved[0.0], moved


def test_unseen_classes_fall_back_to_their_word_embeddings(toy_task, train_clip_dir):
    data = few_shot(load_labelled(toy_task.root, split="train"), 2, seed=1)
    net = _lamm(train_clip_dir, LabelSet(data.classes))
    _fit(net, data, epochs=3)
    mixed = LabelSet((data.classes[0], "fox", "sea_lion"), "a photo of a {}")
    with torch.no_grad():
        got = net.class_embeddings(mixed)[:, 0]
    frozen = net.backbone.encode_text(["a photo of a fox.", "a photo of a sea lion."])
    torch.testing.assert_close(got[1:], frozen, atol=1e-5, rtol=0)  # unseen: as frozen CLIP
    trained0 = net.backbone.encode_text([f"a photo of a {data.classes[0]}."])[0]
    assert (got[0] - trained0).abs().max() > 1e-3  # a training class uses its learned label
    assert net.unseen_classes(mixed.classes) is None


def test_lamm_learns_the_toy_task(toy_task, train_clip_dir, tmp_path):
    test = load_labelled(toy_task.root, split="test")
    done = train(
        "lamm",
        data_root=toy_task.root,
        output=tmp_path / "lamm.safetensors",
        shots=4,
        seed=1,
        model=train_clip_dir,
        device="cpu",
        epochs=60,
        lr=0.1,
        batch_size=4,
    )
    first, last = done.result.losses[0], done.result.losses[-1]
    # the classification loss halves; the regularisers, zero at the start, stay small
    assert last["ce"] < first["ce"] / 2, (first, last)
    assert last["total"] < first["total"]
    net = load_trained(done.path, device="cpu")
    labels = LabelSet(test.classes)
    zs = Classifier(_lamm(train_clip_dir, labels), labels, scorer="clip")
    acc = {}
    for name, clf in (("zero-shot", zs), ("trained", Classifier(net, labels, scorer="clip"))):
        acc[name] = evaluate(clf, test, ["clip"], cache_root=None).metrics["clip"].acc1
    assert acc["trained"] >= acc["zero-shot"] + 0.3, acc


def _spy_encode(net):
    calls = []
    encode = net.text.encode

    def spy(batch, fills):
        calls.append(batch)
        return encode(batch, fills)

    net.text.encode = spy
    return calls


def test_frozen_original_labels_are_encoded_once_with_the_same_loss(train_clip_dir):
    """Pure LAMM: the original-label prompts are encoded on the first step only, and the
    losses and gradients are exactly those of encoding them afresh every step."""
    net, fresh = _lamm(train_clip_dir), _lamm(train_clip_dir)
    fresh.original_embeddings = fresh.encode_original  # the uncached computation
    calls = _spy_encode(net)
    for _ in range(3):
        for m in (net, fresh):
            m.zero_grad()
            out = m.training_loss(_batch(m))
            out.total.backward()
        got, want = net.training_loss(_batch(net)), fresh.training_loss(_batch(fresh))
        assert torch.equal(got.total, want.total)
        for k in want.terms:
            assert torch.equal(got.terms[k], want.terms[k]), k
        assert torch.equal(net.label_tokens.grad, fresh.label_tokens.grad)
    original = net.prompt_batch(LABELS.bare(), net.original)
    assert sum(b is original for b in calls) == 1  # 6 training_loss calls, 1 encoding
    bare = net.train_bare()
    assert torch.equal(net.original_embeddings(bare), net.encode_original(bare))
    other = LabelSet(("dog", "cat"), "a photo of a {}")  # another label set: encoded afresh
    assert torch.equal(net.original_embeddings(other), net.encode_original(other))


def test_a_learned_context_keeps_the_original_labels_graph(train_clip_dir):
    net = _lamm(train_clip_dir, learn_ctx=True)
    calls = _spy_encode(net)
    for _ in range(2):
        net.training_loss(_batch(net))
    assert len(calls) == 4  # learned and original prompts every step: ctx moves
    assert net.original_embeddings(net.train_bare()).requires_grad
