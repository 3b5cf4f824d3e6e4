"""The training core: data draws, schedule, one fit loop, checkpoints, resume."""

import hashlib
import math
import random
import subprocess
import sys

import pytest
import torch

from awt_engine.backbone import load_backbone
from awt_engine.labelled import load_labelled
from awt_engine.labels import LabelSet
from awt_engine.methods import get_method, list_methods
from awt_engine.methods.train_config import Schedule, lr_at
from awt_engine.training import CheckpointError, load_trained, train
from awt_engine.training.data import few_shot, fingerprint, subsample_classes
from awt_engine.training.loop import TrainConfig, fit

CSC = {"csc": "true", "n_ctx": "4"}


def test_methods_are_registered():
    assert {"coop", "lamm", "awt-adapter"} <= set(list_methods())
    with pytest.raises(ValueError, match=r"unknown method 'coco'.*coop"):
        get_method("coco")


def test_schedule_is_dassls_warmup_then_cosine():
    lr, E = 0.002, 10
    s = Schedule(lr, E, warmup_epochs=1, warmup="constant", warmup_lr=1e-5)
    # torch's own cosine annealing, stepped once per epoch after the warm-up (recount)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, E)
    expect = [1e-5]
    for _ in range(E - 1):
        expect.append(opt.param_groups[0]["lr"])
        opt.step()
        cos.step()
    assert [lr_at(s, e) for e in range(E)] == pytest.approx(expect, rel=1e-12)
    lin = Schedule(0.008, 25, warmup_epochs=5, warmup="linear", warmup_lr=1e-5)
    assert [lr_at(lin, e) for e in range(6)] == pytest.approx(
        [1e-5, 0.008 / 5, 2 * 0.008 / 5, 3 * 0.008 / 5, 4 * 0.008 / 5, 0.008]
    )
    floor = Schedule(1.0, 4, warmup_epochs=0, warmup="none", min_lr=0.3)
    assert lr_at(floor, 3) == pytest.approx(max(0.3, 0.5 * (1 + math.cos(math.pi * 3 / 4))))


def test_few_shot_draw_is_the_seeds_alone(toy_task):
    data = load_labelled(toy_task.root, split="train")
    a = few_shot(data, 2, seed=1)
    random.seed(123)
    torch.manual_seed(123)
    b = few_shot(data, 2, seed=1)  # the global RNGs play no part
    assert a.items == b.items
    counts = {c: sum(it.label == c for it in a.items) for c in range(len(data.classes))}
    assert set(counts.values()) == {2}
    assert few_shot(data, 2, seed=2).items != a.items
    assert len(few_shot(data, 99, seed=1).items) == len(data.items)  # fewer: all kept
    with pytest.raises(ValueError, match="shots"):
        few_shot(data, 0, seed=1)


def test_base_new_split_is_coops(toy_task):
    data = load_labelled(toy_task.root, split="train")  # 5 classes
    base, new = subsample_classes(data, "base"), subsample_classes(data, "new")
    assert base.classes == data.classes[:3] and new.classes == data.classes[3:]
    assert {it.label for it in base.items} == {0, 1, 2} and {it.label for it in new.items} == {0, 1}
    by_path = {it.path: data.classes[it.label] for it in data.items}
    assert all(by_path[it.path] == new.classes[it.label] for it in new.items)
    assert subsample_classes(data, "all") is data


def test_fingerprint_follows_content_and_labels(toy_task, tmp_path):
    data = load_labelled(toy_task.root, split="train")
    fp = fingerprint(data)
    assert fp == fingerprint(load_labelled(toy_task.root, split="train"))
    assert fp != fingerprint(few_shot(data, 1, seed=0))


def _sha(state_dict):
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _model(train_clip_dir, labels, **cfg):
    spec = get_method("coop")
    bb = load_backbone(train_clip_dir, device="cpu")
    net = spec.build(bb, spec.config(**cfg))
    net.prepare(labels, seed=1)
    return bb, net


def test_resume_after_an_interruption_ends_with_the_same_weights(
    toy_task, train_clip_dir, tmp_path
):
    data = few_shot(load_labelled(toy_task.root, split="train"), 2, seed=1)
    labels = LabelSet(data.classes)
    cfg = TrainConfig(epochs=3, lr=0.05, batch_size=4, seed=1)
    _, whole = _model(train_clip_dir, labels, csc=True, n_ctx=4)
    done = fit(whole, data, cfg)

    _, part = _model(train_clip_dir, labels, csc=True, n_ctx=4)
    state = tmp_path / "run.state"

    def stop_after_first(epoch, terms):
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(part, data, cfg, state_file=state, run_key="k", after_epoch=stop_after_first)
    _, again = _model(train_clip_dir, labels, csc=True, n_ctx=4)  # a fresh process would
    resumed = fit(again, data, cfg, state_file=state, resume=True, run_key="k")
    assert resumed.resumed_from == 1
    assert torch.equal(again.ctx, whole.ctx)  # bit for bit
    assert [x["total"] for x in resumed.losses] == [x["total"] for x in done.losses]
    _, other = _model(train_clip_dir, labels, csc=True, n_ctx=4)
    with pytest.raises(CheckpointError, match="another run"):
        fit(other, data, cfg, state_file=state, resume=True, run_key="other settings")


