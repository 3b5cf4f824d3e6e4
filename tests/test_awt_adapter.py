"""The AWT multimodal adapter: frozen CLIP at initialisation, sizes from the towers, the
loss (AWT at training temperatures + L1 to frozen CLIP), the gradient path, learning the
toy task, and its checkpoint in a fresh process."""

import dataclasses
import hashlib
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import awt_engine
from awt_engine import scoring
from awt_engine.backbone import load_backbone
from awt_engine.backbone.model import tower_blocks
from awt_engine.checkpoints import labels_from_record
from awt_engine.classifier import Classifier
from awt_engine.descriptions import descriptions_path, from_plain, save_descriptions
from awt_engine.evaluate import evaluate
from awt_engine.inputs.views import ViewConfig, make_views
from awt_engine.labelled import load_labelled
from awt_engine.labels import LabelSet
from awt_engine.methods import get_method
from awt_engine.methods.base import TrainBatch
from awt_engine.models.clip import ClipEmbedder
from awt_engine.models.layers import BranchAdapters
from awt_engine.registry import DatasetInfo, register_dataset, unregister_dataset
from awt_engine.training import load_trained, train
from tests.awt_reference import ref_awt_scores
from tests.fixtures_clip import TRAIN_MODEL_CFG, write_local_dir
from tests.fixtures_training import TOY_CLASSES

SPEC = get_method("awt-adapter")
TOY = "awt_adapter_toy"  # a data set registered for these tests, with a description cache
DESCRIPTIONS = {
    c: [f"which is {c} in colour", "with thin stripes", f"a {c} texture"] for c in TOY_CLASSES
}
FAST = {"train_views": 4, "prompts_per_step": 3}  # tiny views and prompts for the CPU


def _labels(n_desc=3, classes=TOY_CLASSES):
    descs = tuple(tuple(f"{c} description {i}" for i in range(n_desc)) for c in classes)
    return LabelSet(tuple(classes), "a photo of a {}", descs)


def _net(bb, labels, seed=0, **cfg):
    net = SPEC.build(bb, SPEC.config(**cfg))
    net.prepare(labels, seed=seed)
    return net


def _views(toy_task, bb, n_images=3, n_views=4):
    paths = sorted((toy_task.root / "train").rglob("*.png"))[::4][:n_images]
    cfg = ViewConfig(n_views=n_views, raw_view=False)
    return torch.stack(
        [
            make_views(Image.open(p).convert("RGB"), bb.preprocess, cfg, seed=i)
            for i, p in enumerate(paths)
        ]
    )  # [B, V, 3, R, R]


