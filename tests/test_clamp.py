"""CLAMP: read-only prompts, LoRA at initialisation, gradient hygiene, the loss against an
independent computation, seeded dropout, learning on the toy task, captions files,
checkpoints in a fresh process and through the CLI."""

import json
import math
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from awt_engine.backbone import load_backbone
from awt_engine.checkpoints import read_checkpoint
from awt_engine.classifier import Classifier
from awt_engine.cli import app
from awt_engine.evaluate import evaluate
from awt_engine.labelled import load_labelled
from awt_engine.labels import LabelSet
from awt_engine.methods import get_method
from awt_engine.methods.base import TrainBatch
from awt_engine.methods.clamp import CLAMP_WRAPPER, read_captions
from awt_engine.models.llm import load_causal_lm
from awt_engine.training import load_trained, train
from awt_engine.training.data import fingerprint
from tests.fixtures_llm import build_tiny_chat_model

runner = CliRunner()
LAYERS = 2
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# METHODS.md section 3's tiny configuration: N = 4 prompts, LoRA r = 4, a 4-head pooler
TINY = {"n_prompt_tokens": 4, "lora_r": 4, "lora_alpha": 4.0, "pool_heads": 4}
LABELS = LabelSet(
    ("amber", "cobalt", "olive"), "a photo of a {}", (("warm.",), ("deep blue.",), ("drab",))
)


@pytest.fixture(scope="session")
def clamp_lm(tmp_path_factory) -> str:
    """A random Qwen2 LM of width 64 (the tiny configuration's)."""
    return str(build_tiny_chat_model(tmp_path_factory.mktemp("clamp-lm"), hidden=64))


def _net(clip_dir, lm, labels=LABELS, seed=0, **cfg):
    spec = get_method("clamp")
    net = spec.build(load_backbone(clip_dir, device="cpu"), spec.config(llm=lm, **{**TINY, **cfg}))
    net.prepare(labels, seed=seed)
    return net


def _lora_layers(net):
    return [m for _, m in net.lm.named_modules() if hasattr(m, "lora_B")]


