"""eP-ALM: a LogitModel over a frozen LM; its scores against a hand-run forward pass,
gradient hygiene, learning the toy task, checkpoints in a fresh process, the CLI."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import awt_engine
from awt_engine.backbone import load_backbone
from awt_engine.classifier import Classifier
from awt_engine.cli import app
from awt_engine.evaluate import evaluate
from awt_engine.inputs.views import ViewConfig, make_views
from awt_engine.labelled import load_labelled
from awt_engine.labels import LabelSet
from awt_engine.methods import get_method
from awt_engine.methods.base import TrainBatch
from awt_engine.methods.epalm import scoring_cost
from awt_engine.models.base import check_model, is_embedder
from awt_engine.training import load_trained, train
from awt_engine.training.data import few_shot
from awt_engine.training.loop import TrainConfig, fit
from tests.fixtures_llm import build_tiny_chat_model

# the tiny LM has 4 layers: [CLS] of the 2 vision blocks into layers [2, 4), one level each
TINY = {"start_layer": 2, "end_layer": 4, "n_levels": 2, "prompt_len": 4}
# texts of unequal lengths, two classes sharing their first name token ("co")
LABELS = LabelSet(
    ("amber", "cobalt", "copper"),
    "a photo of a {}",
    (("warm and glowing",), ("deep blue.",), ("red",)),
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny models' matmuls gain nothing from a second thread and lose much when the
    cores are shared (40 training epochs: 8 s on one thread, minutes on two, measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def epalm_llm(tmp_path_factory):
    return str(build_tiny_chat_model(tmp_path_factory.mktemp("epalm-lm"), hidden=64, layers=4))


@pytest.fixture(scope="session")
def epalm_opt(tmp_path_factory, epalm_llm):
    """A random 4-layer OPT (learned positions) with the tiny tokenizer."""
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    folder = tmp_path_factory.mktemp("epalm-opt")
    tok = AutoTokenizer.from_pretrained(epalm_llm)
    tok.save_pretrained(folder)
    config = OPTConfig(
        vocab_size=len(tok) + 8,
        hidden_size=64,
        word_embed_proj_dim=64,
        ffn_dim=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        init_std=0.3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        OPTForCausalLM(config).save_pretrained(folder)
    return str(folder)


def _epalm(clip_dir, llm, labels=LABELS, **cfg):
    spec = get_method("epalm")
    net = spec.build(load_backbone(clip_dir, device="cpu"), spec.config(llm=llm, **{**TINY, **cfg}))
    net.prepare(labels, seed=0)
    return net


def _sha(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# the interface
# ----------------------------------------------------------------------------------------------


def test_is_a_logit_model_and_the_lm_is_untouched_outside_its_calls(train_clip_dir, epalm_llm):
    from awt_engine.models.llm import load_causal_lm

    net = _epalm(train_clip_dir, epalm_llm)
    check_model(net)
    assert not is_embedder(net)
    assert not any(hasattr(net, a) for a in ("embed_views", "class_embeddings", "encode_images"))
    assert get_method("epalm").needs == ("llm",) and net.frozen_parts()["llm"].startswith("llm|")
    assert not any(n.startswith(("llm", "_rotary")) for n, _ in net.named_modules() if n)
    views = torch.randn(1, 2, 3, 32, 32)
    with torch.inference_mode():
        out = net.logits(views, LABELS)
        ids = torch.tensor([net.text_ids(LABELS)[1]])
        hooked = net.llm.model(ids).logits
    assert out.shape == (1, 2, 3, 2) and bool((out > 0).all() and (out <= 100).all())
    plain = load_causal_lm(epalm_llm).model  # the same weights without the hooks
    with torch.inference_mode():
        assert torch.equal(hooked, plain(ids).logits)


def test_bad_settings_are_refused(train_clip_dir, epalm_llm):
    spec = get_method("epalm")
    with pytest.raises(ValueError, match=r"\[3, 3\) are empty"):
        spec.config(start_layer=3, end_layer=3)
    with pytest.raises(ValueError, match="do not fit"):
        _epalm(train_clip_dir, epalm_llm, end_layer=5)
    with pytest.raises(ValueError, match="2 blocks"):
        _epalm(train_clip_dir, epalm_llm, n_levels=3)


def test_without_a_question_the_caption_still_follows_the_tokenizers_bos(
    train_clip_dir, epalm_opt, tmp_path
):
    """eP-ALM's captioning layout [prompt] <bos> caption <eos>: an OPT-style tokenizer that
    adds a BOS keeps it when the question is empty."""
    import shutil

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    folder = tmp_path / "opt-bos"
    shutil.copytree(epalm_opt, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, bos)]
    )
    tok.save_pretrained(folder)
    net = _epalm(train_clip_dir, str(folder), question="")
    assert net.question_ids == [bos]
    plain = _epalm(train_clip_dir, epalm_opt, question="")
    assert plain.question_ids == []  # a tokenizer without one adds none


# ----------------------------------------------------------------------------------------------
# scores against a hand-run forward pass
# ----------------------------------------------------------------------------------------------


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _reference(net, pixels, text: str, schedule: dict[int, int]) -> list[float]:
    """Log-probability of each token of ``text`` + EOS for one image, running the LM's decoder
    layers by hand: the slot prepended / overwritten per ``schedule`` (layer -> level),
    a plain causal mask over the grown sequence, rotary positions with the slot at 0."""
    lm, tok = net.llm.model, net.llm.tokenizer
    dec = lm.get_decoder()
    rotary = getattr(dec, "rotary_emb", None)
    n = net.config.prompt_len
    out = net.backbone.model.visual.forward_intermediates(
        pixels[None], indices=2, output_extra_tokens=True, normalize_intermediates=True
    )
    cls = [t[0, 0] for t in out["image_intermediates_prefix"]]
    levels = [net.connectors[j](cls[j]) for j in range(2)]
    q = tok("What is in the image?").input_ids
    t = [*tok(" " + text, add_special_tokens=False).input_ids, tok.eos_token_id]
    ids = torch.tensor([q + t])
    emb = dec.embed_tokens(ids)
    if rotary is None:  # OPT: the text counts from 0, the prompt rows get no position
        emb = emb + dec.embed_positions(None, 0, position_ids=torch.arange(ids.shape[1])[None])
    prompt = net.prompt(torch.arange(n))
    x = torch.cat([prompt[None], emb], dim=1)
    L = x.shape[1]
    first = min(schedule)
    for i, layer in enumerate(dec.layers):
        if i in schedule:
            slot = levels[schedule[i]][None, None]
            x = torch.cat([slot, x if i == first else x[:, 1:]], dim=1)
        S = x.shape[1]
        kw = {"attention_mask": torch.ones(S, S, dtype=torch.bool).tril()[None, None]}
        if rotary is not None:
            kw["position_embeddings"] = rotary(x, torch.arange(L + 1 - S, L + 1)[None])
        x = layer(x, **kw)
    x = dec.norm(x) if hasattr(dec, "norm") else dec.final_layer_norm(x)
    logp = lm.lm_head(x)[0].log_softmax(-1)  # output row r + 1 = input row r
    rows = [n + len(q) + j for j in range(len(t))]  # the row before text token j, shifted
    return [float(logp[r, tok_id]) for r, tok_id in zip(rows, t, strict=True)]


@pytest.mark.parametrize(
    ("lm", "layers", "schedule"),
    [
        ("qwen2", (1, 3), {1: 0, 2: 1}),  # layer 3 carries the slot's last output
        ("qwen2", (0, 4), {0: 0, 1: 0, 2: 1, 3: 1}),  # two layers per level
        ("opt", (1, 3), {1: 0, 2: 1}),
    ],
)
def test_scores_equal_a_brute_force_sum_over_each_texts_tokens(
    train_clip_dir, epalm_llm, epalm_opt, lm, layers, schedule
):
    llm = epalm_llm if lm == "qwen2" else epalm_opt
    net = _epalm(train_clip_dir, llm, start_layer=layers[0], end_layer=layers[1])
    net.score_batch, net.prefill_batch = 5, 1  # several batches, different padding in each
    views = torch.randn(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = [t for row in LABELS.prompt_texts() for t in row]
    with torch.no_grad():
        want = torch.tensor(
            [[_mean(_reference(net, views[0, v], t, schedule)) for t in texts] for v in range(2)]
        ).view(1, 2, 3, 2)
        for impl in ("sdpa", "eager"):
            net.llm.model.set_attn_implementation(impl)
            for cached in (True, False):
                got = net.logits(views, LABELS, use_prefix_cache=cached)
                torch.testing.assert_close((got / 100).log(), want, atol=1e-5, rtol=0)
    assert (want[0, 0] - want[0, 1]).abs().max() > 1e-3  # the image matters


def test_first_token_shortlist_scores_only_the_likeliest_classes(train_clip_dir, epalm_llm):
    net = _epalm(train_clip_dir, epalm_llm)
    views = torch.randn(1, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tok = net.llm.tokenizer
    bare = [tok(" " + t[0], add_special_tokens=False).input_ids for t in LABELS.prompt_texts()]
    j = next(i for i in range(len(bare[0])) if len({ids[i] for ids in bare}) > 1)
    with torch.no_grad():
        full = net.logits(views, LABELS)
        # each class's first token after the prefix all texts share, by the hand-run pass
        first = torch.tensor(
            [
                [_reference(net, views[0, v], t[0], {2: 0, 3: 1})[j] for t in LABELS.prompt_texts()]
                for v in range(3)
            ]
        )
        for cached in (True, False):
            short = net.logits(views, LABELS, shortlist_k=2, use_prefix_cache=cached)
            kept = (short > 0).all(-1)[0]  # [V, C]: whole classes kept or dropped
            assert bool(((short > 0).any(-1)[0] == kept).all()) and bool((kept.sum(-1) == 2).all())
            torch.testing.assert_close(short[0][kept], full[0][kept], atol=1e-5, rtol=0)
            assert bool((short[0][~kept] == 0).all())
            for v in range(3):  # no dropped class has a likelier first token than a kept one
                assert first[v][kept[v]].min() >= first[v][~kept[v]].max() - 1e-5
    cost = scoring_cost(net, views, LABELS)
    assert cost["max_abs_diff"] < 1e-3 and cost["prefix_cache_s"] > 0


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------


def test_loss_is_the_weighted_caption_nll_of_a_drawn_prompt(train_clip_dir, epalm_llm):
    net = _epalm(train_clip_dir, epalm_llm)
    views = torch.randn(3, 1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2])
    texts = LABELS.prompt_texts()
    for seed in (0, 1):
        drawn = torch.randint(2, (3,), generator=torch.Generator().manual_seed(seed)).tolist()
        batch = TrainBatch(views, y, 0, 0, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            out = net.training_loss(batch)
            nll = [-sum(_reference(net, views[i, 0], texts[i][drawn[i]], {2: 0, 3: 1})) for i in y]
        assert out.total.item() == pytest.approx(0.1 * sum(nll) / 3, rel=1e-5)
        assert out.terms == {"lm": out.total}


def test_only_the_connectors_and_the_soft_prompt_learn(toy_task, train_clip_dir, epalm_llm):
    data = few_shot(load_labelled(toy_task.root, split="train"), 1, seed=1)
    net = _epalm(train_clip_dir, epalm_llm, LabelSet(data.classes))
    assert set(net.learned_state()) == {
        *(f"connectors.{i}.{w}" for i in range(2) for w in ("weight", "bias")),
        *(f"prompt.{i}.{w}" for i in (0, 1, 3) for w in ("weight",) + (("bias",) if i else ())),
    }
    # eP-ALM's code (mshukor/eP-ALM @ 9ecfeb9acf, optim/optim_factory.py:25-37,118-122;
    # float32/caption.py:263 passes the whole yaml as config, whose prompt_lr sits under
    # optimizer: (ePALM_caption.yaml:10), so optim_factory.py:111 never sees it):
    # add_weight_decay's [no-decay (1-D, .bias), decay] groups, both at lr; timm's
    # scheduler_groups: 0 (configs/image/ePALM_caption.yaml:11, scheduler/scheduler.py:103)
    # schedules the first alone
    names = {id(p): n for n, p in net.named_parameters()}
    groups = net.param_groups(0.5)
    assert [(g["lr"], g.get("weight_decay"), g.get("scheduled", True)) for g in groups] == [
        (0.5, 0.0, True),
        (0.5, None, False),
    ]
    assert {names[id(p)] for p in groups[0]["params"]} == {
        n for n in net.learned_state() if n.endswith(".bias")
    }
    assert {names[id(p)] for p in groups[1]["params"]} == {
        n for n in net.learned_state() if not n.endswith(".bias")
    }
    config_groups = _epalm(
        train_clip_dir, epalm_llm, LabelSet(data.classes), optimizer_groups="config"
    ).param_groups(0.5)
    assert [(g["lr"], g.get("scheduled", True)) for g in config_groups] == [
        (0.5, True),
        (net.config.prompt_lr, False),
    ]
    g = torch.Generator().manual_seed(0)
    batch = TrainBatch(torch.randn(2, 1, 3, 32, 32, generator=g), torch.tensor([0, 3]), 0, 0, g)
    net.training_loss(batch).total.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    lm, vit = net.llm.model, net.backbone.model
    assert all(p.grad is None and not p.requires_grad for p in lm.parameters())
    assert all(p.grad is None and not p.requires_grad for p in vit.parameters())
    before, rng = (_sha(lm), _sha(vit)), torch.random.get_rng_state()
    learned = {k: v.clone() for k, v in net.learned_state().items()}
    fit(net, data, TrainConfig(epochs=1, lr=1e-2, batch_size=5, optimizer="adamw"))
    assert (_sha(lm), _sha(vit)) == before and torch.equal(torch.random.get_rng_state(), rng)
    assert all(not torch.equal(v, learned[k]) for k, v in net.learned_state().items())


@pytest.fixture(scope="module")
def trained(toy_task, train_clip_dir, epalm_llm, tmp_path_factory):
    # the injection spans all 4 layers here: from layer 2 on the random LM needs ~100
    # epochs to tell the classes apart; from layer 0 it does in 40
    out = tmp_path_factory.mktemp("epalm-ckpt") / "epalm.safetensors"
    # a learning test, not the recipe's: no RandAugment (its contrast and brightness ops
    # blur the toy task's colour cues)
    options = {**TINY, "llm": epalm_llm, "start_layer": 0, "prompt_lr": 3e-2, "randaugment": False}
    done = train(
        "epalm",
        data_root=toy_task.root,
        output=out,
        shots=4,
        seed=1,
        model=train_clip_dir,
        device="cpu",
        epochs=40,
        lr=3e-2,
        batch_size=4,
        options={**options, "warmup_epochs": 1},
    )
    return done, options


def test_training_conditions_the_lm_on_the_image(trained, toy_task, train_clip_dir):
    done, options = trained
    first, last = done.result.losses[0]["lm"], done.result.losses[-1]["lm"]
    assert last < first / 2, done.result.losses
    assert done.header["method_config"]["start_layer"] == 0
    net = load_trained(done.path, device="cpu")
    data = few_shot(load_labelled(toy_task.root, split="train"), 4, seed=1)
    labels = LabelSet(data.classes)
    images = [Image.open(it.path).convert("RGB") for it in data.items]
    views = torch.stack([make_views(im, net.preprocess, ViewConfig(n_views=1)) for im in images])
    y = [it.label for it in data.items]
    ids = net.text_ids(labels)
    texts = [ids[c] for c in y]
    with torch.no_grad():
        levels = net.visual_levels(views.flatten(0, 1))
        other = torch.roll(torch.arange(len(y)), 4)  # 4 per class: every image another class's
        assert all(y[i] != y[j] for i, j in enumerate(other.tolist()))
        matched = -net.text_logprobs(levels, texts)[0].mean()
        shuffled = -net.text_logprobs(levels[other], texts)[0].mean()
    assert matched < 0.9 * shuffled, (matched, shuffled)
    untrained = get_method("epalm").build(net.backbone, get_method("epalm").config(**options))
    untrained.prepare(labels, seed=1)  # train() drew its initial tensors from seed 1 too
    prompt_only = get_method("epalm").build(net.backbone, get_method("epalm").config(**options))
    prompt_only.prepare(labels, seed=1)
    prompt_only.prompt.load_state_dict(net.prompt.state_dict())  # initial connectors
    with torch.no_grad():
        levels0 = prompt_only.visual_levels(views.flatten(0, 1))
        without = -prompt_only.text_logprobs(levels0, texts)[0].mean()
    assert matched < 0.9 * without, (matched, without)  # the connectors learnt too
    test = load_labelled(toy_task.root, split="test")
    acc = {}
    for name, model in (("untrained", untrained), ("trained", net)):
        clf = Classifier(model, LabelSet(test.classes), scorer="clip")
        acc[name] = evaluate(clf, test, ["clip"], cache_root=None).metrics["clip"].acc1
    assert acc["trained"] >= 0.6 and acc["trained"] >= acc["untrained"] + 0.3, acc


def test_checkpoint_round_trip_in_a_fresh_process(trained, toy_task, tmp_path):
    done, _ = trained
    test = [str(p) for p in sorted((toy_task.root / "test").rglob("*.png"))[:6]]
    here = awt_engine.create_classifier(checkpoint=done.path, device="cpu", views=3).scores(test)
    code = (
        "import sys, torch, awt_engine\n"
        "torch.set_num_threads(1)\n"
        "clf = awt_engine.create_classifier(checkpoint=sys.argv[1], device='cpu', views=3)\n"
        "torch.save(clf.scores(sys.argv[3:]), sys.argv[2])\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(done.path), str(tmp_path / "s.pt"), *test], check=True
    )
    assert torch.equal(torch.load(tmp_path / "s.pt"), here)


def test_eval_cli_scores_the_checkpoint_with_awt_and_clip(trained, toy_task, tmp_path):
    done, options = trained
    runner = CliRunner()
    base = ["eval", "--data-root", str(toy_task.root), "--checkpoint", str(done.path)]
    base += ["--views", "3", "--no-progress", "--llm", options["llm"]]
    res = runner.invoke(app, [*base, "--scorer", "awt", "--scorer", "clip", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert [ln.split()[0] for ln in res.stdout.splitlines()[1:3]] == ["awt", "clip"]
    rec = json.loads(next(tmp_path.glob("*__awt__*.json")).read_text())
    assert rec["method"] == "epalm" and rec["n_images"] == 30
    bad = runner.invoke(app, [*base, "--scorer", "clip-descriptions"])
    assert bad.exit_code != 0 and "logits only" in bad.output
