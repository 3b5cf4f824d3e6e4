"""LLaMP: an LLM's last layer as a prompt learner for CLIP (Zheng et al., CVPR 2024).

**The offline knowledge cache.** Every (class, prompt) has an LLM *prefix*: the chat-format
request ``request`` (default "In one sentence, describe the distinctive appearance of a
{c}.") with the model's own chat template, followed by the start of the answer:

* prompt 0: ``answer_start`` ("The {c} appears as") continued by LLaMP's own one-sentence
  self-description, generated greedily by the same LLM (``self_describe``; cached on disk);
* prompt p >= 1: description p of the label set, as the answer (the description cache's
  sentences are whole answers).

Each prefix runs through the whole LLM once and its last decoder layer's keys and values
are kept, in memory and on disk (:mod:`awt_engine.methods._llamp_kv`, the format and its
size); chat templating and self-descriptions: :mod:`awt_engine.methods._llamp_describe`.

**What learns** (the launch scripts' ``--freeze_decoder_kv --freeze_decoder_ffn``):

* ``class_token`` [K, H]: K tokens shared by all classes (kaiming-uniform as the code);
* a copy of the LLM's last layer: q/o projections and both RMSNorms learn, k/v projections
  and the MLP stay frozen (so the cached keys and values stay valid), and a copy of the
  final norm. It runs on the K tokens at positions ``len .. len+K-1`` of every row, with a
  ``DynamicCache`` holding that row's cached K/V and a causal mask honouring the padding.
  The first LLM layers never run in training;
* ``text_proj`` [depth, W, H] (bias-free) + ``text_bias`` [depth, K, W]: the K LLM outputs
  become K prompt tokens in each of the first ``prompt_depth`` CLIP text layers;
* ``text_ctx`` [depth, n_ctx, W]: the context slots of those layers (layer 0 starts as the
  token + position embeddings of "a photo of a", deeper ones kaiming-uniform);
* ``visual_prompts`` [visual_prompt_depth, n_visual_ctx, Wv]: appended after the patch tokens
  before the ViT's pre-norm and replaced at the input of vision layers 1..depth-1 (the [CLS] token
  stays first, so pooling is unchanged);
* LoRA (rank r, alpha) on the q and v rows of ``in_proj_weight`` of vision layers
  [lora_start, lora_end), as a ``torch.nn.utils.parametrize`` parametrisation registered
  only for the duration of an image forward (the frozen backbone is never left modified);
* ``log_logit_scale``: the learned temperature (the code's), see ``learn_logit_scale``.

A CLIP text prompt is ``[SOS] ctx_1..ctx_n name llm_1..llm_K [EOS]`` ("suffix" type): the
ctx and LLM slots of the input of text layer i < prompt_depth are overwritten by forward
pre-hooks on open_clip's residual blocks, so the tower's own mask, EOT pooling and
projection run unchanged.

**Loss** (PromptSRC-style, ``models/llamp.py``): CE on ``s * cos`` with the text of one
prefix per step, drawn from the step's generator; ``+ text_l1_weight * L1`` between the
normalised LLaMP text features and the normalised frozen-CLIP class embeddings (mean over
the label set's prompts, computed once); ``+ image_l1_weight * L1`` between the adapted and
frozen image features of the same view; ``+ kl_weight * KL(frozen logits || LLaMP logits)``
(summed, divided by the number of logits; both at the learned scale). At initialisation
LoRA is zero but the visual prompts are already there, so the image features differ from
frozen CLIP's: that is the method, and the image L1 term pulls them back.

**Inference.** ``class_embeddings`` gives every prefix: [C, P, D]. The AWT scorer then
transports over views x prefixes (the paper averages per-template softmax probabilities).

Deviations from the paper, each deliberate:

* One request template for every class instead of 11 data-set-specific ones
  (``tools/gpt_llama_templates.py``); the prompts axis comes from the label set's
  descriptions instead.
* Self-descriptions are one greedy sentence appended as text, not spaCy noun phrases (no
  spaCy); prompt 0 always carries it, descriptions or not, so prompt 0 (what ``--scorer
  clip`` uses, and the classifier drops descriptions for scorers that do not read them)
  is the same whichever label set asks.
* The CLIP text side is ``ctx name`` (the code's "a photo of a {c}" with the context
  learned); the label set's template reaches only the frozen targets of the L1 and KL terms.
* The EOS sits right after the LLM slots at its own position (the code moves an EOS that
  keeps its original position embedding to the end of the padded row).
* No LoRA dropout: a weight parametrisation cannot drop the layer's input (the code: 0.1).
* The learned logit scale starts at the backbone's own (ln 100 for OpenAI CLIP, the
  paper's init) and is clamped to [0, ln 100] as the code does.
* The LoRA group's learning-rate floor follows the main group's ratio (the code floors
  it at max(lora_lr / lr * 1e-5, 5e-6); the same in few-shot, where both rates are 2e-5).

Official (zhaohengz/LLaMP @ 3dec7f34be: ``scripts/launch/launch_fewshot.sh``,
``flags.py``, ``deepspeed_config/zero2_a100_40g.json``) vs here, the recipe:

| setting | official | here |
|---|---|---|
| K, depth, n_ctx, visual prompts, LoRA | 16, 9, 4, 6 x 4, r 8 a 16 layers 6-11 | same |
| L1 text / image, KL | 25 / 10, 1.0 (base-to-novel 2.5, lr 2e-4) | same (``--set``) |
| AdamW lr (LoRA), wd, batch, epochs | 2e-5 (2e-5), 5e-5, 4, 20 | same |
| schedule | cosine per epoch, floor 1e-5, a warm-up over a tenth of epoch 0 | no warm-up |
| gradient clipping | 1.0 (DeepSpeed ``gradient_clipping``) | 1.0 |
| precision, parallelism | bf16, DeepSpeed ZeRO-2 | bf16 on a GPU, one process |
| LLM | Llama-2-7b-chat | same; ``--preset small``: Qwen2.5-0.5B-Instruct |

Axes: B images, C classes, P prompts (prefixes), N rows (class-prompt pairs), K LLM
tokens, T prefix length, H LLM width, W CLIP text width, D embedding width.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from awt_engine._io import resolve_cache_root, sha256_hex
from awt_engine.labels import LabelSet
from awt_engine.methods._llamp_config import LN_100, PRESETS, LLaMPConfig, llamp_train_defaults
from awt_engine.methods._llamp_describe import (
    chat_head,
    generate,
    read_descriptions,
    write_descriptions,
)
from awt_engine.methods._llamp_hooks import text_prompts, visual_prompts
from awt_engine.methods._llamp_kv import (
    KVLayout,
    PrefixCache,
    build_kv,
    cache_key,
    kv_dtype,
    read_kv,
    tokenize,
    write_kv,
)
from awt_engine.methods._llamp_llm import last_layer_copy, run_last_layer
from awt_engine.methods.base import LossOutput, MethodSpec, TrainableModel, TrainBatch
from awt_engine.models.clip_text import ClipTextTower
from awt_engine.models.lora import FusedQVLoRA, fused_lora_attached, has_fused_qkv
from awt_engine.registry import display_name

_ROWS_PER_CHUNK = 64  # class-prompt rows per forward at inference (bounds memory)


# ----------------------------------------------------------------------------------------
# small pieces
# ----------------------------------------------------------------------------------------


def _kaiming(shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """The code's ``kaiming_uniform_(a=sqrt(5))`` init, from our generator."""
    t = torch.empty(*shape)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    return t


