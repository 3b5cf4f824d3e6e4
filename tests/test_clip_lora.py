"""CLIP-LoRA: frozen CLIP at initialisation, only the LoRA learns (and how much of it),
the update against a dense float64 reference of the official code, training, checkpoint
round trip and ``eval --checkpoint``."""

import math

import pytest
import torch
from typer.testing import CliRunner

from awt_engine.backbone import load_backbone
from awt_engine.cli import app
from awt_engine.labels import LabelSet
from awt_engine.methods import get_method, list_methods
from awt_engine.methods.clip_lora import clip_lora_train_defaults
from awt_engine.models.factory import load_model
from awt_engine.models.lora import FusedQVLoRA
from awt_engine.training import train

LABELS = LabelSet(
    ("cat", "sea_lion", "dog"), "a photo of a {}", (("furry",), ("wet.",), ("loyal",))
)


def _net(model_dir, **cfg):
    spec = get_method("clip-lora")
    net = spec.build(load_backbone(model_dir, device="cpu"), spec.config(**cfg))
    net.prepare(LABELS, seed=0)
    return net


def test_registered():
    assert "clip-lora" in list_methods()
    spec = get_method("clip-lora")
    assert set(spec.options) == {"rank", "alpha", "dropout", "template"}
    t = clip_lora_train_defaults(16, "dtd")  # 47 classes: 500 * 16 iterations of batch 32
    assert (t.lr, t.batch_size, t.optimizer, t.weight_decay) == (2e-4, 32, "adamw", 1e-2)
    assert t.epochs == round(500 * 16 / math.ceil(16 * 47 / 32))


