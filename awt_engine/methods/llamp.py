"""LLaMP: an LLM's last layer as a prompt learner for CLIP (Zheng et al., CVPR 2024).

**The offline knowledge cache.** Every (class, prompt) has an LLM *prefix*: the chat-format
request ``request`` (default "In one sentence, describe the distinctive appearance of a
{c}.") with the model's own chat template, followed by the start of the answer:

* prompt 0: ``answer_start`` ("The {c} appears as") continued by LLaMP's own one-sentence
  self-description, generated greedily by the same LLM (``self_describe``; cached on disk);
* prompt p >= 1: description p of the label set, as the answer (the description cache's
  sentences are whole answers).

Each prefix runs through the whole LLM once; only the **last decoder layer's** keys and
values (post-rotary, ``[N, kv_heads, T, head_dim]``, left-padded, with the prefix
lengths) are kept, on disk under ``<cache>/llamp_kv/<sha>.safetensors``, keyed by the LLM
fingerprint, its dtype and the prefix texts (checksummed; a damaged file is rebuilt with a
warning naming it). Prefix tokens sit at positions 0..len-1 (``cumsum(mask) - 1``). The
values are kept at the LLM's precision (float16 for a float16 LLM, else float32): C x P x
T x 2 x kv_width of them, e.g. about 8 GB for 100 classes x 51 prompts x 100 tokens at
Llama-2-7B in float16.

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

Defaults: ``scripts/launch/launch_fewshot.sh`` and ``flags.py``: K = 16, depth 9, n_ctx 4,
visual prompts 6 x 4, LoRA r 8 alpha 16 on vision layers 6..11, L1 weights 25 / 10, KL
1.0 (base-to-novel: ``--lr 2e-4 --set kl_weight=2.5``), AdamW lr 2e-5 (LoRA 2e-5) wd 5e-5,
batch 4, 20 epochs, cosine per epoch floored at 1e-5, bf16; Llama-2-7b-chat.

Axes: B images, C classes, P prompts (prefixes), N rows (class-prompt pairs), K LLM
tokens, T prefix length, H LLM width, W CLIP text width, D embedding width.
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from awt_engine._io import (
    atomic_write_json,
    resolve_cache_root,
    sha256_hex,
    warn_unwritable,
)
from awt_engine._tensorfile import DamagedEntry, load_tensors, save_tensors
from awt_engine.labels import LabelSet
from awt_engine.methods.base import LossOutput, MethodSpec, TrainableModel, TrainBatch, bounded
from awt_engine.models.clip_text import ClipTextTower
from awt_engine.registry import display_name
from awt_engine.training.loop import TrainConfig

KV_FORMAT = "1"  # what a K/V cache file holds; part of its key
DESCRIBE_FORMAT = 1
LN_100 = math.log(100.0)  # the code's clamp of the learned logit scale
_ROWS_PER_CHUNK = 64  # class-prompt rows per forward at inference (bounds memory)
_LLM_BATCH = 16  # prefixes per full-LLM pass when building the cache (the code's batch)


@dataclass(frozen=True)
class LLaMPConfig:
    llm: str = "meta-llama/Llama-2-7b-chat-hf"  # the paper's LLM
    llm_dtype: str = "auto"  # checkpoint dtype on a GPU, float32 on CPU (models/llm.py)
    n_tokens: int = bounded(16, 1, 512)  # K, --num_llm_prompts
    prompt_depth: int = bounded(9, 1, 256)  # CLIP text layers fed LLM prompts, --llm_prompt_depth
    ctx_init: str = "a photo of a"  # layer-0 context (the code: 4 tokens, this phrase)
    # flags.py --visual_prompt_depth (vision layers 0..5)
    visual_prompt_depth: int = bounded(6, 0, 256)
    n_visual_ctx: int = bounded(4, 0, 512)  # flags.py --num_vis_ctx
    lora_rank: int = bounded(8, 0, 1024)  # launch scripts --lora_rank
    lora_alpha: float = 16.0  # --lora_alpha
    lora_start: int = bounded(6, 0, 1024)  # --v_lora_start
    lora_end: int = bounded(12, 0, 1024)  # --v_lora_end (exclusive)
    lora_lr: float = 2e-5  # --lora_lr: LoRA's own parameter group
    text_l1_weight: float = 25.0  # models/llamp.py
    image_l1_weight: float = 10.0  # models/llamp.py
    kl_weight: float = 1.0  # --lambda_dist: 1.0 few-shot, 2.5 base-to-novel
    learn_logit_scale: bool = True  # the code learns it (clamped to [0, ln 100])
    request: str = "In one sentence, describe the distinctive appearance of a {}."
    answer_start: str = "The {} appears as"  # tools/run_inference_chat.py
    system_prompt: str = "You are a helpful assistant."  # tools/run_inference_chat.py
    self_describe: bool = True  # prompt 0 continues answer_start with the LLM's own sentence
    self_description_tokens: int = bounded(64, 1, 4096)  # the code's max_new_tokens (greedy)

    def __post_init__(self) -> None:
        for name in ("n_tokens", "prompt_depth", "self_description_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
        for name in ("visual_prompt_depth", "n_visual_ctx", "lora_rank", "lora_start"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {v!r}")
        if self.visual_prompt_depth and not self.n_visual_ctx:
            raise ValueError("visual prompts need n_visual_ctx >= 1 (or visual_prompt_depth=0)")
        if self.lora_rank and not (0 <= self.lora_start < self.lora_end):
            raise ValueError(
                f"LoRA layers [lora_start, lora_end) must be a non-empty range, got "
                f"[{self.lora_start}, {self.lora_end})"
            )
        for name in ("text_l1_weight", "image_l1_weight", "kl_weight", "lora_lr", "lora_alpha"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("request", "answer_start"):
            if getattr(self, name).count("{}") != 1:
                raise ValueError(f"{name} needs exactly one {{}} for the class name")
        if not self.ctx_init.strip():
            raise ValueError("ctx_init must be a phrase, e.g. 'a photo of a'")


def llamp_train_defaults(shots: int, dataset: str | None) -> TrainConfig:
    """LLaMP's few-shot launch script: AdamW 2e-5, wd 5e-5, batch 4, 20 epochs, the cosine
    stepped per epoch from the first epoch (the code warms up for a tenth of epoch 0 only)
    with a floor of 1e-5, bf16 on a GPU."""
    return TrainConfig(
        epochs=20,
        lr=2e-5,
        batch_size=4,
        optimizer="adamw",
        weight_decay=5e-5,
        warmup_epochs=0,
        warmup="none",
        min_lr=1e-5,
        precision="bf16",
    )


# ----------------------------------------------------------------------------------------
# small pieces
# ----------------------------------------------------------------------------------------


class QVLoRA(nn.Module):
    """Low-rank updates of the q and v row blocks of a fused ``in_proj_weight`` [3W, W]
    (open_clip's attention), zero for k: a ``torch.nn.utils.parametrize`` parametrisation.
    ``B`` starts at zero, so the attention starts unchanged (peft's init for ``A``)."""

    def __init__(self, width: int, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.width, self.scale = width, alpha / rank
        a = torch.empty(2, rank, width)
        for i in range(2):
            nn.init.kaiming_uniform_(a[i], a=math.sqrt(5), generator=generator)
        self.lora_a = nn.Parameter(a)  # [2, r, W]: q, v
        self.lora_b = nn.Parameter(torch.zeros(2, width, rank))  # [2, W, r]

    def forward(self, weight: Tensor) -> Tensor:
        dq, dv = (self.lora_b @ self.lora_a * self.scale).to(weight.dtype)  # [W, W] each
        return weight + torch.cat([dq, torch.zeros_like(dq), dv])


def _kaiming(shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """The code's ``kaiming_uniform_(a=sqrt(5))`` init, from our generator."""
    t = torch.empty(*shape)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    return t


@dataclass
class PrefixCache:
    """The last decoder layer's keys and values of N left-padded prefixes."""

    keys: Tensor  # [N, kv_heads, T, head_dim] post-rotary, zero at padding (LLM precision)
    values: Tensor  # [N, kv_heads, T, head_dim]
    mask: Tensor  # [N, T] int64, 1 on prefix tokens (left padding)
    lengths: Tensor  # [N] int64 prefix lengths
    texts: tuple[str, ...]
    path: Path | None = None  # the file it lives in (None: not written)


@contextmanager
def _autocast_off(device: torch.device) -> Iterator[None]:
    """No autocast around the frozen LLM's cached outputs (self-descriptions, K/V): their
    key names the LLM's own dtype, so they are computed in it, the same whether the first
    training step (under the training autocast) or classify builds them."""
    with torch.autocast("cpu", enabled=False):
        if device.type == "cpu":
            yield
            return
        with torch.autocast(device.type, enabled=False):
            yield


def _first_sentence(text: str) -> str:
    """The first line's first sentence of a generated answer, stripped."""
    line = text.strip().split("\n", 1)[0].strip()
    m = re.match(r"(.+?[.!?])(\s|$)", line)
    return (m.group(1) if m else line).strip()


# ----------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------


class LLaMP(TrainableModel):
    method = "llamp"

    def __init__(self, backbone, config: LLaMPConfig):
        super().__init__(backbone, config)
        from awt_engine.models.llm import load_causal_lm

        self._clip_logit_scale = float(backbone.logit_scale)
        self.kv_cache_root: Path | None = resolve_cache_root()  # None: memory only
        # (train() and create_classifier() pass their --cache-dir: use_cache_root)
        llm = load_causal_lm(config.llm, device=str(backbone.device), dtype=config.llm_dtype)
        object.__setattr__(self, "llm", llm)  # frozen, not a submodule (never trained, saved)
        base = getattr(llm.model, "model", None)
        layers = getattr(base, "layers", None)
        needed = ("embed_tokens", "norm", "rotary_emb")
        if layers is None or not all(hasattr(base, n) for n in needed):
            raise ValueError(
                f"LLaMP needs a decoder-only LM with model.layers, embed_tokens, norm and "
                f"rotary_emb (Llama, Qwen2, Mistral); {config.llm} is "
                f"{type(llm.model).__name__}"
            )
        kinds = getattr(base.config, "layer_types", None)
        if kinds and kinds[-1] != "full_attention":
            raise ValueError(f"{config.llm}: the last layer is {kinds[-1]}, LLaMP needs full")
        self.hidden = int(base.config.hidden_size)  # H
        # the trainable copy of the last layer, in float32 (AdamW on half weights drifts)
        decoder = copy.deepcopy(layers[-1]).float()
        decoder.self_attn.layer_idx = 0  # it is layer 0 of its own one-layer cache
        decoder.self_attn.attention_dropout = 0.0  # no draws from the global RNG
        decoder.requires_grad_(False)
        for part in (
            decoder.self_attn.q_proj,
            decoder.self_attn.o_proj,
            decoder.input_layernorm,
            decoder.post_attention_layernorm,
        ):
            part.requires_grad_(True)
        self.decoder = decoder
        self.final_norm = copy.deepcopy(base.norm).float().requires_grad_(True)
        self._kv: dict[str, PrefixCache] = {}
        self._described: dict[str, tuple[str, ...]] = {}
        self._ids_memo: dict[str, tuple[Tensor, Tensor]] = {}
        self._check_clip()

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
                "layers of this CLIP"
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
                w = getattr(self._vision_blocks[i].attn, "in_proj_weight", None)
                if w is None or w.shape[0] != 3 * w.shape[1]:
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
                QVLoRA(
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

    def _chat_head(self, name: str) -> str:
        """The chat-formatted request for class ``name``, up to the assistant's answer."""
        cfg, tok = self.config, self.llm.tokenizer
        request = cfg.request.format(name)
        if getattr(tok, "chat_template", None) is None:
            return request + "\n"  # a base LM without a chat template: plain text
        system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        try:
            return tok.apply_chat_template(
                [*system, {"role": "user", "content": request}],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception:  # a template without a system role (Gemma): fold it into the request
            if not system:
                raise
            return tok.apply_chat_template(
                [{"role": "user", "content": f"{cfg.system_prompt}\n\n{request}"}],
                tokenize=False,
                add_generation_prompt=True,
            )

    def _bare(self, name: str) -> str:
        return self._chat_head(name) + self.config.answer_start.format(name)

    def prefix_texts(self, labels: LabelSet) -> list[list[str]]:
        """The LLM prefix of every (class, prompt): [C][P] strings (module docstring)."""
        names = [display_name(c) for c in labels.classes]
        own = self.self_descriptions(labels) if self.config.self_describe else ("",) * len(names)
        out = []
        for c, name in enumerate(names):
            zero = self._bare(name) + (f" {own[c]}" if own[c] else "")
            out.append([zero, *(self._chat_head(name) + d for d in labels.class_descriptions(c))])
        return out

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        ids = [list(self.llm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        if any(not row for row in ids):
            raise ValueError("an LLM prefix has no tokens")
        return ids

    def _pad(self, rows: Sequence[list[int]], T: int) -> tuple[Tensor, Tensor]:
        tok = self.llm.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return ids, mask

    def _key(self, kind: str, texts: Sequence[str], *extra: str) -> str:
        return sha256_hex(
            f"awt-engine/llamp-{kind}",
            KV_FORMAT,
            self.llm.fingerprint,
            str(self.llm.model.dtype),
            json.dumps(list(texts), ensure_ascii=False),
            *extra,
        )

    def self_descriptions(self, labels: LabelSet) -> tuple[str, ...]:
        """LLaMP's own one-sentence description of every class: greedy, from the bare
        prefix, cached on disk (``llamp_kv/describe-<sha>.json``) per LLM and classes."""
        names = [display_name(c) for c in labels.classes]
        bare = [self._bare(n) for n in names]
        key = self._key("describe", bare, str(self.config.self_description_tokens))
        if key in self._described:
            return self._described[key]
        path = None if self.kv_cache_root is None else self.kv_cache_root / "llamp_kv"
        path = None if path is None else path / f"describe-{key[:32]}.json"
        texts = self._read_descriptions(path, key, len(names)) if path else None
        if texts is None:
            texts = self._generate(bare)
            if path is not None:
                record = {
                    "format": DESCRIBE_FORMAT,
                    "key": key,
                    "llm": self.llm.fingerprint,
                    "classes": names,
                    "descriptions": list(texts),
                }
                try:
                    atomic_write_json(path, record)
                except OSError as exc:
                    warn_unwritable(path.parent, exc, "LLaMP self-description")
        self._described[key] = texts
        return texts

    def _read_descriptions(self, path: Path, key: str, n: int) -> tuple[str, ...] | None:
        if not path.exists():
            return None
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            texts = rec.get("descriptions") if isinstance(rec, dict) else None
            ok = (
                rec.get("format") == DESCRIBE_FORMAT
                and rec.get("key") == key
                and isinstance(texts, list)
                and len(texts) == n
                and all(isinstance(t, str) for t in texts)
            )
            if not ok:
                raise ValueError("not this cache's record (format, key or count)")
        except (OSError, ValueError, AttributeError) as exc:
            warnings.warn(
                f"LLaMP self-description cache {path} is damaged ({exc}); generating again",
                stacklevel=3,
            )
            return None
        return tuple(texts)

    def _generate(self, prompts: Sequence[str]) -> tuple[str, ...]:
        """Greedy continuations, ``self_description_tokens`` at most, first sentence kept."""
        model, tok = self.llm.model, self.llm.tokenizer
        ids = self._tokenize(prompts)
        out: list[str] = []
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        for s in range(0, len(ids), _LLM_BATCH):
            rows = ids[s : s + _LLM_BATCH]
            T = max(map(len, rows))
            inp, mask = self._pad(rows, T)
            with torch.inference_mode(), _autocast_off(model.device):
                gen = model.generate(
                    input_ids=inp.to(model.device),
                    attention_mask=mask.to(model.device),
                    max_new_tokens=self.config.self_description_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=pad,
                )
            texts = tok.batch_decode(gen[:, T:], skip_special_tokens=True)
            out += [_first_sentence(t) for t in texts]
        return tuple(out)

    def prefix_cache(self, labels: LabelSet) -> PrefixCache:
        """The K/V cache of every (class, prompt) prefix, rows ``c * P + p``: from memory,
        else the disk (verified), else the whole LLM once (then written)."""
        texts = tuple(t for row in self.prefix_texts(labels) for t in row)
        key = self._key("kv", texts)
        if key in self._kv:
            return self._kv[key]
        folder = None if self.kv_cache_root is None else self.kv_cache_root / "llamp_kv"
        path = None if folder is None else folder / f"{key[:32]}.safetensors"
        ids = self._tokenize(texts)
        with torch.no_grad():
            cache = self._read_kv(path, key, texts, ids) if path is not None else None
            if cache is None:
                cache = self._build_kv(texts, ids)
            if cache.path is None and path is not None:  # built here: write it (a hit is read)
                meta = {"format": KV_FORMAT, "key": key, "llm": self.llm.fingerprint}
                tensors = {
                    "keys": cache.keys,
                    "values": cache.values,
                    "mask": cache.mask,
                    "lengths": cache.lengths,
                }
                try:
                    save_tensors(path, tensors, meta)
                    cache.path = path
                except OSError as exc:
                    warn_unwritable(folder, exc, "LLaMP K/V")
        self._kv[key] = cache
        return cache

    def _kv_dtype(self) -> torch.dtype:
        """The LLM's own precision: float16 for a float16 LLM, else float32 (the cache files
        hold no bfloat16, and float16 cannot hold every bfloat16 value)."""
        return torch.float16 if self.llm.model.dtype == torch.float16 else torch.float32

    def _kv_shape(self) -> tuple[int, int]:
        attn = self.decoder.self_attn
        return int(attn.k_proj.out_features // attn.head_dim), int(attn.head_dim)

    def _read_kv(self, path: Path, key: str, texts, ids) -> PrefixCache | None:
        if not path.exists():
            return None
        heads, dim = self._kv_shape()
        N, T = len(texts), max(map(len, ids))
        expect = {
            "keys": (self._kv_dtype(), (N, heads, T, dim)),
            "values": (self._kv_dtype(), (N, heads, T, dim)),
            "mask": (torch.int64, (N, T)),
            "lengths": (torch.int64, (N,)),
        }
        try:
            t, meta = load_tensors(path, expect)
            if meta.get("key") != key or meta.get("format") != KV_FORMAT:
                raise DamagedEntry("its header names another cache entry")
            lengths = torch.tensor([len(r) for r in ids])
            left = (torch.arange(T)[None] >= (T - lengths)[:, None]).long()
            if not torch.equal(t["lengths"], lengths) or not torch.equal(t["mask"], left):
                raise DamagedEntry("its prefix lengths or padding do not match the prefixes")
        except DamagedEntry as exc:
            warnings.warn(f"LLaMP K/V cache {path} is damaged ({exc}); rebuilding it", stacklevel=3)
            return None
        dev = self.device
        return PrefixCache(
            t["keys"].to(dev),
            t["values"].to(dev),
            t["mask"].to(dev),
            t["lengths"].to(dev),
            tuple(texts),
            path,
        )

    def _build_kv(self, texts, ids) -> PrefixCache:
        """Run the whole LLM once over the left-padded prefixes (positions 0..len-1) and
        keep its last layer's keys and values, zeroed at the padding."""
        model = self.llm.model
        heads, dim = self._kv_shape()
        N, T = len(texts), max(map(len, ids))
        keys = torch.zeros(N, heads, T, dim, dtype=self._kv_dtype())
        values = torch.zeros(N, heads, T, dim, dtype=self._kv_dtype())
        _, mask = self._pad(ids, T)
        for s in range(0, N, _LLM_BATCH):
            inp, m = self._pad(ids[s : s + _LLM_BATCH], T)
            inp, m = inp.to(model.device), m.to(model.device)
            pos = (m.cumsum(-1) - 1).clamp(min=0)
            with _autocast_off(model.device):
                out = model.model(input_ids=inp, attention_mask=m, position_ids=pos, use_cache=True)
            last = out.past_key_values.layers[-1]
            keep = m[:, None, :, None].to(last.keys.dtype)
            keys[s : s + len(inp)] = (last.keys * keep).to(keys.dtype).cpu()
            values[s : s + len(inp)] = (last.values * keep).to(keys.dtype).cpu()
        dev = self.device
        return PrefixCache(
            keys.to(dev), values.to(dev), mask.to(dev), mask.sum(-1).to(dev), tuple(texts)
        )

    # -- the LLM's last layer over the class tokens ------------------------------------

    def llm_outputs(self, cache: PrefixCache, rows: Tensor, *, normed: bool = True) -> Tensor:
        """The copied last layer over the K class tokens of ``rows``, each attending to its
        cached prefix, at positions len .. len+K-1: [n, K, H] (after the copied final norm
        unless ``normed`` is False)."""
        from transformers import DynamicCache
        from transformers.masking_utils import create_causal_mask

        K = self.config.n_tokens
        rows = rows.to(cache.keys.device)
        n = rows.numel()
        x = self.class_token.unsqueeze(0).expand(n, -1, -1)  # [n, K, H]
        pos = cache.lengths[rows, None] + torch.arange(K, device=x.device)  # [n, K]
        cos, sin = self.llm.model.model.rotary_emb(x, pos)
        kv = DynamicCache()
        # the prefix (stored at the LLM's precision), then the K tokens
        kv.update(cache.keys[rows].to(x.dtype), cache.values[rows].to(x.dtype), 0)
        mask2d = torch.cat([cache.mask[rows], cache.mask.new_ones(n, K)], dim=1)
        mask = create_causal_mask(
            config=self.decoder.self_attn.config,
            inputs_embeds=x,
            attention_mask=mask2d,
            past_key_values=kv,
            position_ids=pos,
        )
        h = self.decoder(
            x,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=kv,
            position_embeddings=(cos, sin),
        )
        h = h[0] if isinstance(h, tuple) else h
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
        depth, n_ctx = self.config.prompt_depth, self.n_ctx
        prompts = torch.einsum("nkh,dwh->dnkw", llm, self.text_proj) + self.text_bias[:, None]
        dev = self.device
        rows = torch.arange(ids.shape[0], device=dev)[:, None]
        cols = cols.to(dev)

        def hook(i):
            def replace(module, args, kwargs):
                x = args[0]
                x = x if self._text_bf else x.transpose(0, 1)
                x = x.clone()
                x[:, 1 : 1 + n_ctx] = self.text_ctx[i].to(x.dtype)
                x[rows, cols] = prompts[i].to(x.dtype)
                x = x if self._text_bf else x.transpose(0, 1)
                return (x, *args[1:]), kwargs

            return replace

        handles = [
            self._text_blocks[i].register_forward_pre_hook(hook(i), with_kwargs=True)
            for i in range(depth)
        ]
        try:
            feats = self.backbone.text_forward(ids.to(dev))
        finally:
            for h in handles:
                h.remove()
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
        from torch.nn.utils import parametrize

        cfg = self.config
        handles, lora_on = [], []
        try:
            if cfg.lora_rank:
                for j, i in enumerate(range(cfg.lora_start, cfg.lora_end)):
                    attn = self._vision_blocks[i].attn
                    parametrize.register_parametrization(
                        attn, "in_proj_weight", self.lora[j], unsafe=True
                    )
                    lora_on.append(attn)
            if cfg.visual_prompt_depth:
                vp, n = self.visual_prompts, cfg.n_visual_ctx

                def append(module, args):
                    x = args[0]  # [B, 1 + HW, Wv] before the pre-norm
                    extra = vp[0].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                    return (torch.cat([x, extra], dim=1), *args[1:])

                handles.append(self.backbone.vision_pre_norm.register_forward_pre_hook(append))

                def replace(i):
                    def hook(module, args, kwargs):
                        x = args[0]
                        if self._vision_bf:
                            new = vp[i].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                            x = torch.cat([x[:, :-n], new], dim=1)
                        else:
                            new = vp[i].to(x.dtype).unsqueeze(1).expand(-1, x.shape[1], -1)
                            x = torch.cat([x[:-n], new], dim=0)
                        return (x, *args[1:]), kwargs

                    return hook

                for i in range(1, cfg.visual_prompt_depth):
                    block = self._vision_blocks[i]
                    handles.append(block.register_forward_pre_hook(replace(i), with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()
            for attn in lora_on:
                parametrize.remove_parametrizations(
                    attn, "in_proj_weight", leave_parametrized=False
                )

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
    options={
        "llm": "causal LM (hub id or folder; --llm): Llama-2-7b-chat in the paper",
        "llm_dtype": "auto, float32, float16 or bfloat16",
        "n_tokens": "K learned class tokens (16)",
        "prompt_depth": "CLIP text layers given LLM prompts (9)",
        "ctx_init": "layer-0 text context phrase",
        "visual_prompt_depth": "vision layers with visual prompts (6; 0: none)",
        "n_visual_ctx": "visual prompt tokens per layer (4)",
        "lora_rank": "vision LoRA rank (8; 0: none)",
        "lora_alpha": "vision LoRA alpha (16)",
        "lora_start": "first vision layer with LoRA (6)",
        "lora_end": "vision layer after the last with LoRA (12)",
        "lora_lr": "LoRA learning rate (2e-5)",
        "text_l1_weight": "L1 to frozen CLIP text features (25)",
        "image_l1_weight": "L1 to frozen CLIP image features (10)",
        "kl_weight": "KL to frozen CLIP logits (1.0; base-to-novel 2.5)",
        "learn_logit_scale": "learn the temperature (clamped to [0, ln 100])",
        "request": "the chat request, with {} for the class",
        "answer_start": "the answer's start, with {} for the class",
        "system_prompt": "system message ('' for none)",
        "self_describe": "prompt 0 ends with the LLM's own one-sentence description",
        "self_description_tokens": "at most this many tokens per self-description",
    },
)