# ----------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------


class LLaMP(TrainableModel):
    method = "llamp"
    int8_refusal = "its LoRA changes the image tower's attention weights and its prompts enter the image tower's blocks"

    def __init__(self, backbone, config: LLaMPConfig):
        super().__init__(backbone, config)
        from awt_engine.models.llm import load_causal_lm

        self._clip_logit_scale = float(backbone.logit_scale)
        self._check_clip()  # the CLIP's layers against the settings, before the LLM loads
        self.kv_cache_root: Path | None = resolve_cache_root()  # None: memory only
        # (train() and create_classifier() pass their --cache-dir: use_cache_root)
        llm = load_causal_lm(config.llm, device=str(backbone.device), dtype=config.llm_dtype)
        object.__setattr__(self, "llm", llm)  # frozen, not a submodule (never trained, saved)
        decoder, final_norm, self.hidden = last_layer_copy(llm, config.llm)  # H
        self.decoder, self.final_norm = decoder, final_norm
        self._kv: dict[str, PrefixCache] = {}
        self._described: dict[str, tuple[str, ...]] = {}
        self._ids_memo: dict[str, tuple[Tensor, Tensor]] = {}

    def use_cache_root(self, root) -> None:
        self.kv_cache_root = None if root is None else Path(root)

    # -- the frozen towers -----------------------------------------------------------

    def _check_clip(self) -> None:
        cfg = self.config
        bb = self.backbone
        self.text = ClipTextTower(bb)
        text = bb.text_blocks  # frozen CLIP's modules: never submodules of this model
        self._text_blocks, self._text_bf = list(text.blocks), text.batch_first
        if cfg.prompt_depth > len(self._text_blocks):
            raise ValueError(
                f"prompt_depth {cfg.prompt_depth} exceeds the {len(self._text_blocks)} text "
                f"layers of this CLIP (--set prompt_depth={len(self._text_blocks)})"
            )
        if bb.vision_pre_norm is None or bb.vision_positional_embedding is None:
            raise ValueError(
                "LLaMP needs open_clip's VisionTransformer (a norm before the first block and "
                f"a positional embedding); this model has {type(bb.vision_tower).__name__}"
            )
        vision = bb.vision_blocks
        self._vision_blocks, self._vision_bf = list(vision.blocks), vision.batch_first
        n = len(self._vision_blocks)
        if cfg.visual_prompt_depth > n or (cfg.lora_rank and cfg.lora_end > n):
            raise ValueError(
                f"this CLIP has {n} vision layers: visual_prompt_depth "
                f"{cfg.visual_prompt_depth} and LoRA layers [{cfg.lora_start}, "
                f"{cfg.lora_end}) must fit"
            )
        if cfg.visual_prompt_depth and not bb.vision_pools_cls:
            raise ValueError(
                "visual prompts need a ViT pooled by its [CLS] token (no attention "
                "pooling); set visual_prompt_depth=0 for this CLIP"
            )
        if cfg.lora_rank:
            for i in range(cfg.lora_start, cfg.lora_end):
                if not has_fused_qkv(self._vision_blocks[i].attn):
                    raise ValueError(f"vision layer {i} has no fused q/k/v in_proj_weight for LoRA")
        self.visual_width = int(bb.vision_positional_embedding.shape[-1])

    def frozen_parts(self) -> dict[str, str]:
        return {"llm": self.llm.fingerprint}

    @property
    def base_identity(self) -> str:
        """Also the settings that make the prefixes (and so every class embedding)."""
        cfg = self.config
        parts = (cfg.llm_dtype, cfg.request, cfg.answer_start, cfg.system_prompt)
        parts += (str(cfg.self_describe), str(cfg.self_description_tokens))
        return f"{super().base_identity}|llamp-prefixes:{sha256_hex(*parts)[:16]}"

    @property
    def logit_scale(self) -> float:
        if self.config.learn_logit_scale and hasattr(self, "log_logit_scale"):
            return float(self._scale().detach().exp())
        return self._clip_logit_scale

    @logit_scale.setter
    def logit_scale(self, value: float) -> None:  # the base class sets the backbone's
        self._clip_logit_scale = float(value)

    def _scale(self) -> Tensor:
        """The learned log scale, clamped to [0, ln 100] (the code clamps every step)."""
        return self.log_logit_scale.clamp(0.0, LN_100)

    # -- learned tensors ---------------------------------------------------------------

    def prepare(self, labels: LabelSet, seed: int = 0) -> None:
        super().prepare(labels, seed)
        cfg = self.config
        g = torch.Generator().manual_seed(seed)
        dev, K, W, depth = self.device, cfg.n_tokens, self.text.width, cfg.prompt_depth
        self.class_token = nn.Parameter(_kaiming((K, self.hidden), g).to(dev))
        bound = 1 / math.sqrt(self.hidden)  # nn.Linear's default init (kaiming a=sqrt(5))
        proj = (torch.rand(depth, W, self.hidden, generator=g) * 2 - 1) * bound
        self.text_proj = nn.Parameter(proj.to(dev))  # [depth, W, H]
        self.text_bias = nn.Parameter(
            torch.stack([_kaiming((K, W), g) for _ in range(depth)]).to(dev)
        )
        ctx_ids = self.text.encode_words(cfg.ctx_init.replace("_", " "))
        if not ctx_ids:
            raise ValueError(f"ctx_init {cfg.ctx_init!r} has no tokens")
        self.n_ctx = len(ctx_ids)
        pos = self.backbone.text_positional_embedding.detach().float().cpu()
        first = self.text.word_embeddings(ctx_ids).cpu() + pos[1 : 1 + self.n_ctx]
        deeper = [_kaiming((self.n_ctx, W), g) for _ in range(depth - 1)]
        self.text_ctx = nn.Parameter(torch.stack([first, *deeper]).to(dev))  # [depth, n, W]
        if cfg.visual_prompt_depth:
            vp = _kaiming((cfg.visual_prompt_depth, cfg.n_visual_ctx, self.visual_width), g)
            self.visual_prompts = nn.Parameter(vp.to(dev))
        if cfg.lora_rank:
            self.lora = nn.ModuleList(
                FusedQVLoRA(
                    self._vision_blocks[i].attn.in_proj_weight.shape[1],
                    cfg.lora_rank,
                    cfg.lora_alpha,
                    g,
                )
                for i in range(cfg.lora_start, cfg.lora_end)
            ).to(dev)
        init = math.log(self._clip_logit_scale)
        self.log_logit_scale = nn.Parameter(
            torch.tensor(min(max(init, 0.0), LN_100), device=dev),
            requires_grad=cfg.learn_logit_scale,
        )
        # the offline part (every training prefix through the LLM once) waits for the first
        # step: a loaded checkpoint that scores other labels, or writes to another cache
        # folder (use_cache_root after load), never builds it
        self._train_cache: PrefixCache | None = None
        self._frozen_text: Tensor | None = None

    def train_cache(self) -> PrefixCache:
        """The K/V cache of the training label set's prefixes (built at the first step)."""
        if self._train_cache is None:
            self._train_cache = self.prefix_cache(self.train_labels)
        return self._train_cache

    def frozen_text(self) -> Tensor:
        """The regularisers' targets: frozen CLIP's class embeddings, the mean over the
        training label set's prompts, normalised: [C, D] (computed at the first step)."""
        if self._frozen_text is None:
            labels = self.train_labels
            texts = [t for row in labels.prompt_texts() for t in row]
            frozen = self.backbone.encode_text(texts)  # no graph
            frozen = frozen.view(labels.n_classes, labels.n_prompts, -1).mean(1)
            self._frozen_text = F.normalize(frozen, dim=-1)
        return self._frozen_text

    def param_groups(self, lr: float) -> list[dict]:
        lora = [p for n, p in self.named_parameters() if p.requires_grad and n.startswith("lora.")]
        ids = {id(p) for p in lora}
        main = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": main, "lr": lr}]
        if lora:
            groups.append({"params": lora, "lr": self.config.lora_lr})
        return groups

    # -- prefixes and their cache ------------------------------------------------------

    def _bare(self, name: str) -> str:
        return chat_head(self.llm.tokenizer, self.config, name) + self.config.answer_start.format(
            name
        )

    def prefix_texts(self, labels: LabelSet) -> list[list[str]]:
        """The LLM prefix of every (class, prompt): [C][P] strings (module docstring)."""
        names = [display_name(c) for c in labels.classes]
        own = self.self_descriptions(labels) if self.config.self_describe else ("",) * len(names)
        tok, out = self.llm.tokenizer, []
        for c, name in enumerate(names):
            zero = self._bare(name) + (f" {own[c]}" if own[c] else "")
            head = chat_head(tok, self.config, name)
            out.append([zero, *(head + d for d in labels.class_descriptions(c))])
        return out

    def _cache_file(self, name: str) -> Path | None:
        return None if self.kv_cache_root is None else self.kv_cache_root / "llamp_kv" / name

    def self_descriptions(self, labels: LabelSet) -> tuple[str, ...]:
        """LLaMP's own one-sentence description of every class: greedy, from the bare
        prefix, cached on disk (``llamp_kv/describe-<sha>.json``) per LLM and classes."""
        names = [display_name(c) for c in labels.classes]
        bare = [self._bare(n) for n in names]
        n_new = self.config.self_description_tokens
        key = cache_key(self.llm, "describe", bare, str(n_new))
        if key in self._described:
            return self._described[key]
        path = self._cache_file(f"describe-{key[:32]}.json")
        texts = read_descriptions(path, key, len(names)) if path else None
        if texts is None:
            texts = generate(self.llm, bare, n_new)
            if path is not None:
                write_descriptions(path, key, self.llm, names, texts)
        self._described[key] = texts
        return texts

    def prefix_cache(self, labels: LabelSet) -> PrefixCache:
        """The K/V cache of every (class, prompt) prefix, rows ``c * P + p``: from memory,
        else the disk (verified), else the whole LLM once (then written)."""
        texts = tuple(t for row in self.prefix_texts(labels) for t in row)
        key = cache_key(self.llm, "kv", texts)
        if key in self._kv:
            return self._kv[key]
        path = self._cache_file(f"{key[:32]}.safetensors")
        ids = tokenize(self.llm.tokenizer, texts)
        attn = self.decoder.self_attn
        heads = int(attn.k_proj.out_features // attn.head_dim)
        layout = KVLayout(heads, int(attn.head_dim), kv_dtype(self.llm))
        with torch.no_grad():
            cache = read_kv(path, key, texts, ids, layout, self.device) if path else None
            if cache is None:
                cache = build_kv(self.llm, texts, ids, layout, self.device)
            if cache.path is None and path is not None:  # built here: write it (a hit is read)
                write_kv(cache, path, key, self.llm)
        self._kv[key] = cache
        return cache

    # -- the LLM's last layer over the class tokens ------------------------------------

    def llm_outputs(self, cache: PrefixCache, rows: Tensor, *, normed: bool = True) -> Tensor:
        """The copied last layer over the K class tokens of ``rows``, each attending to its
        cached prefix, at positions len .. len+K-1: [n, K, H] (after the copied final norm
        unless ``normed`` is False)."""
        h = run_last_layer(self.llm, self.decoder, self.class_token, cache, rows)
        return self.final_norm(h) if normed else h

    # -- CLIP text with LLM prompts ----------------------------------------------------

    def _clip_ids(self, labels: LabelSet) -> tuple[Tensor, Tensor]:
        """CLIP token ids [C, L] (``[SOS] ctx name llm [EOS]``) and the LLM slot columns
        [C, K]; the ctx slots are columns 1..n_ctx of every row."""
        key = "\0".join(labels.classes)
        if key in self._ids_memo:
            return self._ids_memo[key]
        K = self.config.n_tokens
        batch = self.text.batch(
            [[("ctx", self.n_ctx), display_name(c), ("llm", K)] for c in labels.classes]
        )
        cols = batch.slots["llm"].cols.view(labels.n_classes, K)
        ctx_cols = batch.slots["ctx"].cols.view(labels.n_classes, self.n_ctx)
        assert bool((ctx_cols == torch.arange(1, 1 + self.n_ctx)).all())
        self._ids_memo[key] = (batch.ids, cols)
        return batch.ids, cols

    def _encode_text(self, ids: Tensor, cols: Tensor, llm: Tensor) -> Tensor:
        """[n, L] ids, [n, K] LLM slot columns, [n, K, H] LLM outputs -> [n, D] unit."""
        prompts = torch.einsum("nkh,dwh->dnkw", llm, self.text_proj) + self.text_bias[:, None]
        dev = self.device
        with text_prompts(self._text_blocks, self._text_bf, self.text_ctx, prompts, cols.to(dev)):
            feats = self.backbone.text_forward(ids.to(dev))
        return F.normalize(feats.float(), dim=-1)

    def _text_features(self, labels: LabelSet, cache: PrefixCache, rows: Tensor) -> Tensor:
        """Text features of the (class, prompt) ``rows`` (``c * P + p``): [n, D]; in
        chunks when no graph is kept (inference over every prefix)."""
        ids, cols = self._clip_ids(labels)
        rows = rows.cpu()
        step = rows.numel() if torch.is_grad_enabled() else _ROWS_PER_CHUNK
        out = []
        for s in range(0, rows.numel(), step):
            part = rows[s : s + step]
            c = part // labels.n_prompts
            out.append(self._encode_text(ids[c], cols[c], self.llm_outputs(cache, part)))
        return torch.cat(out)

    def class_embeddings(self, labels: LabelSet) -> Tensor:
        """[C, P, D]: every prefix of every class (prompt 0 the self-described one)."""
        cache = self.prefix_cache(labels)
        rows = torch.arange(labels.n_classes * labels.n_prompts)
        feats = self._text_features(labels, cache, rows)
        return feats.view(labels.n_classes, labels.n_prompts, -1)

    # -- CLIP images with visual prompts and LoRA --------------------------------------

    @contextmanager
    def _vision_adapted(self) -> Iterator[None]:
        """Visual prompts (pre-hooks) and LoRA (parametrisations) on the frozen vision
        tower for the duration of one forward; removed afterwards, whatever happens."""
        cfg = self.config
        layers = range(cfg.lora_start, cfg.lora_end) if cfg.lora_rank else range(0)
        pairs = [(self._vision_blocks[i].attn, self.lora[j]) for j, i in enumerate(layers)]
        with fused_lora_attached(pairs):
            if not cfg.visual_prompt_depth:
                yield
                return
            pre_norm = self.backbone.vision_pre_norm
            with visual_prompts(
                pre_norm, self._vision_blocks, self._vision_bf, self.visual_prompts
            ):
                yield

    def encode_images(self, pixels: Tensor) -> Tensor:
        """[N, 3, R, R] -> [N, D] unit vectors through the prompted, LoRA'd vision tower."""
        with self._vision_adapted():
            return self.backbone.encode_images(pixels, grad=True)

    # -- training ----------------------------------------------------------------------

    def training_loss(self, batch: TrainBatch) -> LossOutput:
        cfg, labels = self.config, self.train_labels
        C, P = labels.n_classes, labels.n_prompts
        with torch.no_grad():  # as the code: the parameter itself stays in [0, ln 100]
            self.log_logit_scale.clamp_(0.0, LN_100)
        p = int(torch.randint(P, (1,), generator=batch.generator))  # one prefix per step
        rows = torch.arange(C) * P + p
        txt = self._text_features(labels, self.train_cache(), rows)  # [C, D]
        views = batch.views.flatten(0, 1)
        img = self.encode_images(views)  # [B, D]
        img0 = self.backbone.encode_images(views, grad=False)  # frozen CLIP, same views
        scale = self._scale().exp() if cfg.learn_logit_scale else self._clip_logit_scale
        y = batch.labels.repeat_interleave(batch.views.shape[1])
        logits = scale * img @ txt.T
        target = self.frozen_text()
        frozen = scale * img0 @ target.T
        ce = F.cross_entropy(logits, y)
        kl = (
            F.kl_div(
                F.log_softmax(logits, dim=-1),
                F.log_softmax(frozen, dim=-1),
                reduction="sum",
                log_target=True,
            )
            / logits.numel()
        )
        terms = {
            "ce": ce,
            "text_l1": cfg.text_l1_weight * F.l1_loss(txt, target),
            "image_l1": cfg.image_l1_weight * F.l1_loss(img, img0),
            "kl": cfg.kl_weight * kl,
        }
        return LossOutput(sum(terms.values()), terms)


METHOD = MethodSpec(
    name="llamp",
    summary="LLaMP: an LLM's last layer over a cached class prefix prompts both CLIP towers",
    config=LLaMPConfig,
    model=LLaMP,
    train_defaults=llamp_train_defaults,
    paper="Zheng et al., Large Language Models are Good Prompt Learners for Low-Shot "
    "Image Classification, CVPR 2024",
    needs=("llm",),
    presets=PRESETS,
    default_preset="released",
)


__all__ = ["METHOD", "LLaMP", "LLaMPConfig", "PrefixCache", "llamp_train_defaults"]