def test_resume_restores_the_loss_scale(toy_task, train_clip_dir, tmp_path, monkeypatch):
    """fp16 on CUDA scales the loss; a resumed run goes on from the scale it had reached
    (a fresh scale skips other steps). CPU stand-in: an enabled CPU GradScaler."""
    import awt_engine.training.loop as loop

    made = []

    def cpu_scaler(precision, device):
        made.append(torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1))
        return made[-1]

    monkeypatch.setattr(loop, "_grad_scaler", cpu_scaler)
    data = few_shot(load_labelled(toy_task.root, split="train"), 2, seed=1)
    labels = LabelSet(data.classes)
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=4, seed=1)
    state = tmp_path / "run.state"

    def stop_after_first(epoch, terms):
        if epoch == 0:
            raise KeyboardInterrupt

    _, part = _model(train_clip_dir, labels, csc=True, n_ctx=4)
    with pytest.raises(KeyboardInterrupt):
        fit(part, data, cfg, state_file=state, run_key="k", after_epoch=stop_after_first)
    reached = made[-1].get_scale()
    assert reached > 2.0**10  # it grew: one growth per finite step
    _, again = _model(train_clip_dir, labels, csc=True, n_ctx=4)
    seen = []
    fit(
        again,
        data,
        cfg,
        state_file=state,
        resume=True,
        run_key="k",
        after_epoch=lambda e, t: seen.append(made[-1].get_scale()),
    )
    steps = len(data.items) // cfg.batch_size
    assert seen == [reached * 2.0**steps]  # continued from the saved scale, not 2^10


def test_training_changes_only_the_methods_tensors(toy_task, train_clip_dir):
    data = few_shot(load_labelled(toy_task.root, split="train"), 2, seed=1)
    bb, net = _model(train_clip_dir, LabelSet(data.classes), csc=True, n_ctx=4)
    before = _sha(bb.model.state_dict())
    rng = torch.random.get_rng_state()
    ctx0 = net.ctx.detach().clone()
    fit(net, data, TrainConfig(epochs=1, lr=0.05, batch_size=4))
    assert _sha(bb.model.state_dict()) == before  # CLIP is untouched
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert torch.equal(torch.random.get_rng_state(), rng)  # nothing drew from the global RNG
    assert not torch.equal(net.ctx, ctx0) and set(net.learned_state()) == {"ctx"}
    assert net.ctx.grad is not None


def test_checkpoint_round_trip_in_a_fresh_process(toy_task, train_clip_dir, tmp_path):
    out = tmp_path / "coop.safetensors"
    done = train(
        "coop",
        data_root=toy_task.root,
        output=out,
        shots=2,
        seed=1,
        model=train_clip_dir,
        device="cpu",
        epochs=2,
        lr=0.05,
        batch_size=4,
        options=CSC,
    )
    assert done.path == out and not (tmp_path / "coop.safetensors.state").exists()
    h = done.header
    assert h["method"] == "coop" and h["shots"] == 2 and h["seed"] == 1
    assert h["labels"]["classes"] == sorted(toy_task.classes)  # ImageFolder order
    assert h["backbone"]["model"] == train_clip_dir and len(h["data"]["fingerprint"]) == 64
    assert h["method_config"]["csc"] is True and h["train_config"]["epochs"] == 2
    test = [str(p) for p in sorted((toy_task.root / "test").rglob("*.png"))[:6]]
    # the file holds the trained context (not its seeded initialisation), and loading puts
    # exactly those tensors in the model
    from safetensors.torch import load_file

    stored = load_file(out)
    loaded = load_trained(out, device="cpu")
    assert set(stored) == {"ctx"} and torch.equal(loaded.ctx.detach(), stored["ctx"])
    _, init = _model(train_clip_dir, LabelSet(tuple(h["labels"]["classes"])), csc=True, n_ctx=4)
    assert not torch.allclose(init.ctx, stored["ctx"])

    import awt_engine

    here = awt_engine.create_classifier(checkpoint=out, device="cpu", views=3).scores(test)
    code = (
        "import sys, torch, awt_engine\n"
        "torch.set_num_threads(2)\n"
        "clf = awt_engine.create_classifier(checkpoint=sys.argv[1], device='cpu', views=3)\n"
        "torch.save(clf.scores(sys.argv[3:]), sys.argv[2])\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(out), str(tmp_path / "s.pt"), *test], check=True
    )
    assert torch.equal(torch.load(tmp_path / "s.pt"), here)


def test_checkpoint_against_another_backbone_fails_naming_both(
    toy_task, train_clip_dir, tiny_clip_dir, tmp_path
):
    out = tmp_path / "coop.safetensors"
    train(
        "coop",
        data_root=toy_task.root,
        output=out,
        shots=1,
        seed=1,
        model=train_clip_dir,
        device="cpu",
        epochs=1,
        batch_size=4,
        options=CSC,
    )
    with pytest.raises(CheckpointError) as info:
        load_trained(out, model=tiny_clip_dir, device="cpu")
    msg = str(info.value)
    assert "trained on backbone local-dir|sha256:" in msg and "the backbone given is" in msg
    with pytest.raises(CheckpointError, match="does not exist"):
        load_trained(tmp_path / "nope.safetensors")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(out.read_bytes()[:-9] + b"123456789")
    with pytest.raises(CheckpointError, match="checksum"):
        load_trained(damaged)
