"""Recipes against the official code: eP-ALM's timm schedule and optimizer groups, its
augmentation and precision, LLaMP's gradient clipping, CLAMP's zero-shot scale, the AWT
adapter's evaluation crops, CoOp's phrase init with class-specific contexts.

Every official value is written out here with its source (repository @ commit, path, line),
and schedules are recomputed from a plain re-statement of the official scheduler.
"""

import math

import pytest
import torch

from awt_engine.methods import get_method
from awt_engine.methods.train_config import Schedule, TrainConfig, lr_at

# ------------------------------------------------------------------------------------------
# eP-ALM's schedule: mshukor/eP-ALM @ 9ecfeb9acf
#   configs/image/ePALM_caption.yaml:11  schedular: {sched: cosine, scheduler_groups: 0,
#       lr: 2e-5, epochs: 8, min_lr: 1e-6, decay_rate: 1, warmup_lr: 1e-5, warmup_epochs: 4}
#   scheduler/scheduler_factory.py:29-44  CosineLRScheduler(t_initial=epochs, lr_min=min_lr,
#       warmup_lr_init=warmup_lr, warmup_t=warmup_epochs, t_in_epochs=True, scheduler_groups)
#   scheduler/cosine_lr.py:60-95  _get_lr(t)
#   float32/caption.py:45-46,98-99  step_size = 100; warmup_iterations = warmup_steps*step_size;
#       after iteration i of epoch 0: if i % step_size == 0 and i <= warmup_iterations:
#       scheduler.step(i // step_size)
#   float32/caption.py:310-312  each epoch > 0 starts with lr_scheduler.step(epoch + warmup_steps)
# ------------------------------------------------------------------------------------------


def timm_cosine_lr(t, base, *, t_initial=8, lr_min=1e-6, warmup_t=4, warmup_lr_init=1e-5):
    """timm's CosineLRScheduler._get_lr for one group (t_mul 1, decay_rate 1, cycle_limit
    1, warmup_prefix True), written out."""
    if t < warmup_t:
        return warmup_lr_init + t * (base - warmup_lr_init) / warmup_t
    t = t - warmup_t
    if t >= t_initial:  # past the single cycle
        return lr_min
    return lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * t / t_initial))


