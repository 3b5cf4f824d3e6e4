"""LLaMP: the cached last layer equals the full LLM, the K/V cache on disk, a training step
runs only the copied layer, frozen parts get no gradient, learning on the toy task, and a
checkpoint scoring the same in a fresh process and through the CLI."""

import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from torch.nn.utils import parametrize
from typer.testing import CliRunner

import awt_engine
from awt_engine.backbone import load_backbone
from awt_engine.classifier import Classifier
from awt_engine.cli import app
from awt_engine.evaluate import evaluate
from awt_engine.labelled import load_labelled
from awt_engine.labels import LabelSet
from awt_engine.methods import get_method
from awt_engine.methods.base import TrainBatch
from awt_engine.models.base import tensors_sha256
from awt_engine.models.clip import ClipEmbedder
from awt_engine.training import load_trained, train
from tests.fixtures_llm import build_tiny_chat_model

# the tiny configuration: 2 text layers (both prompted), 2 vision layers (prompts in layer
# 0, LoRA on layer 1, the paper's split of the 12 layers scaled down), K = 4
TINY = {
    "n_tokens": 4,
    "prompt_depth": 2,
    "visual_prompt_depth": 1,
    "lora_rank": 2,
    "lora_alpha": 4.0,
    "lora_start": 1,
    "lora_end": 2,
    "self_description_tokens": 8,
}
# names and descriptions of different token lengths: the prefixes are left-padded
LABELS = LabelSet(
    ("cat", "sea_lion", "dog"),
    "a photo of a {}",
    (("furry and small.",), ("wet.",), ("a loyal friend with a wagging tail.",)),
)
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return build_tiny_chat_model(tmp_path_factory.mktemp("llamp-lm"), hidden=64, layers=3)


def _build(clip_dir, lm, **cfg):
    spec = get_method("llamp")
    return spec.build(
        load_backbone(clip_dir, device="cpu"), spec.config(llm=str(lm), **{**TINY, **cfg})
    )


def _llamp(clip_dir, lm, labels=LABELS, **cfg):
    net = _build(clip_dir, lm, **cfg)
    net.prepare(labels, seed=0)
    return net