def _perturb_lora(net, seed=0):
    """Non-zero B (as after some training), so the LoRA path changes the LM."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _lora_layers(net):
            b = m.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.5)


def _batch(net, labels, seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    R = net.preprocess.size
    y = torch.arange(n) % labels.n_classes  # repeated classes: several positives per row
    return TrainBatch(torch.randn(n, 1, 3, R, R, generator=g), y, 0, 0, g)


def test_caption_states_do_not_see_the_appended_prompts(train_clip_dir, clamp_lm):
    net = _net(train_clip_dir, clamp_lm)
    _perturb_lora(net)
    captions = ["a photo of a amber.", "a photo of a cobalt. deep blue.", "x"]
    tok = net.tokens([net.wrap(c) for c in captions])  # left-padded, different lengths
    T = tok.ids.shape[1]
    assert (tok.mask[:, 0] == 0).any() and (tok.mask[:, -1] == 1).all()
    with torch.no_grad():
        plain = net.lm.base_model(  # the LM on the caption ids alone, no prompt rows at all
            input_ids=tok.ids, attention_mask=tok.mask, position_ids=tok.positions
        ).last_hidden_state
        full = net.hidden_states(tok)
        assert full.shape[1] == T + 4
        assert torch.equal(full[:, :T][tok.mask.bool()], plain[tok.mask.bool()])
        pooled = net.encode_captions(captions)
        net.prompts.add_(1.0)  # other prompt rows: the caption states stay, the output moves
        again = net.hidden_states(tok)
        assert torch.equal(again[:, :T], full[:, :T])
        assert (net.encode_captions(captions) - pooled).abs().max() > 1e-3


def test_lora_at_initialisation_is_the_base_lm(train_clip_dir, clamp_lm):
    net = _net(train_clip_dir, clamp_lm, seed=3)
    layers = _lora_layers(net)
    names = sorted(n.rsplit(".", 1)[-1] for n, m in net.lm.named_modules() if hasattr(m, "lora_B"))
    assert names == sorted(TARGETS * LAYERS)  # q, k, v, o of every decoder layer, nothing else
    assert all(m.lora_B["default"].weight.abs().max() == 0 for m in layers)
    assert all(m.lora_A["default"].weight.abs().max() > 0 for m in layers)
    base = load_causal_lm(clamp_lm, device="cpu").model
    ids = net.tokenizer(["USER: a photo of a teal. ASSISTANT: 1."], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(net.lm(ids).logits, base(ids).logits)
        _perturb_lora(net)  # the comparison can tell: a moved LoRA changes the logits
        assert not torch.allclose(net.lm(ids).logits, base(ids).logits, atol=1e-3)
    assert not any(p.requires_grad for n, p in net.lm.named_parameters() if "lora_" not in n)


def test_only_lora_prompts_pooler_projection_and_scale_get_gradients(train_clip_dir, clamp_lm):
    net = _net(train_clip_dir, clamp_lm)
    _perturb_lora(net)  # with B = 0 the first step's A gradient is exactly zero
    net.train()
    net.training_loss(_batch(net, LABELS)).total.backward()
    lora = {
        f"lora.model.layers.{i}.self_attn.{t}.lora_{ab}.weight"
        for i in range(LAYERS)
        for t in TARGETS
        for ab in "AB"
    }
    pooler = {
        "pooler.query",
        "pooler.attn.in_proj_weight",
        "pooler.attn.in_proj_bias",
        "pooler.attn.out_proj.weight",
        "pooler.attn.out_proj.bias",
        "pooler.norm.weight",
        "pooler.norm.bias",
    }
    expected = lora | pooler | {"prompts", "proj.weight", "log_scale"}
    assert set(net.learned_state()) == expected
    for name, p in net.named_parameters():
        if net.state_name(name) in expected:
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert all(p.grad is None for p in net.backbone.model.parameters())
    decay, plain = net.param_groups(1e-3)
    assert "weight_decay" not in decay and plain["weight_decay"] == 0.0
    assert {p.ndim for p in plain["params"]} == {0, 1} and len(plain["params"]) == 5
    assert all(p.ndim >= 2 for p in decay["params"])


def test_loss_terms_match_an_independent_computation(train_clip_dir, clamp_lm):
    net = _net(train_clip_dir, clamp_lm)
    net.eval()  # no dropout, so the embeddings below are the ones the loss saw
    batch = _batch(net, LABELS, seed=5)
    with torch.no_grad():
        out = net.training_loss(batch)
        g = torch.Generator().manual_seed(5)
        torch.randn(batch.views.shape, generator=g)  # the draw _batch made for the views
        pick = torch.randint(LABELS.n_prompts, (6,), generator=g).tolist()
        texts = LABELS.prompt_texts()
        captions = [texts[c][p] for c, p in zip(batch.labels.tolist(), pick, strict=True)]
        assert captions == net.batch_captions(_batch(net, LABELS, seed=5))
        img = net.backbone.encode_images(batch.views[:, 0]).double()
        txt = net.encode_captions(captions).double()
        teacher = net.backbone.encode_text(captions).double()
    s = float(net._scale().detach())  # the learned scale (the scorers' is score_scale)
    y = batch.labels.tolist()
    B = len(y)

    def soft(row_logits, targets):
        return -sum(t * lp for t, lp in zip(targets, torch.log_softmax(row_logits, 0), strict=True))

    con = dis = 0.0
    for i in range(B):
        pos = [float(y[j] == y[i]) for j in range(B)]
        targets = [p / sum(pos) for p in pos]  # every caption of the image's class
        con += soft(s * txt @ img[i], targets) + soft(s * img @ txt[i], targets)
        t_row, t_col = (
            torch.softmax(100 * teacher @ img[i], 0),
            torch.softmax(100 * img @ teacher[i], 0),
        )
        dis += soft(100 * txt @ img[i], t_row) + soft(100 * img @ txt[i], t_col)
    assert out.terms["contrastive"].item() == pytest.approx(float(con) / (2 * B), rel=1e-5)
    assert out.terms["distill"].item() == pytest.approx(float(dis) / (2 * B), rel=1e-5)
    assert out.total.item() == pytest.approx(float(con + dis) / (2 * B), rel=1e-5)


def test_dropout_is_drawn_from_the_step_never_the_global_rng(train_clip_dir, clamp_lm):
    net = _net(train_clip_dir, clamp_lm, lora_dropout=0.5)
    _perturb_lora(net)
    net.train()
    rng = torch.random.get_rng_state()
    with torch.no_grad():
        a = net.training_loss(_batch(net, LABELS, seed=1)).total
        b = net.training_loss(_batch(net, LABELS, seed=1)).total
        c = net.training_loss(_batch(net, LABELS, seed=2)).total
        net.eval()
        d = net.training_loss(_batch(net, LABELS, seed=1)).total
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, d)  # dropout really acts in training
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_configuration_errors_name_the_value(train_clip_dir, clamp_lm):
    spec = get_method("clamp")
    with pytest.raises(ValueError, match="wrapper must contain"):
        spec.config(wrapper="USER: caption")
    with pytest.raises(ValueError, match="pool_heads 3 does not divide the LLM width 64"):
        _net(train_clip_dir, clamp_lm, pool_heads=3)
    with pytest.raises(ValueError, match="lora_targets query are not modules"):
        _net(train_clip_dir, clamp_lm, lora_targets="q_proj,query")
    net = _net(train_clip_dir, clamp_lm, wrapper=CLAMP_WRAPPER)
    assert net.wrap("dog") == (
        "USER: A photo of a dog.A dog has the following visual attributes ASSISTANT: 1."
    )


# -- learning, checkpoints, CLI --------------------------------------------------------


def _toy_options(lm):
    # The toy teacher is the tiny random CLIP's own text tower, which knows nothing of the
    # toy classes (its zero-shot is chance): distillation alone would copy that, so it is
    # weighed 0.3 here. The learned scale starts at 100, a real CLIP's (CLAMP loads the
    # pretrained one), where the tiny model's is 14.3. "{}" keeps the sequences short.
    return {**TINY, "llm": lm, "init_logit_scale": 100, "distill_weight": 0.3, "wrapper": "{}"}


@pytest.fixture(scope="module")
def trained(toy_task, train_clip_dir, clamp_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("clamp") / "clamp.safetensors"
    backbone = load_backbone(train_clip_dir, device="cpu")  # open_clip's init draws
    rng = torch.random.get_rng_state()
    done = train(
        "clamp",
        data_root=toy_task.root,
        output=out,
        shots=4,
        seed=1,
        model=train_clip_dir,
        backbone=backbone,
        pretrained=None,
        device="cpu",
        epochs=12,
        lr=1e-2,
        batch_size=10,
        options={**_toy_options(clamp_lm), "warmup_epochs": 1},
    )
    assert torch.equal(torch.random.get_rng_state(), rng)  # nothing drew from the global RNG
    return done


@pytest.mark.slow
def test_clamp_learns_the_toy_task(trained, toy_task, train_clip_dir, clamp_lm):
    first, last = trained.result.losses[0], trained.result.losses[-1]
    assert last["contrastive"] < first["contrastive"] / 2, (first, last)
    assert last["distill"] < 0.8 * first["distill"], (first, last)
    test = load_labelled(toy_task.root, split="test")
    labels = LabelSet(test.classes)
    spec = get_method("clamp")
    cfg = spec.config(**_toy_options(clamp_lm))
    untrained = spec.build(load_backbone(train_clip_dir, device="cpu"), cfg)
    untrained.prepare(labels, seed=1)
    acc = {}
    for name, net in (("before", untrained), ("after", load_trained(trained.path, device="cpu"))):
        clf = Classifier(net, labels, scorer="clip")
        acc[name] = evaluate(clf, test, ["clip"], cache_root=None).metrics["clip"].acc1
    assert acc["before"] <= 0.4 and acc["after"] >= 0.8, acc  # chance is 0.2


@pytest.mark.slow
def test_checkpoint_in_a_fresh_process_and_both_scorers_through_the_cli(
    trained, toy_task, tmp_path
):
    import awt_engine

    h = trained.header
    assert h["method"] == "clamp" and set(h["frozen"]) == {"llm"}
    test = [str(p) for p in sorted((toy_task.root / "test").rglob("*.png"))[:6]]
    here = awt_engine.create_classifier(checkpoint=trained.path, device="cpu", views=3)
    scores = here.scores(test)
    log_scale = float(read_checkpoint(trained.path)[1]["log_scale"])
    assert float(here.model._scale().detach()) == pytest.approx(
        math.exp(log_scale), rel=1e-6
    )  # learned
    assert here.model.logit_scale == 100.0  # what it scores with: CLAMP's zero-shot scale
    code = (  # its own cache folder: the class embeddings are computed there, not read
        "import sys, torch, awt_engine\n"
        "torch.set_num_threads(2)\n"
        "clf = awt_engine.create_classifier(\n"
        "    checkpoint=sys.argv[1], device='cpu', views=3, cache_dir=sys.argv[3]\n"
        ")\n"
        "torch.save(clf.scores(sys.argv[4:]), sys.argv[2])\n"
    )
    out = [str(trained.path), str(tmp_path / "s.pt"), str(tmp_path / "other-cache")]
    subprocess.run([sys.executable, "-c", code, *out, *test], check=True)
    assert any((tmp_path / "other-cache").rglob("*.safetensors"))
    assert torch.equal(torch.load(tmp_path / "s.pt"), scores)
    args = ["eval", "--data-root", str(toy_task.root), "--checkpoint", str(trained.path)]
    args += ["--scorer", "awt", "--scorer", "clip", "--views", "3", "--no-progress"]
    ev = runner.invoke(app, [*args, "-o", str(tmp_path / "res")])
    assert ev.exit_code == 0, ev.output
    assert [ln.split()[0] for ln in ev.stdout.splitlines()[1:3]] == ["awt", "clip"]


def _captions_file(toy_task, folder, *, suffix=""):
    """Two lines per class; the captions of one class differ, one caption repeats."""
    rows = []
    for name in toy_task.classes:
        for i in range(2):
            caption = f"{name} stripes{suffix}" if i == 0 else f"a {name} square {i}{suffix}"
            rows.append({"image": f"{name}/{i:02d}.png", "caption": caption})
    rows.append(
        {"image": str(toy_task.root / "train" / "teal" / "03.png"), "caption": "teal stripes"}
    )
    path = toy_task.root / "train" / f"captions{suffix}.jsonl"  # relative paths: from here
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_captions_file_becomes_the_training_pairs(toy_task, train_clip_dir, clamp_lm, tmp_path):
    path = _captions_file(toy_task, tmp_path)
    net = _net(train_clip_dir, clamp_lm, captions=str(path))
    data = net.training_data(load_labelled(toy_task.root, split="train"))
    assert len(data.items) == 11 and len(data.classes) == 10  # "teal stripes" twice
    by_image = {(it.path.parent.name, it.path.name): data.classes[it.label] for it in data.items}
    assert by_image[("amber", "01.png")] == "a amber square 1"
    assert by_image[("teal", "03.png")] == by_image[("teal", "00.png")] == "teal stripes"
    batch = TrainBatch(torch.zeros(2, 1, 3, 32, 32), torch.tensor([0, 9]), 0, 0, torch.Generator())
    assert net.batch_captions(batch) == [data.classes[0], data.classes[9]]
    other = net.training_data(load_labelled(toy_task.root, split="train"))
    assert fingerprint(other) == fingerprint(data)
    changed = _net(
        train_clip_dir, clamp_lm, captions=str(_captions_file(toy_task, tmp_path, suffix="."))
    )
    assert fingerprint(changed.training_data(data)) != fingerprint(data)  # captions count


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "line 2: not JSON"),
        ('{"image": "amber/00.png"}', 'line 2: "caption" must be non-empty text'),
        (
            '{"image": "amber/99.png", "caption": "x"}',
            "line 2: image .*amber/99.png does not exist",
        ),
        ('["amber/00.png", "x"]', 'line 2: expected {"image": path, "caption": text}'),
    ],
)
def test_captions_file_errors_name_the_line(toy_task, tmp_path, line, message):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"image": "amber/00.png", "caption": "ok"}) + "\n" + line + "\n")
    (tmp_path / "amber").mkdir(exist_ok=True)
    (tmp_path / "amber" / "00.png").write_bytes((toy_task.root / "train/amber/00.png").read_bytes())
    with pytest.raises(ValueError, match=message):
        read_captions(path)
    with pytest.raises(ValueError, match="does not exist"):
        read_captions(tmp_path / "missing.jsonl")


def test_train_from_a_captions_file_through_the_cli(toy_task, train_clip_dir, clamp_lm, tmp_path):
    path = _captions_file(toy_task, tmp_path)
    out = tmp_path / "cap.safetensors"
    args = ["train", "--method", "clamp", "--data-root", str(toy_task.root), "--model"]
    args += [train_clip_dir, "--output", str(out), "--captions", str(path), "--llm", clamp_lm]
    args += ["--epochs", "2", "--batch-size", "5", "--no-progress", "--device", "cpu"]
    for k, v in {**TINY, "wrapper": "{}"}.items():
        args += ["--set", f"{k}={v}"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    header, _ = read_checkpoint(out)
    assert header["data"]["images"] == 11 and "10 distinct captions" in header["data"]["source"]
    assert header["method_config"]["captions"] == str(path.resolve())
    losses = [x["total"] for x in header["losses"]]  # per-epoch means
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses), losses
    assert f"loss {losses[0]:.4f} -> {losses[1]:.4f}" in res.stdout  # the run's own line
    coop = ["train", "--method", "coop", "--data-root", str(toy_task.root), "--model"]
    coop += [train_clip_dir, "--output", str(tmp_path / "coop.safetensors")]
    res = runner.invoke(app, [*coop, "--captions", str(path), "--device", "cpu"])
    assert res.exit_code == 2 and "unknown option 'captions' for coop" in res.output


def test_teacher_captions_are_encoded_once_with_the_same_loss(train_clip_dir, clamp_lm):
    """The teacher encodes the fixed caption pool on the first step only: its rows are
    exactly the pool's encoding; every step's loss and gradients equal those of encoding
    the step's captions afresh up to rounding (a text's features differ in the last bits
    with the size of the batch it is encoded in: CPU matmul blocking)."""
    net, fresh = _net(train_clip_dir, clamp_lm), _net(train_clip_dir, clamp_lm)
    net.eval(), fresh.eval()  # no dropout: the two nets compute the same
    fresh.teacher_text = lambda captions: fresh.backbone.encode_text(captions, grad=False)
    texts = []
    encode = net.backbone.encode_text

    def spy(captions, *a, **k):
        texts.append(list(captions))
        return encode(captions, *a, **k)

    net.backbone.encode_text = spy
    for seed in range(3):
        outs = []
        for m in (net, fresh):
            m.zero_grad()
            outs.append(m.training_loss(_batch(m, LABELS, seed=seed)))
            outs[-1].total.backward()
        assert torch.equal(outs[0].terms["contrastive"], outs[1].terms["contrastive"])
        close = dict(rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(outs[0].terms["distill"], outs[1].terms["distill"], **close)
        grads = net.proj.weight.grad, fresh.proj.weight.grad
        torch.testing.assert_close(*grads, rtol=0, atol=2e-6 * float(grads[1].abs().max()))
    pool = [t for row in LABELS.prompt_texts() for t in row]
    assert texts == [pool]  # one encoding of the pool in 3 steps
    table = encode(pool, grad=False)
    captions = net.batch_captions(_batch(net, LABELS, seed=7))
    assert torch.equal(net.teacher_text(captions), table[[pool.index(c) for c in captions]])