def official_epalm_lrs(steps_per_epoch, epochs=8, base=2e-5, constant=2e-5):
    """The (scheduled group 0, unscheduled group 1) rates each iteration of eP-ALM's
    caption training runs at: the loop of float32/caption.py replayed."""
    g0, g1 = timm_cosine_lr(0, base), constant  # __init__ sets group 0 to warmup_lr_init
    out = []
    for epoch in range(epochs):
        if epoch > 0:
            g0 = timm_cosine_lr(epoch + 4, base)
        for i in range(steps_per_epoch):
            out.append((epoch, i, g0, g1))  # the optimizer step of iteration i
            if epoch == 0 and i % 100 == 0 and i <= 4 * 100:
                g0 = timm_cosine_lr(i // 100, base)
    return out


def test_epalm_default_schedule_is_timms_with_its_warmup_stairs_inside_epoch_0():
    t = get_method("epalm").train_defaults(16, None)
    s = t.schedule
    for steps in (450, 7):  # warm-up done inside epoch 0; a few-shot epoch shorter than it
        for epoch, i, g0, _ in official_epalm_lrs(steps):
            assert lr_at(s, epoch, i) == pytest.approx(g0, rel=1e-12), (steps, epoch, i)
    # the per-epoch rates once warmed up, as the issue quotes them (e-5)
    per_epoch = [lr_at(s, e, 500) / 1e-5 for e in range(8)]
    assert [round(x, 2) for x in per_epoch] == [2.0, 1.93, 1.72, 1.41, 1.05, 0.69, 0.38, 0.17]
    # the warm-up ramp: iterations 0-100 at 1e-5, then 1.25, 1.5, 1.75, from 401 on 2e-5
    ramp = {0: 1.0, 100: 1.0, 101: 1.25, 200: 1.25, 201: 1.5, 301: 1.75, 400: 1.75, 401: 2.0}
    for i, v in ramp.items():
        assert lr_at(s, 0, i) == pytest.approx(v * 1e-5, rel=1e-12), i
    assert (t.precision, t.batch_size, t.weight_decay, t.optimizer) == ("fp32", 16, 0.02, "adamw")


def test_dassl_schedules_do_not_depend_on_the_step():
    for s in (
        Schedule(0.002, 10, warmup_epochs=1, warmup="constant", warmup_lr=1e-5),
        Schedule(0.008, 25, warmup_epochs=5, warmup="linear", warmup_lr=1e-5),
        Schedule(1.0, 4, warmup_epochs=0, warmup="none", min_lr=0.3),
    ):
        for e in range(s.epochs):
            assert {lr_at(s, e, k) for k in (0, 1, 401, 10_000)} == {lr_at(s, e)}


def test_anneal_mode_is_torchs_eta_min_and_clamp_stays_the_floor():
    lr, E, low = 0.5, 6, 0.05
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, E, eta_min=low)
    expect = []
    for _ in range(E):
        expect.append(opt.param_groups[0]["lr"])
        opt.step()
        cos.step()
    s = Schedule(lr, E, warmup_epochs=0, warmup="none", min_lr=low, min_lr_mode="anneal")
    assert [lr_at(s, e) for e in range(E)] == pytest.approx(expect, rel=1e-12)
    clamp = Schedule(lr, E, warmup_epochs=0, warmup="none", min_lr=low)
    assert lr_at(clamp, 5) == max(low, 0.5 * lr * (1 + math.cos(math.pi * 5 / E)))


def test_iteration_warmup_settings_are_checked():
    with pytest.raises(ValueError, match="iteration warm-up"):
        Schedule(1.0, 4, warmup_epochs=3, warmup="linear", warmup_iters=400)
    with pytest.raises(ValueError, match="iteration warm-up"):
        Schedule(1.0, 4, warmup_epochs=4, warmup="constant", warmup_iters=400)
    with pytest.raises(ValueError, match="warmup_iters"):
        TrainConfig(epochs=1, lr=1.0, batch_size=1, warmup_iters=-1)
    with pytest.raises(ValueError, match="min_lr_mode"):
        TrainConfig(epochs=1, lr=1.0, batch_size=1, min_lr_mode="floor")


