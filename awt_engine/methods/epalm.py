"""eP-ALM: a frozen causal LM that reads CLIP's [CLS] tokens (Shukor et al., ICCV 2023).

What learns: one linear connector per injected vision level (CLIP width -> LM hidden,
with bias) and a soft prompt of ``prompt_len`` token rows reparameterised by an MLP
(Embedding -> Linear -> Tanh -> Linear, at the LM's embedding width). The LM and CLIP's
vision tower stay frozen; neither is a submodule, so neither is saved or trained.

**Injection.** The [CLS] tokens of the last ``n_levels`` vision blocks (after the tower's
final LayerNorm, as eP-ALM's timm ViT gives them) go each through its own connector. The
LM's decoder layers from ``start_layer`` on carry forward pre-hooks: at ``start_layer``
the mapped [CLS] of the shallowest level is prepended (the sequence grows by one slot);
at every later layer in ``[start_layer, end_layer)`` that slot is overwritten with level
``(layer - start_layer) // step`` (``step = (end - start) // n_levels``, the last level
kept once they run out, as eP-ALM's OPT does). Every hooked layer gets the attention mask
(and, for rotary LMs, the position embeddings) extended by the slot. Deviation from the
original code, forced by the KV cache: eP-ALM pads the mask with zeros, so its visual
slot also attends to every text token (the future); here the slot's row is causal and
sees only itself, so a prefix's cached keys do not depend on what follows it (the row
matters only to the layers above ``end_layer``, which read the slot's last output).
Every token sees the slot.

**Sequence.** ``[soft prompt] question text <eos>`` (the question tokenised with the
tokenizer's own specials, OPT's BOS; the class text after a space; ``question=""``
gives eP-ALM's captioning layout, ``[prompt] <bos> caption <eos>``). The
text of (class c, prompt p) is the label set's prompt p of c (prompt 0 the bare
template: "a photo of a cat."). OPT's learned positions: the prompt rows get none (as in
eP-ALM) and the text counts from 0; a rotary LM (Llama, Qwen, Mistral): the visual slot
takes position 0 and the prompt rows and tokens positions 1, 2, ... like any token.

**Loss.** Causal-LM cross-entropy over the text and its EOS (the question is context),
summed per sample, averaged over the batch, times ``lm_loss_weight`` (0.1). A class with
several prompts (descriptions) trains on one drawn per sample from the step's generator.

**Scores (a LogitModel).** Entry (b, v, c, p) of :meth:`EPALM.logits` is ``logit_scale *
exp(mean token log-probability of text(c, p) and its EOS given view v)``: the per-token
geometric-mean probability, in (0, 1], so the AWT transport cost ``1 - sim`` lies in
[0, 1) like a cosine's; the scale (100, CLIP's) gives logits of CLIP's size for AWT's
temperatures. The shared prefix (visual slot, soft prompt, question, plus the tokens every
text begins with, e.g. "a photo of a") is run once per view; its KV cache is gathered per
(view, text) row (an index gather: the same as ``batch_repeat_interleave`` over the
texts, and it also serves a shortlist) and the texts' remaining tokens continue from it,
right-padded, ``score_batch`` rows per call, ``prefill_batch`` views' caches held at
once. ``use_prefix_cache=False`` runs every (view, text)
sequence whole instead (same numbers up to rounding; the benchmark's other arm).
``shortlist_k`` (as eP-ALM's ``rank_answer`` with ``k_test``, over classes rather than
answers): per view only the k classes with the likeliest first distinguishing token
(the first token after the prefix every text shares: for most label sets the name's
first token, so classes sharing it tie) are scored in full, all their prompts; the
others get similarity 0, the lowest possible. Off by default; ``shortlist_k`` is in the
config (it changes scores), and Python callers can also set the model's attribute or
pass it to :meth:`EPALM.logits`.

The hooks hold mode state on the model (``_InjectionState``): one forward at a time per
model, not thread-safe, and not compatible with gradient checkpointing (not used).

Official (mshukor/eP-ALM @ 9ecfeb9acf: ``configs/image/ePALM_caption.yaml``,
``float32/caption.py``, ``optim/optim_factory.py``, ``scheduler/cosine_lr.py``,
``dataset/caption.py``) vs here (:mod:`awt_engine.methods._epalm_config`):

| setting | eP-ALM's code | here |
|---|---|---|
| LM, layers, levels, prompt | OPT-2.7B, [19, 31), 6, 10 | same; ``--preset small``: OPT-125m, [6, 12), 6 |
| vision tower | timm ViT-B/16 (ImageNet-21k) | the backbone's CLIP ViT |
| AdamW groups | ``add_weight_decay``: biases wd 0, matrices wd 0.02, both lr 2e-5; ``prompt_lr`` read where the config has none, so unused | same (``optimizer_groups=released``); ``--preset config``: connectors at lr, prompt at 1e-5 |
| scheduled groups | timm ``scheduler_groups: 0``: the biases; the matrices stay at 2e-5 | same (``"scheduled": False``) |
| schedule | cosine over 8 epochs to 1e-6 (lr_min annealed); 4 warm-up stairs of 100 iterations in epoch 0 from 1e-5, stepped per epoch after | same (``warmup_iters=400``, ``min_lr_mode=anneal``) |
| augmentation | RandomResizedCrop(0.5, 1) bicubic, flip, RandAugment(2, 7) | same, torchvision's pixel ops, seeded draws |
| precision, batch | float32, 16 | fp32, 16 |
| visual slot's own mask row | zeros: it sees every token | causal (the KV cache; see above) |
| task, loss | captioning / VQA, generative | class texts' likelihoods as logits; the same LM loss |
| test-time | Resize 224 bicubic | the engine's views |
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from awt_engine.backbone.devices import seeded_rng
from awt_engine.inputs.views import ViewConfig
from awt_engine.labels import LabelSet
from awt_engine.methods._epalm_config import PRESETS, EPALMConfig, epalm_train_defaults
from awt_engine.methods._epalm_scoring import GenerativeScoring, scoring_cost
from awt_engine.methods.base import (
    LossOutput,
    MethodSpec,
    TrainableBase,
    TrainBatch,
)

_ATTENTION = ("sdpa", "eager")  # mask formats the hooks extend (bool or additive 4-D)


class _InjectionState:
    """What the decoder-layer hooks do on the current forward pass.

    ``phase``: "off" (the plain LM), "full" (sequences from their start: the slot is
    prepended at the first injection layer) or "continue" (a continuation of a cached
    prefix: the slot lives in the cache, only the mask grows). Set only by
    :meth:`EPALM._injecting`; one forward at a time.
    """

    def __init__(self) -> None:
        self.phase = "off"
        self.levels: Tensor | None = None  # [n, n_levels, hidden] mapped [CLS] per row
        self.slot_pe: tuple[Tensor, Tensor] | None = None  # rotary cos/sin at position 0


class EPALM(GenerativeScoring, TrainableBase):
    method = "epalm"
    int8_refusal = (
        "it reads the image tower's intermediate [CLS] tokens, which the int8 graph does not give"
    )
    score_batch: int = 64  # (view, text) rows per LM call when scoring: bounds memory
    prefill_batch: int = 64  # views whose shared prefix (and its cache) is held at once
    use_prefix_cache: bool = True  # False: every (view, text) sequence run whole

    def __init__(self, backbone, config: EPALMConfig):
        super().__init__(backbone, config)
        from awt_engine.models.llm import load_causal_lm

        self.logit_scale = float(config.logit_scale)
        self.dim = None  # no joint embedding space
        self.shortlist_k = config.shortlist_k
        self.llm = load_causal_lm(config.llm, device=str(self.device))  # not a submodule
        lm = self.llm.model
        impl = getattr(lm.config, "_attn_implementation", None)
        if impl not in _ATTENTION:
            raise ValueError(
                f"eP-ALM extends the LM's attention masks for {', '.join(_ATTENTION)} "
                f"attention; {config.llm} uses {impl!r}"
            )
        types = set(getattr(lm.config, "layer_types", None) or ["full_attention"])
        if types != {"full_attention"} or getattr(lm.config, "use_sliding_window", False):
            raise ValueError(f"{config.llm}: sliding-window attention layers are not supported")
        decoder = lm.get_decoder()
        layers = getattr(decoder, "layers", None)
        # the LM's modules are held, never registered (not saved, not trained, no .train())
        object.__setattr__(self, "_rotary", getattr(decoder, "rotary_emb", None))
        embed_positions = getattr(decoder, "embed_positions", None)
        if layers is None or (self._rotary is None and embed_positions is None):
            raise ValueError(
                f"{config.llm} ({type(lm).__name__}) is not a decoder eP-ALM can hook: it "
                "needs decoder layers and rotary (Llama, Qwen, Mistral) or learned (OPT) "
                "positions"
            )
        n_layers = len(layers)
        if config.end_layer > n_layers:
            raise ValueError(
                f"injection layers [{config.start_layer}, {config.end_layer}) do not fit "
                f"{config.llm}'s {n_layers} layers (set start_layer / end_layer)"
            )
        try:
            blocks = backbone.vision_blocks
        except ValueError as e:
            raise ValueError("eP-ALM needs a CLIP whose vision tower is a ViT (open_clip)") from e
        if config.n_levels > len(blocks.blocks):
            raise ValueError(
                f"n_levels {config.n_levels} > the vision tower's {len(blocks.blocks)} blocks"
            )
        self.vision_width = blocks.width
        self.hidden = int(lm.config.hidden_size)
        self.embed_width = int(lm.get_input_embeddings().embedding_dim)
        self.step = max(1, (config.end_layer - config.start_layer) // config.n_levels)
        tok = self.llm.tokenizer
        self.eos_id = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        self.pad_id = int(pad) if pad is not None else 0
        # the tokenizer's own specials even for "" (OPT: its BOS; Qwen: none)
        self.question_ids = list(tok(config.question).input_ids)
        self._state = _InjectionState()
        self._hooks = [
            layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True)
            for i, layer in enumerate(layers)
            if i >= config.start_layer
        ]
        if self._rotary is None:
            self._hooks.append(embed_positions.register_forward_hook(self._positions_hook))
        self._text_ids: dict[str, list[list[int]]] = {}

    def frozen_parts(self) -> dict[str, str]:
        return {"llm": self.llm.fingerprint}

    # -- learned modules ------------------------------------------------------------------

    def prepare(self, labels: LabelSet, seed: int = 0) -> None:
        super().prepare(labels, seed)
        E, H, W = self.embed_width, self.hidden, self.vision_width
        # PyTorch's default inits, drawn from seed on the CPU (the caller's RNGs untouched:
        # torch.manual_seed would also reseed every CUDA device)
        with seeded_rng(seed):
            self.connectors = nn.ModuleList(nn.Linear(W, H) for _ in range(self.config.n_levels))
            # eP-ALM's InputPrompts: mid width = prompt width
            self.prompt = nn.Sequential(
                nn.Embedding(self.config.prompt_len, E),
                nn.Linear(E, E),
                nn.Tanh(),
                nn.Linear(E, E),
            )
        self.connectors.to(self.device)
        self.prompt.to(self.device)

    def param_groups(self, lr: float) -> list[dict]:
        """eP-ALM's optimizer groups (``optimizer_groups``). released: what
        ``optim_factory.add_weight_decay`` builds, with timm's ``scheduler_groups: 0``:
        biases (1-D) without weight decay, scheduled; weight matrices (connectors, prompt
        table and MLP) with weight decay at the constant ``lr``. config: the connectors
        scheduled at ``lr``, the soft prompt at the constant ``prompt_lr``."""
        if self.config.optimizer_groups == "config":
            return [
                {"params": list(self.connectors.parameters()), "lr": lr},
                {"params": list(self.prompt.parameters()), "lr": self.config.prompt_lr,
                 "scheduled": False},
            ]  # fmt: skip
        named = [*self.connectors.named_parameters(), *self.prompt.named_parameters()]
        flat = [p for n, p in named if p.ndim == 1 or n.endswith(".bias")]
        ids = {id(p) for p in flat}
        return [
            {"params": flat, "lr": lr, "weight_decay": 0.0},
            {"params": [p for _, p in named if id(p) not in ids], "lr": lr, "scheduled": False},
        ]

    def training_view_config(self, base: ViewConfig) -> ViewConfig:
        """eP-ALM's training transform (``dataset/caption.py:54-60``): one bicubic random
        resized crop of scale (0.5, 1), flipped with p 0.5, then RandAugment(2, 7)."""
        return dataclasses.replace(
            base, n_views=1, raw_view=False, crop_interpolation="bicubic", scale=(0.5, 1.0),
            randaugment=(2, 7) if self.config.randaugment else (0, 0),
        )  # fmt: skip

    def prompt_rows(self) -> Tensor:
        """The soft prompt, [prompt_len, E] (reparameterised through its MLP)."""
        return self.prompt(torch.arange(self.config.prompt_len, device=self.device))

    def visual_levels(self, pixels: Tensor) -> Tensor:
        """[N, 3, R, R] -> the mapped [CLS] of the last ``n_levels`` blocks, shallowest
        first: [N, n_levels, hidden] (gradients to the connectors only)."""
        x = pixels.to(self.device, self.backbone.dtype)
        levels = self.backbone.vision_intermediates(x, self.config.n_levels)
        cls = [t.float() for t in levels]  # [N, W] each
        return torch.stack([c(t) for c, t in zip(self.connectors, cls, strict=True)], dim=1)

    # -- the hooks ------------------------------------------------------------------------

    @contextmanager
    def _injecting(self, phase: str, levels: Tensor):
        st = self._state
        if st.phase != "off":
            raise RuntimeError("eP-ALM's LM is already running a pass (one at a time)")
        lm_dtype = self.llm.model.get_input_embeddings().weight.dtype
        st.phase, st.levels = phase, levels.to(lm_dtype)
        if self._rotary is not None:
            zero = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            st.slot_pe = self._rotary(st.levels, zero)  # [1, 1, d] each
        try:
            yield
        finally:
            st.phase, st.levels, st.slot_pe = "off", None, None

    def _layer_hook(self, index: int):
        cfg = self.config

        def hook(module, args, kwargs):
            st = self._state
            if st.phase == "off":
                return None
            if args:
                hidden, rest = args[0], args[1:]
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            full = st.phase == "full"
            if full and index < cfg.end_layer:
                level = min((index - cfg.start_layer) // self.step, cfg.n_levels - 1)
                slot = st.levels[:, level].unsqueeze(1)  # [n, 1, hidden]
                if slot.shape[0] != hidden.shape[0]:
                    raise RuntimeError(f"{slot.shape[0]} visual rows for {hidden.shape[0]}")
                body = hidden if index == cfg.start_layer else hidden[:, 1:]
                hidden = torch.cat([slot.to(hidden.dtype), body], dim=1)
            kwargs = self._grow(kwargs, full, index, hidden.shape[1])
            return (hidden, *rest), kwargs

        return hook

    def _grow(self, kwargs: dict, full: bool, index: int, q: int) -> dict:
        """The layer's mask (and in a full pass its positions) with the visual slot in
        front: every token sees the slot; the slot's own row sees only itself."""
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dim() != 4:
                raise RuntimeError(f"unexpected attention mask {type(mask).__name__}")
            kv = q  # a full pass starts from an empty cache
            if not full:
                kv = kwargs["past_key_values"].layers[index].get_seq_length() + q
            # a continuation's mask is sized by layer 0's cache, which holds the slot too
            # when layer 0 is an injection layer: then it fits already
            if mask.shape[-1] == kv - 1:
                kwargs["attention_mask"] = _with_slot(mask, full)
            elif mask.shape[-1] != kv:
                raise RuntimeError(f"attention mask of {mask.shape[-1]} keys for {kv}")
        if full:
            st = self._state
            pe = kwargs.get("position_embeddings")
            if pe is not None and st.slot_pe is not None:
                kwargs["position_embeddings"] = tuple(
                    torch.cat([s.to(t.dtype).expand(t.shape[0], 1, -1), t], dim=1)
                    for s, t in zip(st.slot_pe, pe, strict=True)
                )
            pos = kwargs.get("position_ids")
            if isinstance(pos, Tensor):
                kwargs["position_ids"] = torch.cat([pos[:, :1] * 0, pos], dim=1)
        return kwargs

    def _positions_hook(self, module, args, output):
        """OPT: the soft prompt rows get no positional embedding (eP-ALM)."""
        st = self._state
        if st.phase != "full":
            return None
        n = self.config.prompt_len
        return torch.cat([torch.zeros_like(output[:, :n]), output[:, n:]], dim=1)

    def _positions(self, start: int, length: int, full: bool) -> Tensor:
        """Position ids [1, length] of input rows ``start..`` (prompt rows included)."""
        if self._rotary is not None:  # slot 0, then every row
            return torch.arange(1 + start, 1 + start + length, device=self.device)[None]
        n = self.config.prompt_len  # OPT: prompt rows have none, the text counts from 0
        ids = torch.arange(start, start + length, device=self.device) - n
        return ids.clamp(min=0)[None]

    # -- sequences ------------------------------------------------------------------------

    def _embed(self, ids: Tensor, prompt: bool) -> Tensor:
        emb = self.llm.model.get_input_embeddings()(ids)  # [n, L, E]
        if not prompt:
            return emb
        rows = self.prompt_rows().to(emb.dtype)
        return torch.cat([rows.unsqueeze(0).expand(ids.shape[0], -1, -1), emb], dim=1)

    def _pad(self, seqs: list[list[int]], length: int | None = None) -> Tensor:
        L = max(length or 0, max((len(s) for s in seqs), default=0))
        out = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return out.to(self.device)

    def text_ids(self, labels: LabelSet) -> list[list[int]]:
        """Token ids of every (class, prompt) text plus EOS, class-major: C*P lists."""
        key = labels.key()
        if key not in self._text_ids:
            sep = " " if self.config.question else ""
            tok = self.llm.tokenizer
            eos = [self.eos_id] if self.eos_id is not None else []
            texts = [sep + t for row in labels.prompt_texts() for t in row]
            self._text_ids[key] = [
                list(tok(t, add_special_tokens=False).input_ids) + eos for t in texts
            ]
        return self._text_ids[key]

    def text_logprobs(self, levels: Tensor, texts: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Whole sequences ``[prompt] question text``, row i conditioned on ``levels[i]``:
        (summed log-probability of each text's tokens [n], token counts [n])."""
        q = self.question_ids
        lengths = torch.tensor([len(t) for t in texts], device=self.device)
        L = int(lengths.max())
        ids = self._pad([q + t for t in texts], len(q) + L)
        emb = self._embed(ids, prompt=True)
        with self._injecting("full", levels):
            out = self.llm.model(
                inputs_embeds=emb,
                position_ids=self._positions(0, emb.shape[1], True),
                use_cache=False,
                logits_to_keep=L + 1,
            )
        logp = out.logits[:, :-1].float().log_softmax(-1)  # [n, L, vocab]: text tokens 0..L-1
        target = ids[:, len(q) :]
        tok = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        keep = torch.arange(L, device=self.device)[None] < lengths[:, None]
        return (tok * keep).sum(-1), lengths

    # -- training -------------------------------------------------------------------------

    def training_loss(self, batch: TrainBatch) -> LossOutput:
        labels = self.train_labels
        V = batch.views.shape[1]
        y = batch.labels.repeat_interleave(V).tolist()  # every view is a sample
        P = labels.n_prompts
        pick = torch.randint(P, (len(y),), generator=batch.generator).tolist() if P > 1 else None
        ids = self.text_ids(labels)
        texts = [ids[c * P + (pick[i] if pick else 0)] for i, c in enumerate(y)]
        levels = self.visual_levels(batch.views.flatten(0, 1))
        logp, _ = self.text_logprobs(levels, texts)
        lm = self.config.lm_loss_weight * (-logp).mean()  # summed per sample, batch mean
        return LossOutput(lm, {"lm": lm})

    # -- scoring --------------------------------------------------------------------------

    def logits(
        self,
        views: Tensor,
        labels: LabelSet,
        *,
        use_prefix_cache: bool | None = None,
        shortlist_k: int | None = None,
    ) -> Tensor:
        """[B, V, 3, R, R] -> [B, V, C, P] = logit_scale * exp(mean token log-prob)."""
        if views.dim() != 5:
            raise ValueError(f"views must be [B, V, 3, R, R], got {tuple(views.shape)}")
        B, V = views.shape[:2]
        cache = self.use_prefix_cache if use_prefix_cache is None else use_prefix_cache
        k = self.shortlist_k if shortlist_k is None else shortlist_k
        levels = self.visual_levels(views.flatten(0, 1))  # [N, n_levels, H]
        P = labels.n_prompts
        total, count = self.score_texts(levels, self.text_ids(labels), P, cache, k)
        sim = (total / count).exp()  # (0, 1]; -inf (unscored) -> 0
        return (self.logit_scale * sim).view(B, V, labels.n_classes, labels.n_prompts)


def _with_slot(mask: Tensor, full: bool) -> Tensor:
    """A 4-D mask (bool: True attends; or additive) with a key column for the visual
    slot in front that every query sees, and in a full pass the slot's own query row in
    front that sees only the slot (causal)."""
    boolean = mask.dtype == torch.bool
    see = True if boolean else 0.0
    hide = False if boolean else torch.finfo(mask.dtype).min
    mask = torch.cat([mask.new_full((*mask.shape[:-1], 1), see), mask], dim=-1)
    if full:
        row = mask.new_full((*mask.shape[:-2], 1, mask.shape[-1]), hide)
        row[..., 0] = see
        mask = torch.cat([row, mask], dim=-2)
    return mask


METHOD = MethodSpec(
    name="epalm",
    summary="eP-ALM: a frozen causal LM reading CLIP's [CLS] tokens; generative scores",
    config=EPALMConfig,
    model=EPALM,
    train_defaults=epalm_train_defaults,
    paper="Shukor et al., eP-ALM: Efficient Perceptual Augmentation of Language Models, ICCV 2023",
    needs=("llm",),
    presets=PRESETS,
    default_preset="released",
)


__all__ = ["EPALM", "METHOD", "EPALMConfig", "epalm_train_defaults", "scoring_cost"]