def _randomise_up(net, seed=0):
    """Non-zero up-projections (as after training), drawn from a local generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".up." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _sha(state_dict):
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- 1. at initialisation the model is frozen CLIP -----------------------------------------


def test_at_initialisation_it_is_frozen_clip(train_clip_dir, toy_task):
    bb = load_backbone(train_clip_dir, device="cpu")
    ref = load_backbone(train_clip_dir, device="cpu")  # a second copy that never had hooks
    labels = _labels(2)
    net = _net(bb, labels, **FAST)
    texts = [t for row in labels.prompt_texts() for t in row]
    views = _views(toy_task, bb)
    with torch.no_grad():
        torch.testing.assert_close(
            net.class_embeddings(labels), ref.encode_text(texts).view(5, 3, -1), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            net.embed_views(views),
            ref.encode_images(views.flatten(0, 1)).view(3, 4, -1),
            atol=1e-6,
            rtol=0,
        )
    batch = TrainBatch(views, torch.tensor([0, 1, 2]), 0, 0, torch.Generator().manual_seed(0))
    terms = net.training_loss(batch).terms
    # zero up: adapted == frozen; only the autograd path's attention kernel differs (~1e-7)
    assert terms["l1_image"].item() < 1e-5 and terms["l1_text"].item() < 1e-5, terms

    images = [str(p) for p in sorted((toy_task.root / "test").rglob("*.png"))[::5]]
    vc = ViewConfig(n_views=4)
    got = Classifier(net, labels, scorer="awt", view_config=vc).scores(images)
    bicubic = dataclasses.replace(vc, crop_interpolation="bicubic")  # the adapter's test crops
    zero_shot = Classifier(ClipEmbedder(ref), labels, scorer="awt", view_config=bicubic).scores(
        images
    )
    torch.testing.assert_close(got, zero_shot, rtol=1e-5, atol=1e-5 * zero_shot.abs().max().item())


# -- 2. sizes from the towers, the paper's defaults ---------------------------------------


def _shapes(adapters: BranchAdapters):
    return [
        (tuple(a.down.weight.shape), tuple(a.up.weight.shape))
        for a in (*adapters.attn, *adapters.mlp)
    ]


def test_adapter_sizes_follow_each_towers_depth_and_width(train_clip_dir, tmp_path):
    bb = load_backbone(train_clip_dir, device="cpu")
    v, t = TRAIN_MODEL_CFG["vision_cfg"], TRAIN_MODEL_CFG["text_cfg"]
    net = _net(bb, _labels())  # down rate 384: hidden max(1, 64 // 384) = 1
    assert (net.visual_adapters.depth, net.visual_adapters.width) == (v["layers"], v["width"])
    assert (net.text_adapters.depth, net.text_adapters.width) == (t["layers"], t["width"])
    assert _shapes(net.visual_adapters) == [((1, 64), (64, 1))] * 4
    net16 = _net(bb, _labels(), down_rate=16)
    assert _shapes(net16.text_adapters) == [((4, 64), (64, 4))] * 4
    # every adapter parameter is learned (scale included), nothing of CLIP
    assert len(net16.learned_state()) == 2 * 2 * 2 * 5  # towers x blocks x branches x tensors
    assert all(
        n.split(".")[0] in ("visual_adapters", "text_adapters") for n in net16.learned_state()
    )

    # towers of different depth and width: each sized from its own
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 3,
            "width": 48,
            "head_width": 16,
            "patch_size": 8,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = open_clip.CLIP(**cfg).state_dict()
    other = load_backbone(
        f"local-dir:{write_local_dir(tmp_path / 'm', state, model_cfg=cfg)}", device="cpu"
    )
    net = _net(other, _labels(), down_rate=8)
    assert _shapes(net.visual_adapters) == [((6, 48), (48, 6))] * 6
    assert _shapes(net.text_adapters) == [((4, 32), (32, 4))] * 2


class _Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.ln_1, self.ls_1, self.ls_2 = nn.LayerNorm(width), nn.Identity(), nn.Identity()


class _Tower(nn.Module):
    def __init__(self, width, layers):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(_Block(width) for _ in range(layers))


def test_vit_b16_sizes_and_defaults_are_the_papers():
    def count(down_rate):
        n = 0
        for width in (768, 512):  # ViT-B/16 image and text towers, 12 blocks each
            n += sum(
                p.numel()
                for p in BranchAdapters(tower_blocks(_Tower(width, 12)), down_rate).parameters()
            )
        return n

    # 24 adapters per tower; hidden 2 / 1 at rate 384, 3 / 2 at 256 (the paper's 0.13M / 0.19M)
    assert count(384) == 24 * (768 * 2 * 2 + 2 + 768 + 1) + 24 * (512 * 1 * 2 + 1 + 512 + 1)
    assert count(384) == 129144 and count(256) == 190632
    assert [SPEC.default_config(s).down_rate for s in (1, 2, 4, 8, 16)] == [384] * 3 + [256] * 2
    for shots, (lr, epochs) in {
        1: (0.002, 20),
        4: (0.002, 20),
        8: (0.008, 25),
        16: (0.008, 25),
    }.items():
        t = SPEC.train_defaults(shots, None)
        assert (t.lr, t.epochs, t.batch_size, t.optimizer) == (lr, epochs, 16, "sgd")
        assert (t.momentum, t.weight_decay) == (0.9, 5e-4)
        assert (t.warmup_epochs, t.warmup, t.warmup_lr) == (5, "linear", 1e-5)
    c = SPEC.config()
    assert (c.train_views, c.prompts_per_step, c.l1_image_weight, c.l1_text_weight) == (
        8,
        8,
        10,
        25,
    )
    assert (c.train_view_temperature, c.train_prompt_temperature, c.learn_scale) == (1, 1, True)
    assert SPEC.needs_descriptions


def test_training_views_are_eight_augmented_bicubic_crops(train_clip_dir):
    net = _net(load_backbone(train_clip_dir, device="cpu"), _labels())
    vc = net.training_view_config(ViewConfig(seed=3))
    assert (vc.n_views, vc.raw_view, vc.crop_interpolation, vc.seed) == (8, False, "bicubic", 3)


# -- 3. the loss, the subset draw and the gradient path ----------------------------------


def test_step_prompts_are_one_subset_from_the_steps_generator(train_clip_dir):
    net = _net(load_backbone(train_clip_dir, device="cpu"), _labels(5), prompts_per_step=3)
    rng = torch.random.get_rng_state()
    draws = [tuple(net.step_prompts(torch.Generator().manual_seed(s))) for s in range(20)]
    assert torch.equal(torch.random.get_rng_state(), rng)  # never the global RNG
    assert all(d[0] == 0 and len(set(d[1:])) == 2 and set(d[1:]) <= {1, 2, 3, 4, 5} for d in draws)
    assert len(set(draws)) > 3  # the subset changes from step to step
    assert draws[7] == tuple(net.step_prompts(torch.Generator().manual_seed(7)))
    few = _net(net.backbone, _labels(1), prompts_per_step=8)
    assert few.step_prompts(torch.Generator().manual_seed(0)) == [0, 1]  # all there are


def test_loss_is_awt_at_training_temperatures_plus_l1_to_frozen_clip(train_clip_dir, toy_task):
    bb = load_backbone(train_clip_dir, device="cpu")
    ref = load_backbone(train_clip_dir, device="cpu")
    labels = _labels(5)
    net = _net(bb, labels, prompts_per_step=3)
    _randomise_up(net)  # adapted != frozen, so every term is non-trivial
    views = _views(toy_task, bb)
    y = torch.tensor([2, 0, 4])
    out = net.training_loss(TrainBatch(views, y, 0, 0, torch.Generator().manual_seed(11)))
    chosen = net.step_prompts(torch.Generator().manual_seed(11))  # the same draw

    with torch.no_grad():
        img = net.embed_views(views)  # [3, 4, D] adapted
        txt = net.class_embeddings(labels)[:, chosen]  # [5, 3, D] adapted, the step's prompts
        img_f = ref.encode_images(views.flatten(0, 1)).view(3, 4, -1)
        texts = [row[p] for row in labels.prompt_texts() for p in chosen]
        txt_f = ref.encode_text(texts).view(5, 3, -1)
        # a shared backbone still gives frozen CLIP outside the model's own calls
        torch.testing.assert_close(ClipEmbedder(bb).embed_views(views), img_f, atol=1e-6, rtol=0)
    s = net.logit_scale
    expect_ce = F.cross_entropy(
        torch.from_numpy(ref_awt_scores(img.numpy(), txt.numpy(), s, tv=1.0, tp=1.0)), y.long()
    )
    test_time_ce = F.cross_entropy(
        torch.from_numpy(ref_awt_scores(img.numpy(), txt.numpy(), s, tv=0.5, tp=0.5)), y.long()
    )
    assert abs(expect_ce - test_time_ce) > 1e-3  # the temperatures are told apart
    assert out.terms["ce"].item() == pytest.approx(expect_ce.item(), rel=1e-4)
    assert out.terms["l1_image"].item() == pytest.approx(
        10 * (img - img_f).abs().mean().item(), rel=1e-4
    )
    assert out.terms["l1_text"].item() == pytest.approx(
        25 * (txt - txt_f).abs().mean().item(), rel=1e-4
    )
    assert out.terms["l1_image"].item() > 1e-3 and out.terms["l1_text"].item() > 1e-3
    total = out.terms["ce"] + out.terms["l1_image"] + out.terms["l1_text"]
    assert out.total.item() == pytest.approx(total.item(), rel=1e-6)


def test_plan_has_no_gradient_and_only_the_adapters_learn(train_clip_dir, toy_task, monkeypatch):
    bb = load_backbone(train_clip_dir, device="cpu")
    net = _net(bb, _labels(), down_rate=16, **FAST)
    plans = []
    real = scoring.solvers._plan_t

    def spy(*args):
        plans.append(real(*args))
        return plans[-1]

    monkeypatch.setattr(scoring.solvers, "_plan_t", spy)
    views = _views(toy_task, bb)
    batch = TrainBatch(views, torch.tensor([0, 1, 2]), 0, 0, torch.Generator().manual_seed(0))
    out = net.training_loss(batch)
    assert plans and not any(T.requires_grad for T in plans)  # the transport plan: no gradient
    assert out.terms["ce"].requires_grad  # ... yet the score carries one, through the logits
    out.terms["ce"].backward()  # the AWT term alone (the L1 terms are 0 here)
    grads = {n: p.grad for n, p in net.named_parameters()}
    # zero up: only up gets a gradient on the first step, in both towers
    for n, gr in grads.items():
        moved = gr is not None and gr.abs().sum() > 0
        assert moved == (".up." in n), n
    assert all(p.grad is None for p in bb.model.parameters())

    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    opt.step()
    opt.zero_grad()
    net.training_loss(batch).total.backward()
    # after one step down and scale follow: every adapter parameter of both towers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters()), [
        n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0
    ]
    assert all(p.grad is None and not p.requires_grad for p in bb.model.parameters())


def test_descriptions_are_required_unless_training_on_bare_prompts(
    train_clip_dir, toy_task, tmp_path
):
    bb = load_backbone(train_clip_dir, device="cpu")
    with pytest.raises(ValueError, match=r"awt-engine describe.*prompts_per_step=1"):
        _net(bb, LabelSet(TOY_CLASSES))
    with pytest.raises(ValueError, match="awt-engine describe"):  # train() without --dataset
        train(
            "awt-adapter",
            data_root=toy_task.root,
            output=tmp_path / "x.safetensors",
            shots=1,
            model=train_clip_dir,
            backbone=bb,
            device="cpu",
            epochs=1,
        )
    bare = _net(bb, LabelSet(TOY_CLASSES), prompts_per_step=1, train_views=2)
    views = _views(toy_task, bb, n_images=2, n_views=2)

    def loss():
        batch = TrainBatch(views, torch.tensor([0, 1]), 0, 0, torch.Generator())
        return bare.training_loss(batch).total

    first = loss()
    assert torch.isfinite(first) and float(first) > 0
    first.backward()
    with torch.no_grad():  # a small step down the gradient lowers the loss on the same batch
        for p in bare.parameters():
            if p.requires_grad and p.grad is not None:
                p -= 1e-3 * p.grad
    assert float(loss()) < float(first)


# -- 4. learning the toy task; 5. the checkpoint in a fresh process ----------------------


@dataclass
class Run:
    done: object
    backbone: object
    clip_sha: tuple[str, str]  # CLIP's state dict before / after training
    rng: tuple[torch.Tensor, torch.Tensor]  # the global torch RNG before / after


@pytest.fixture(scope="module")
def toy_run(toy_task, train_clip_dir, tmp_path_factory):
    """The toy task with descriptions (a registered data set and its description cache),
    trained once with the adapter."""
    root = tmp_path_factory.mktemp("awt-adapter")
    register_dataset(DatasetInfo(TOY, "a photo of a {}", "toy colours with stripes", None))
    try:
        cache = root / "cache"
        save_descriptions(from_plain(DESCRIPTIONS, TOY), descriptions_path(TOY, cache))
        bb = load_backbone(train_clip_dir, device="cpu")
        sha, rng = _sha(bb.model.state_dict()), torch.random.get_rng_state()
        done = train(
            "awt-adapter",
            data_root=toy_task.root,
            output=root / "adapter.safetensors",
            dataset=TOY,
            cache_dir=cache,
            descriptions=3,
            shots=4,
            seed=1,
            model=train_clip_dir,
            backbone=bb,
            device="cpu",
            epochs=20,
            lr=0.05,
            batch_size=4,
            # tiny views, a larger adapter, a short warm-up; the L1 weights at a fifth of
            # AWT's (same 10:25 ratio) so the random tiny CLIP can move far enough
            options={
                **FAST,
                "down_rate": "8",
                "warmup_epochs": "1",
                "l1_image_weight": "2",
                "l1_text_weight": "5",
            },
        )
        yield Run(done, bb, (sha, _sha(bb.model.state_dict())), (rng, torch.random.get_rng_state()))
    finally:
        unregister_dataset(TOY)


def test_training_learns_the_toy_task_through_awt(toy_run, toy_task, train_clip_dir):
    done = toy_run.done
    r = done.result
    assert r.last_loss < r.first_loss / 2, r.losses
    assert toy_run.clip_sha[0] == toy_run.clip_sha[1]  # CLIP untouched
    assert torch.equal(*toy_run.rng)  # nothing drew from the global RNG
    assert done.header["method_config"]["down_rate"] == 8 and done.header["labels"]["descriptions"]

    test = load_labelled(toy_task.root, split="test")
    labels = labels_from_record(done.header["labels"])
    vc = ViewConfig(n_views=8)

    def accuracy(model):
        clf = Classifier(model, labels, scorer="awt", view_config=vc)
        return evaluate(clf, test, ["awt"], cache_root=None).metrics["awt"].acc1

    zero_shot = accuracy(ClipEmbedder(load_backbone(train_clip_dir, device="cpu")))
    trained = accuracy(load_trained(done.path, device="cpu"))
    assert trained >= zero_shot + 0.3, (zero_shot, trained)


def test_checkpoint_scores_the_same_in_a_fresh_process(toy_run, toy_task, tmp_path):
    out = toy_run.done.path
    test = [str(p) for p in sorted((toy_task.root / "test").rglob("*.png"))[:6]]
    here = {
        s: awt_engine.create_classifier(checkpoint=out, device="cpu", views=3, scorer=s).scores(
            test
        )
        for s in ("awt", "clip")
    }
    code = (
        "import sys, torch, awt_engine\n"
        "torch.set_num_threads(2)\n"
        "torch.save({s: awt_engine.create_classifier(checkpoint=sys.argv[1], device='cpu', "
        "views=3, scorer=s).scores(sys.argv[3:]) for s in ('awt', 'clip')}, sys.argv[2])\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(out), str(tmp_path / "s.pt"), *test], check=True
    )
    there = torch.load(tmp_path / "s.pt")
    for s in ("awt", "clip"):
        assert here[s].shape == (6, len(TOY_CLASSES)) and torch.isfinite(here[s]).all()
        assert torch.equal(there[s], here[s]), s
    assert not torch.equal(here["awt"], here["clip"])


def test_scores_are_float32_under_the_loops_autocast(train_clip_dir, toy_task, monkeypatch):
    bb = load_backbone(train_clip_dir, device="cpu")
    net = _net(bb, _labels(), down_rate=16, **FAST)
    _randomise_up(net)
    seen = []
    real = scoring.awt_solve

    def spy(img, txt, scale, **kw):
        out = real(img, txt, scale, **kw)
        seen.append((img.detach(), txt.detach(), scale, out.scores.detach()))
        return out

    monkeypatch.setattr(scoring, "awt_solve", spy)
    batch = TrainBatch(
        _views(toy_task, bb), torch.tensor([0, 1, 2]), 0, 0, torch.Generator().manual_seed(0)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as fit() runs a step on CUDA (fp16)
        net.training_loss(batch)
    img, txt, scale, scores = seen[0]
    expect = ref_awt_scores(img.double().numpy(), txt.double().numpy(), scale, tv=1.0, tp=1.0)
    np.testing.assert_allclose(scores.double().numpy(), expect, rtol=1e-4)