def test_initialisation_is_frozen_clip(train_clip_dir):
    net = _net(train_clip_dir)
    bb = net.backbone
    texts = [f"a photo of a {n.replace('_', ' ')}." for n in LABELS.classes]
    texts = [t for c, t in enumerate(texts) for t in (t, f"{t} {LABELS.descriptions[c][0]}")]
    frozen = bb.encode_text(texts).view(3, 2, -1)
    with torch.no_grad():
        torch.testing.assert_close(net.class_embeddings(LABELS), frozen, atol=1e-6, rtol=0)
    pixels = torch.randn(
        2, 3, bb.preprocess.size, bb.preprocess.size, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(
            net.encode_images(pixels), bb.encode_images(pixels), atol=1e-5, rtol=0
        )


def test_only_lora_learns_and_its_size(train_clip_dir):
    net = _net(train_clip_dir, rank=3)
    model = net.backbone.model
    assert not any(p.requires_grad for p in model.parameters())
    expected = 0
    for blocks in (net.backbone.text_blocks, net.backbone.vision_blocks):
        for b in blocks.blocks:  # q, k, v: each A [r, in] and B [out, r], in = out = W
            W = b.attn.in_proj_weight.shape[1]
            expected += 3 * 3 * (W + W)
    learned = net.learned_state()
    assert sum(v.numel() for v in learned.values()) == expected
    assert all(".lora_a" in k or ".lora_b" in k for k in learned)
    out = (
        net.class_embeddings(LABELS.bare()).sum()
        + net.encode_images(
            torch.randn(1, 3, net.backbone.preprocess.size, net.backbone.preprocess.size)
        ).sum()
    )
    out.backward()  # B is zero: A gets no gradient yet, B does, in both towers
    assert net.text_lora[0].lora_b.grad.abs().sum() > 0
    assert net.vision_lora[0].lora_b.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_update_is_the_official_one():
    """loralib: W_x + (alpha / sqrt(r)) * B_x @ A_x for x in q, k, v (dense float64)."""
    W, r, alpha = 5, 2, 1.0
    lora = FusedQVLoRA(
        W, r, alpha, torch.Generator().manual_seed(0), blocks=(0, 1, 2), scale=alpha / math.sqrt(r)
    )
    with torch.no_grad():
        lora.lora_b.normal_(generator=torch.Generator().manual_seed(1))
    weight = torch.randn(3 * W, W, generator=torch.Generator().manual_seed(2))
    got = lora(weight).double()
    a, b = lora.lora_a.detach().double(), lora.lora_b.detach().double()
    ref = {}
    for x, name in enumerate("qkv"):
        w = weight[x * W : (x + 1) * W].double()
        ref[name] = [
            [
                w[i, j] + alpha / math.sqrt(r) * sum(b[x, i, k] * a[x, k, j] for k in range(r))
                for j in range(W)
            ]
            for i in range(W)
        ]
    dense = torch.tensor(ref["q"] + ref["k"] + ref["v"], dtype=torch.float64)
    torch.testing.assert_close(got, dense, atol=1e-6, rtol=0)
    qv = FusedQVLoRA(W, r, alpha, torch.Generator().manual_seed(0))  # LLaMP's default: q, v
    assert qv.lora_a.shape == (2, r, W) and qv.scale == alpha / r
    with pytest.raises(ValueError, match="blocks"):
        FusedQVLoRA(W, r, alpha, torch.Generator(), blocks=(2, 0))


@pytest.fixture(scope="module")
def trained(toy_task, train_clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip-lora") / "clip-lora.safetensors"
    return train(
        "clip-lora",
        data_root=toy_task.root,
        output=out,
        shots=2,
        seed=1,
        model=train_clip_dir,
        device="cpu",
        epochs=6,
        lr=0.01,
        batch_size=4,
    )


def test_training_lowers_the_loss_and_the_checkpoint_round_trips(trained, train_clip_dir):
    r = trained.result
    assert r.last_loss < r.first_loss, r.losses
    net = load_model(checkpoint=trained.path, device="cpu")
    assert net.method == "clip-lora"
    assert any(v.abs().sum() > 0 for k, v in net.learned_state().items() if "lora_b" in k)
    frozen = load_backbone(train_clip_dir, device="cpu")
    labels = LabelSet(("cat", "dog"))
    with torch.no_grad():
        a, b = (
            net.class_embeddings(labels),
            load_model(checkpoint=trained.path, device="cpu").class_embeddings(labels),
        )
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (
        a[:, 0] - frozen.encode_text(["a photo of a cat.", "a photo of a dog."])
    ).abs().max() > 1e-4


def test_eval_checkpoint_runs(trained, toy_task, tmp_path):
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "--data-root",
            str(toy_task.root),
            "--checkpoint",
            str(trained.path),
            "--scorer",
            "clip",
            "--no-progress",
            "--output",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output


def _reference_attention(x, attn, a, b, scale, noise, mask):
    """Float64, the official PlainMultiheadAttentionLoRA: q/k/v = x W^T + bias +
    scale * (x * noise) A^T B^T, heads, softmax(q k^T / sqrt(E) + mask) v, out proj."""
    x = x.double()
    B, L, W = x.shape
    H = attn.num_heads
    E = W // H
    w, bias = attn.in_proj_weight.detach().double(), attn.in_proj_bias.detach().double()
    xd = x * noise.double()
    qkv = []
    for i in range(3):
        p = x @ w[i * W : (i + 1) * W].T + bias[i * W : (i + 1) * W]
        p = p + scale * (xd @ a[i].double().T) @ b[i].double().T
        qkv.append(p)
    out = torch.zeros(B, L, W, dtype=torch.float64)
    for n in range(B):
        for h in range(H):
            q, k, v = (t[n, :, h * E : (h + 1) * E] for t in qkv)
            s = q @ k.T / E**0.5 + mask.double()
            out[n, :, h * E : (h + 1) * E] = torch.softmax(s, dim=-1) @ v
    o = attn.out_proj
    return out @ o.weight.detach().double().T + o.bias.detach().double()


def test_training_attention_drops_the_branch_input_as_the_official_code():
    from awt_engine.methods._clip_lora_attention import dropout_lora_attached

    B, L, W, H, r, p = 2, 5, 8, 2, 2, 0.25
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(W, H, batch_first=True).eval()
    lora = FusedQVLoRA(W, r, 1.0, torch.Generator().manual_seed(0), blocks=(0, 1, 2), scale=0.7)
    with torch.no_grad():
        lora.lora_b.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(B, L, W)
    mask = torch.full((L, L), float("-inf")).triu(1)  # causal, additive (open_clip's text)
    torch.manual_seed(5)
    with dropout_lora_attached([(attn, lora)], p):
        got = attn(x, x, x, need_weights=False, attn_mask=mask)[0]
    torch.manual_seed(5)  # the same draws: dropout of ones is the kept-and-rescaled mask
    noise = torch.nn.functional.dropout(torch.ones_like(x), p, training=True)
    assert (noise == 0).any()
    ref = _reference_attention(
        x, attn, lora.lora_a.detach(), lora.lora_b.detach(), 0.7, noise, mask
    )
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    assert "forward" not in vars(attn)  # the module's own forward is back
    with torch.no_grad():  # without dropout it is the folded weight's attention
        with dropout_lora_attached([(attn, lora)], 0.0):
            plain = attn(x, x, x, need_weights=False, attn_mask=mask)[0]
        from awt_engine.models.lora import fused_lora_attached

        with fused_lora_attached([(attn, lora)]):
            folded = attn(x, x, x, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(plain, folded, atol=1e-5, rtol=0)


def test_training_mode_uses_the_dropout_path_on_both_towers(train_clip_dir):
    net = _net(train_clip_dir, dropout=0.0)
    with torch.no_grad():
        for lora in [*net.text_lora, *net.vision_lora]:
            lora.lora_b.normal_(std=0.05, generator=torch.Generator().manual_seed(3))
    px = torch.randn(2, 3, net.backbone.preprocess.size, net.backbone.preprocess.size)
    with torch.no_grad():
        folded = net.class_embeddings(LABELS), net.encode_images(px)
    net2 = _net(train_clip_dir)  # dropout 0.25, training mode: another forward
    net2.load_learned(net.learned_state())
    net2.train()
    with torch.no_grad():
        dropped = net2.class_embeddings(LABELS), net2.encode_images(px)
        net2.eval()
        again = net2.class_embeddings(LABELS), net2.encode_images(px)
    for f, d, e in zip(folded, dropped, again, strict=True):
        assert (f - d).abs().max() > 1e-4  # dropout acted
        torch.testing.assert_close(f, e, atol=1e-5, rtol=0)  # eval: no dropout