class _Two(torch.nn.Module):
    """A stand-in for the fit loop's lr block: a scheduled and an unscheduled group."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(2))
        self.b = torch.nn.Parameter(torch.zeros(2, 2))

    def param_groups(self, lr):
        return [{"params": [self.a], "lr": lr}, {"params": [self.b], "lr": lr, "scheduled": False}]


def test_the_fit_loop_sets_each_steps_rate_and_skips_unscheduled_groups(monkeypatch):
    """fit's own lr block, run over a fake step that records the groups' rates."""
    from awt_engine.training import loop

    config = get_method("epalm").train_defaults(16, None)
    model = _Two()
    optimizer = loop.make_optimizer(model, config)
    seen = []

    def fake_step(model, batch, amp, optimizer, scaler, config, diverged, lr):
        seen.append(tuple(g["lr"] for g in optimizer.param_groups))
        return {"total": 1.0}

    _run_lr_block(monkeypatch, loop, model, optimizer, config, fake_step, steps=9)
    expect = [x for _, _, g0, g1 in official_epalm_lrs(9) for x in (g0, g1)]
    assert [x for pair in seen for x in pair] == pytest.approx(expect, rel=1e-12)


def _run_lr_block(monkeypatch, loop, model, optimizer, config, fake_step, steps):
    """Drive ``loop.fit`` with everything but its lr block stubbed: ``steps`` per epoch."""
    from types import SimpleNamespace

    model.method, model.device, model.preprocess = (
        "two",
        torch.device("cpu"),
        SimpleNamespace(size=8),
    )
    model.training_view_config = lambda base: base
    model.learned_state = lambda: {}
    items = [SimpleNamespace(label=0, path=f"{k}.png") for k in range(steps)]
    data = SimpleNamespace(items=items, name="fake")
    monkeypatch.setattr(loop, "make_optimizer", lambda m, c: optimizer)
    monkeypatch.setattr(loop, "_step", fake_step)
    monkeypatch.setattr(loop, "_batch", lambda *a, **k: None)
    monkeypatch.setattr(loop, "_after_update", lambda *a: None)
    loop.fit(model, data, TrainConfig(**{**vars(config), "batch_size": 1}))


# ------------------------------------------------------------------------------------------
# eP-ALM's augmentation: mshukor/eP-ALM @ 9ecfeb9acf dataset/caption.py:54-60
#   RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=BICUBIC),
#   RandomHorizontalFlip(), RandomAugment(2, 7, isPIL=True, augs=[Identity, AutoContrast,
#   Equalize, Brightness, Sharpness, ShearX, ShearY, TranslateX, TranslateY, Rotate])
# dataset/randaugment.py:209-266 (levels at MAX_LEVEL 10), 312-330 (N choices, prob 0.5)
# ------------------------------------------------------------------------------------------

ALBEF_LEVELS_AT_7 = {  # |level| of each op at magnitude 7, from the level_to_args functions
    "Identity": 0.0,
    "AutoContrast": 0.0,
    "Equalize": 0.0,
    "Brightness": 7 / 10 * 1.8 + 0.1,  # enhance_level_to_args
    "Sharpness": 7 / 10 * 1.8 + 0.1,
    "ShearX": 7 / 10 * 0.3,  # shear_level_to_args
    "ShearY": 7 / 10 * 0.3,
    "TranslateX": 7 / 10 * 10,  # translate_level_to_args, translate_const 10
    "TranslateY": 7 / 10 * 10,
    "Rotate": 7 / 10 * 30,  # rotate_level_to_args
}


def test_epalm_trains_on_its_official_crops_flip_and_randaugment():
    from types import SimpleNamespace

    from awt_engine.inputs.views import ViewConfig
    from awt_engine.methods._epalm_config import EPALMConfig
    from awt_engine.methods.epalm import EPALM

    net = SimpleNamespace(config=EPALMConfig())
    v = EPALM.training_view_config(net, ViewConfig())
    assert (v.n_views, v.raw_view, v.scale, v.ratio, v.flip_p) == (
        1, False, (0.5, 1.0), (3 / 4, 4 / 3), 0.5
    )  # fmt: skip
    assert (v.crop_interpolation, v.randaugment) == ("bicubic", (2, 7))
    off = EPALM.training_view_config(SimpleNamespace(config=EPALMConfig(randaugment=False)), v)
    assert off.randaugment == (0, 0)


def test_randaugment_draws_albefs_ops_and_levels_from_the_views_generator():
    from awt_engine.inputs.randaugment import OPS, draw_ops

    assert set(OPS) == set(ALBEF_LEVELS_AT_7)
    g = torch.Generator().manual_seed(0)
    before = torch.random.get_rng_state()
    drawn = [draw_ops(2, 7, g) for _ in range(4000)]
    assert torch.equal(torch.random.get_rng_state(), before)  # never the global RNG
    applied = [op for ops in drawn for op in ops]
    assert 0.45 < len(applied) / (2 * len(drawn)) < 0.55  # each of the 2 ops: p 0.5
    for name, level in applied:
        assert abs(level) == pytest.approx(ALBEF_LEVELS_AT_7[name], rel=1e-12), name
    signed = [lv for n, lv in applied if n in ("ShearX", "Rotate", "TranslateY")]
    assert 0.4 < sum(lv < 0 for lv in signed) / len(signed) < 0.6
    assert {n for n, _ in applied} == set(OPS)
    assert draw_ops(2, 7, torch.Generator().manual_seed(5)) == draw_ops(
        2, 7, torch.Generator().manual_seed(5)
    )


def test_randaugment_brightness_is_albefs_clipped_scaling():
    from awt_engine.inputs.randaugment import apply_op

    x = torch.arange(3 * 16 * 16).reshape(3, 16, 16).remainder(256).to(torch.uint8)
    out = apply_op(x, "Brightness", 1.36)
    ref = [min(255.0, float(v) * 1.36) for v in x.flatten().tolist()]  # brightness_func
    assert max(abs(a - b) for a, b in zip(out.flatten().tolist(), ref, strict=True)) <= 1.0


def test_randaugment_views_are_seeded_and_keep_the_crop_boxes():
    from awt_engine.inputs.views import ViewConfig, make_views, view_boxes
    from awt_engine.models.base import PreprocessConfig

    pre = PreprocessConfig(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic")
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (3, 48, 40), generator=g, dtype=torch.uint8)
    plain = ViewConfig(n_views=6, raw_view=True)
    aug = ViewConfig(n_views=6, raw_view=True, randaugment=(2, 7))
    assert torch.equal(view_boxes(img, pre, plain), view_boxes(img, pre, aug))
    before = torch.random.get_rng_state()
    a, b = make_views(img, pre, aug), make_views(img, pre, aug)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a, b)  # the same seed, the same views
    p = make_views(img, pre, plain)
    assert torch.equal(a[0], p[0])  # view 0 is never augmented
    assert not torch.equal(a[1:], p[1:])
    assert not torch.equal(make_views(img, pre, aug, seed=7), make_views(img, pre, aug, seed=8))
    with pytest.raises(ValueError, match="randaugment"):
        ViewConfig(randaugment=(2, 11))


def test_llamp_clips_gradients_at_1_as_its_deepspeed_config():
    # zhaohengz/LLaMP @ 3dec7f34be deepspeed_config/zero2_a100_40g.json:22
    #   "gradient_clipping": 1.0 (scripts/launch/launch_fewshot.sh passes this config)
    for shots in (1, 16):
        assert get_method("llamp").train_defaults(shots, None).grad_clip == 1.0


# ------------------------------------------------------------------------------------------
# CLAMP's zero-shot scale: piotr-teterwak/clamp @ fabb9a9c1d src/training/zero_shot.py:32
#   logits = 100. * image_features @ classifier
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clamp_lm(tmp_path_factory) -> str:
    from tests.fixtures_llm import build_tiny_chat_model

    return str(build_tiny_chat_model(tmp_path_factory.mktemp("recipes-lm"), hidden=64))


def test_clamp_scores_at_its_zero_shot_100_and_the_learned_scale_on_request(
    train_clip_dir, clamp_lm
):
    from awt_engine.backbone import load_backbone
    from awt_engine.classifier import Classifier
    from awt_engine.labels import LabelSet

    spec = get_method("clamp")
    tiny = {"llm": clamp_lm, "n_prompt_tokens": 2, "lora_r": 2, "pool_heads": 4}
    backbone = load_backbone(train_clip_dir, device="cpu")
    labels = LabelSet(("amber", "cobalt"))
    views = torch.randn(2, 1, 3, backbone.preprocess.size, backbone.preprocess.size)
    for scale, expect in ((100.0, 100.0), (None, 30.0)):
        net = spec.build(backbone, spec.config(**tiny, score_scale=scale))
        net.prepare(labels, seed=0)
        with torch.no_grad():
            net.log_scale.fill_(math.log(30.0))  # a learned scale other than 100
        assert net.logit_scale == pytest.approx(expect, rel=1e-6)
        with torch.no_grad():
            img = net.embed_views(views)[:, 0].double()  # [B, D]
            txt = net.class_embeddings(labels)[:, 0].double()  # [C, D]
            got = Classifier(net, labels, scorer="clip").scores_for_views(views)["clip"]
        torch.testing.assert_close(got.double(), expect * img @ txt.T, atol=1e-3, rtol=1e-5)
    assert spec.config().score_scale == 100.0


# ------------------------------------------------------------------------------------------
# AWT adapter's test-time crops: MCG-NJU/AWT @ b2b49a8fd9
#   AWT_few_shot/MM_Adapter/configs/trainers/AWT/vit_b16_8_16_shot.yaml:11 INTERPOLATION: "bicubic"
#   AWT_few_shot/Dassl.pytorch/dassl/data/data_manager.py:270-285 test views 1.. are tfm_train
# ------------------------------------------------------------------------------------------


def test_adapter_checkpoints_evaluate_on_bicubic_crops_and_plain_clip_on_bilinear(
    train_clip_dir, toy_task, tmp_path
):
    import awt_engine
    from awt_engine.training import train

    out = tmp_path / "adapter.safetensors"
    train(
        "awt-adapter", data_root=toy_task.root, output=out, shots=1, model=train_clip_dir,
        device="cpu", epochs=1, batch_size=4, options={"train_views": 2, "prompts_per_step": 1},
    )  # fmt: skip
    adapter = awt_engine.create_classifier(checkpoint=out, device="cpu", views=4)
    assert adapter.view_config.crop_interpolation == "bicubic"
    clip = awt_engine.create_classifier(
        model=train_clip_dir, pretrained=None, device="cpu", views=4, classes=["a", "b"]
    )
    assert clip.view_config.crop_interpolation == "bilinear"


# ------------------------------------------------------------------------------------------
# CoOp's phrase init with CSC: KaiyangZhou/CoOp @ ff61507c79 trainers/coop.py:72-88 ignores
# CSC when CTX_INIT is given (one generic context); here --csc with a phrase gives every
# class its own copy of the phrase (chosen: the flag is honoured; leave it off for CoOp's)
# ------------------------------------------------------------------------------------------


def test_coop_phrase_with_csc_starts_every_class_from_the_phrase(train_clip_dir):
    from awt_engine.backbone import load_backbone
    from awt_engine.labels import LabelSet

    spec = get_method("coop")
    bb = load_backbone(train_clip_dir, device="cpu")
    labels = LabelSet(("amber", "cobalt", "copper"))
    csc = spec.build(bb, spec.config(ctx_init="a photo of a", csc=True))
    csc.prepare(labels, seed=0)
    generic = spec.build(bb, spec.config(ctx_init="a photo of a"))
    generic.prepare(labels, seed=0)
    phrase = generic.text.word_embeddings(generic.text.encode_words("a photo of a"))  # [4, W]
    assert tuple(generic.ctx.shape) == tuple(phrase.shape)  # CoOp's: one generic context
    assert tuple(csc.ctx.shape) == (3, *phrase.shape)
    for c in range(3):
        assert torch.equal(csc.ctx[c].detach().cpu(), phrase.detach().cpu())
    with torch.no_grad():  # equal at initialisation: the choice changes only what learns
        torch.testing.assert_close(csc.class_embeddings(labels), generic.class_embeddings(labels))


def test_clip_lora_anneals_to_its_eta_min_as_torchs_cosine():
    # MaxZanella/CLIP-LoRA @ 358f0d7 lora.py:76 CosineAnnealingLR(optimizer, total_iters,
    # eta_min=1e-6), lora.py:122 scheduler.step() per iteration;
    # per epoch here, with the same end points
    t = get_method("clip-lora").train_defaults(4, None)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=t.lr)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, t.epochs, eta_min=1e-6)
    expect = []
    for _ in range(t.epochs):
        expect.append(opt.param_groups[0]["lr"])
        opt.step()
        cos.step()
    assert [lr_at(t.schedule, e) for e in range(t.epochs)] == pytest.approx(expect, rel=1e-9)