@contextmanager
def _counting(llm):
    """Counts forward calls of every part of the frozen LLM (embeddings, each layer, head)."""
    counts: dict[str, int] = {}
    parts = {"embed_tokens": llm.model.model.embed_tokens, "lm_head": llm.model.lm_head}
    parts |= {f"layer{i}": layer for i, layer in enumerate(llm.model.model.layers)}

    def hook(name):
        def count(module, args, output):
            counts[name] = counts.get(name, 0) + 1

        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in parts.items()]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def _batch(net, n=4):
    g = torch.Generator().manual_seed(0)
    R = net.preprocess.size
    return TrainBatch(
        torch.randn(n, 1, 3, R, R, generator=g), torch.tensor([0, 1, 2, 0][:n]), 0, 0, g
    )


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_cached_last_layer_equals_the_full_llm(train_clip_dir, tiny_lm, attention):
    net = _build(train_clip_dir, tiny_lm)
    net.kv_cache_root = None  # built here, with this attention
    net.llm.model.config._attn_implementation = attention
    net.decoder.self_attn.config._attn_implementation = attention
    net.prepare(LABELS, seed=0)
    cache = net.prefix_cache(LABELS)
    texts = [t for row in net.prefix_texts(LABELS) for t in row]
    tok, lm, K = net.llm.tokenizer, net.llm.model, TINY["n_tokens"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(r) for r in ids}) == len(ids)  # every row padded differently
    # independently: the whole LLM over [padding, prefix, K tokens], the K tokens entering
    # at the last layer (LLaMP feeds them there), positions counting the prefix tokens only
    T = max(map(len, ids))
    inp = torch.tensor([[tok.pad_token_id] * (T - len(r)) + r + [5] * K for r in ids])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * (len(r) + K) for r in ids])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    tokens = net.class_token.detach()
    seen = {}

    def enter(module, args, kwargs):
        hs = args[0] if args else kwargs.pop("hidden_states")
        hs = torch.cat([hs[:, :-K], tokens.expand(hs.shape[0], -1, -1)], dim=1)
        return (hs, *args[1:]), kwargs

    def leave(module, args, kwargs, output):
        seen["out"] = output[0] if isinstance(output, tuple) else output

    last = lm.model.layers[-1]
    handles = [
        last.register_forward_pre_hook(enter, with_kwargs=True),
        last.register_forward_hook(leave, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            ref = lm(
                input_ids=inp, attention_mask=mask, position_ids=pos, output_hidden_states=True
            )
    finally:
        for h in handles:
            h.remove()
    rows = torch.arange(len(ids))
    with torch.no_grad():
        layer_out = net.llm_outputs(cache, rows, normed=False)
        normed = net.llm_outputs(cache, rows)
    torch.testing.assert_close(layer_out, seen["out"][:, -K:], atol=1e-5, rtol=0)
    # hidden_states[-1] is after the final norm, as the copied norm's output
    torch.testing.assert_close(normed, ref.hidden_states[-1][:, -K:], atol=1e-5, rtol=0)


def _forget(net):
    """Drop what the model holds in memory, as a fresh model would start."""
    net._kv.clear()
    net._described.clear()


def test_the_kv_cache_is_kept_on_disk_and_rebuilt_when_damaged(train_clip_dir, tiny_lm):
    net = _llamp(train_clip_dir, tiny_lm)
    cache = net.prefix_cache(LABELS)
    assert cache.path is not None and cache.path.parent.name == "llamp_kv"
    assert cache.keys.shape[:3] == (6, 2, int(cache.lengths.max()))  # [N, kv heads, T, d]
    assert not cache.keys.transpose(1, 2)[cache.mask == 0].any()  # padding holds nothing
    assert cache.mask[:, -1].all()  # left padding

    _forget(net)
    written = cache.path.stat()
    with _counting(net.llm) as calls:
        net.prepare(LABELS, seed=0)  # nothing yet: the K/V waits for the first step
    assert calls == {} and net._kv == {}
    with _counting(net.llm) as calls:
        net.train_cache()  # self-descriptions and K/V read from disk
    assert calls == {}
    hit = net.prefix_cache(LABELS)
    assert hit is not cache and hit.path == cache.path
    now = cache.path.stat()  # a hit is read, never written again (atomic writes: a new inode)
    assert (now.st_ino, now.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    assert torch.equal(hit.keys, cache.keys) and torch.equal(hit.values, cache.values)
    assert torch.equal(hit.mask, cache.mask) and torch.equal(hit.lengths, cache.lengths)

    raw = bytearray(cache.path.read_bytes())
    raw[-5] ^= 0xFF  # a flipped byte in the values
    cache.path.write_bytes(bytes(raw))
    _forget(net)
    with _counting(net.llm) as calls, pytest.warns(UserWarning, match=re.escape(str(cache.path))):
        net.prepare(LABELS, seed=0)
        net.train_cache()
    assert calls["layer0"] > 0  # rebuilt by the whole LLM
    assert torch.equal(net.prefix_cache(LABELS).values, cache.values)
    _forget(net)
    with _counting(net.llm) as calls:
        net.prepare(LABELS, seed=0)
        net.train_cache()  # the rewritten file is good again
    assert calls == {}

    describe = next(cache.path.parent.glob("describe-*.json"))
    describe.write_text(describe.read_text()[:-20])
    _forget(net)
    with pytest.warns(UserWarning, match=re.escape(str(describe))):
        again = net.self_descriptions(LABELS)
    assert again == net.self_descriptions(LABELS) and json.loads(describe.read_text())
    other = LabelSet(("cat", "owl"), "a photo of a {}")
    assert net.prefix_cache(other).path != cache.path  # another prefix list, another file


def test_a_float16_llm_keeps_its_cache_in_float16_and_trains_a_float32_copy(
    train_clip_dir, tiny_lm
):
    net = _llamp(train_clip_dir, tiny_lm, llm_dtype="float16")
    cache = net.prefix_cache(LABELS)
    assert net.llm.model.dtype == torch.float16 and cache.keys.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in net.parameters())  # what AdamW updates
    _forget(net)
    hit = net.prefix_cache(LABELS)
    assert hit.path == cache.path and torch.equal(hit.keys, cache.keys)
    out = net.training_loss(_batch(net))
    out.total.backward()
    assert torch.isfinite(out.total) and net.class_token.grad.isfinite().all()
    # the float16 LLM gives the float32 LLM's loss up to float16 rounding (measured: 1.7 %)
    full = _llamp(train_clip_dir, tiny_lm)
    assert full.llm.model.dtype == torch.float32
    assert float(out.total.detach()) == pytest.approx(
        float(full.training_loss(_batch(full)).total), rel=0.05
    )


def test_prefixes_are_the_chat_request_then_the_llms_own_sentence_or_a_description(
    train_clip_dir, tiny_lm
):
    net = _llamp(train_clip_dir, tiny_lm)
    tok = net.llm.tokenizer
    rows = net.prefix_texts(LABELS)
    own = net.self_descriptions(LABELS)
    for c, name in enumerate(("cat", "sea lion", "dog")):
        request = f"In one sentence, describe the distinctive appearance of a {name}."
        chat = tok.apply_chat_template(
            [SYSTEM, {"role": "user", "content": request}],
            tokenize=False,
            add_generation_prompt=True,
        )
        bare = chat + f"The {name} appears as"
        assert rows[c][1] == chat + LABELS.descriptions[c][0]
        assert own[c] and rows[c][0] == f"{bare} {own[c]}"
        # the LLM's own greedy continuation of the bare prefix, generated here alone
        ids = torch.tensor([tok(bare, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            gen = net.llm.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        assert (
            tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip().startswith(own[c])
        )
    # prompt 0 does not depend on the descriptions the label set carries
    assert net.prefix_texts(LABELS.bare()) == [[r[0]] for r in rows]
    plain = _llamp(train_clip_dir, tiny_lm, self_describe=False)
    assert plain.prefix_texts(LABELS)[1][0].endswith("<|assistant|>The sea lion appears as")
    # the same learned tensors (same seed) but other prefixes: another identity
    same = tensors_sha256(plain.learned_state()) == tensors_sha256(net.learned_state())
    assert same and plain.identity != net.identity
    emb = net.class_embeddings(LABELS)
    assert emb.shape == (3, 2, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(3, 2))


def test_a_training_step_runs_only_the_copied_layer_and_frozen_parts_get_no_gradient(
    train_clip_dir, tiny_lm
):
    net = _llamp(train_clip_dir, tiny_lm)
    with torch.inference_mode():  # scoring first leaves nothing training cannot use
        net.class_embeddings(LABELS)
    net.train()
    with _counting(net.llm) as calls:
        out = net.training_loss(_batch(net))
        out.total.backward()
    assert calls == {}  # no LLM layer, embedding or head ran: only the copy
    with _counting(net.llm) as calls:
        net.prefix_cache(LabelSet(("owl",)))  # the counter does see a cache being built
    assert calls["layer0"] > 0 and calls["layer2"] > 0

    assert set(out.terms) == {"ce", "text_l1", "image_l1", "kl"}
    torch.testing.assert_close(out.total, sum(out.terms.values()))
    learned = set(net.learned_state())
    assert learned == {
        "class_token",
        "decoder.self_attn.q_proj.weight",
        "decoder.self_attn.q_proj.bias",
        "decoder.self_attn.o_proj.weight",
        "decoder.input_layernorm.weight",
        "decoder.post_attention_layernorm.weight",
        "final_norm.weight",
        "text_proj",
        "text_bias",
        "text_ctx",
        "visual_prompts",
        "lora.0.lora_a",  # one LoRA: vision layer 1 only
        "lora.0.lora_b",
        "log_logit_scale",
    }
    params = dict(net.named_parameters())
    for name in learned:
        assert params[name].grad is not None, name
    assert params["lora.0.lora_b"].grad.abs().sum() > 0  # (a's is zero while b is zero)
    frozen = [
        n
        for n in params
        if n.startswith(("decoder.self_attn.k_proj", "decoder.self_attn.v_proj", "decoder.mlp"))
    ]
    assert len(frozen) == 7  # k/v weights and biases, the MLP's three matrices
    assert all(not params[n].requires_grad and params[n].grad is None for n in frozen)
    assert all(p.grad is None and not p.requires_grad for p in net.llm.model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in net.backbone.model.parameters())
    blocks = net.backbone.model.visual.transformer.resblocks
    assert not any(parametrize.is_parametrized(b.attn) for b in blocks)  # nothing left behind


def test_lora_reaches_only_its_layers_and_without_prompts_starts_as_frozen_clip(
    train_clip_dir, tiny_lm
):
    net = _llamp(train_clip_dir, tiny_lm, visual_prompt_depth=0)
    blocks = net.backbone.model.visual.transformer.resblocks
    x = torch.randn(
        3, 3, net.preprocess.size, net.preprocess.size, generator=torch.Generator().manual_seed(1)
    )
    frozen = net.backbone.encode_images(x)
    with torch.no_grad():
        torch.testing.assert_close(net.encode_images(x), frozen, atol=1e-6, rtol=0)  # B = 0
        net.lora[0].lora_b.normal_(0, 0.5)
    weights = {}

    def grab(i):
        def hook(module, args, kwargs):
            weights[i] = module.in_proj_weight.detach().clone()

        return hook

    original = [b.attn.in_proj_weight.detach().clone() for b in blocks]
    handles = [
        b.attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i, b in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            moved = net.encode_images(x)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(weights[0], original[0])  # layer 0: outside [lora_start, lora_end)
    W = original[1].shape[1]
    delta = weights[1] - original[1]
    assert delta[:W].abs().sum() > 0 and delta[2 * W :].abs().sum() > 0  # q and v rows
    assert not delta[W : 2 * W].any()  # k untouched
    assert (moved - frozen).abs().max() > 1e-3
    torch.testing.assert_close(net.backbone.encode_images(x), frozen, atol=0, rtol=0)
    # with visual prompts the features differ from frozen CLIP from the start (the method)
    prompted = _llamp(train_clip_dir, tiny_lm)
    with torch.no_grad():
        assert (prompted.encode_images(x) - frozen).abs().max() > 1e-4


def test_settings_that_do_not_fit_the_towers_are_refused(train_clip_dir, tiny_lm):
    with pytest.raises(ValueError, match="prompt_depth 3 exceeds the 2 text layers"):
        _build(train_clip_dir, tiny_lm, prompt_depth=3)
    with pytest.raises(ValueError, match=r"2 vision layers.*\[1, 3\)"):
        _build(train_clip_dir, tiny_lm, lora_end=3)
    with pytest.raises(ValueError, match="request needs exactly one"):
        get_method("llamp").config(request="describe it")


# -- learning and checkpoints ----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(toy_task, train_clip_dir, tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("llamp-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWT_ENGINE_CACHE", str(root / "env-cache"))  # --cache-dir wins over it
        done = train(
            "llamp",
            data_root=toy_task.root,
            output=root / "llamp.safetensors",
            cache_dir=root / "cache",
            shots=4,
            seed=1,
            model=train_clip_dir,
            device="cpu",
            epochs=8,
            lr=0.02,
            batch_size=4,
            options={"llm": str(tiny_lm), "lora_lr": 0.02, **TINY},
        )
    return done


@pytest.mark.slow  # shares one training run (about 40 steps)
def test_llamp_learns_the_toy_task(trained, toy_task, train_clip_dir):
    first, last = trained.result.losses[0], trained.result.losses[-1]
    assert last["total"] < first["total"] and last["ce"] < first["ce"], (first, last)
    # the regularisers stay small: the text L1 falls from its start (LLM slots are random
    # then), the image L1 and the KL stay a fraction of the classification loss
    assert last["text_l1"] < first["text_l1"], (first, last)
    assert last["image_l1"] < 0.5 * last["ce"] and last["kl"] < 0.5 * last["ce"], last
    test = load_labelled(toy_task.root, split="test")
    labels = LabelSet(test.classes)
    net = load_trained(trained.path, device="cpu")
    zero_shot = ClipEmbedder(load_backbone(train_clip_dir, device="cpu"))
    acc = {}
    for name, model in (("zero-shot", zero_shot), ("trained", net)):
        clf = Classifier(model, labels, scorer="clip")
        acc[name] = evaluate(clf, test, ["clip"], cache_root=None).metrics["clip"].acc1
    assert acc["trained"] >= acc["zero-shot"] + 0.3, acc


@pytest.mark.slow  # shares one training run (about 40 steps)
def test_the_kv_cache_goes_to_the_runs_cache_dir(trained):
    root = trained.path.parent
    assert list((root / "cache" / "llamp_kv").glob("*.safetensors"))
    assert not (root / "env-cache" / "llamp_kv").exists()


@pytest.mark.slow  # shares one training run (about 40 steps)
def test_a_checkpoint_scores_the_same_in_a_fresh_process(trained, toy_task, tmp_path):
    out = trained.path
    h = trained.header
    assert h["method"] == "llamp" and set(h["frozen"]) == {"llm"}
    assert h["train_config"]["optimizer"] == "adamw" and h["method_config"]["n_tokens"] == 4
    test = [str(p) for p in sorted((toy_task.root / "test").rglob("*.png"))[:6]]
    here = awt_engine.create_classifier(checkpoint=out, device="cpu", views=3).scores(test)
    code = (
        "import sys, torch, awt_engine\n"
        "torch.set_num_threads(2)\n"
        "clf = awt_engine.create_classifier(checkpoint=sys.argv[1], device='cpu', views=3)\n"
        "torch.save(clf.scores(sys.argv[3:]), sys.argv[2])\n"
    )
    # its own empty cache: the K/V, self-descriptions and embeddings are all computed anew
    env = {**os.environ, "AWT_ENGINE_CACHE": str(tmp_path / "fresh-cache")}
    subprocess.run(
        [sys.executable, "-c", code, str(out), str(tmp_path / "s.pt"), *test], check=True, env=env
    )
    assert torch.equal(torch.load(tmp_path / "s.pt"), here)
    assert any((tmp_path / "fresh-cache" / "llamp_kv").glob("*.safetensors"))


@pytest.mark.slow  # shares one training run (about 40 steps)
def test_eval_with_the_awt_and_clip_scorers(trained, toy_task, tmp_path):
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "--data-root",
            str(toy_task.root),
            "--checkpoint",
            str(trained.path),
            "--scorer",
            "awt",
            "--scorer",
            "clip",
            "--views",
            "3",
            "--no-progress",
            "-o",
            str(tmp_path / "res"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert [ln.split()[0] for ln in res.stdout.splitlines()[1:3]] == ["awt", "clip"]
    rec = json.loads(next((tmp_path / "res").glob("*__awt__*.json")).read_text())
    assert rec["method"] == "llamp" and rec["n_images"] == 30
