"""CLAMP's options (each with its source in the official code) and training defaults.

The method itself is :mod:`awt_engine.methods.clamp`, which re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass

from awt_engine.methods.base import option
from awt_engine.methods.train_config import TrainConfig

# CLAMP's --wrap-caption-long-list ends "... has the following visual attributes
# ASSISTANT: 1."; our captions are whole sentences ("a photo of a dog. It barks."), so the
# caption takes the place of its "A photo of a {}." and "It" that of its second "A {}".
DEFAULT_WRAPPER = "USER: {} It has the following visual attributes ASSISTANT: 1."
CLAMP_WRAPPER = "USER: A photo of a {}.A {} has the following visual attributes ASSISTANT: 1."


@dataclass(frozen=True)
class CLAMPConfig:
    # clamp.json hf_model_name
    llm: str = option(
        "lmsys/vicuna-13b-v1.5", "causal LM: hub id or local folder (CLAMP: lmsys/vicuna-13b-v1.5)"
    )
    # the checkpoint's dtype on a GPU, float32 on CPU (models/llm.py)
    llm_dtype: str = option("auto", "auto, float32, float16 or bfloat16")
    # clamp.json num_prompt_tokens
    n_prompt_tokens: int = option(
        24, "read-only prompt tokens appended to the caption (CLAMP: 24)", bounds=(1, 512)
    )
    # hf_model.py LoraConfig
    lora_r: int = option(16, "LoRA rank", bounds=(1, 1024))
    # hf_model.py LoraConfig
    lora_alpha: float = option(16.0, "LoRA alpha")
    # hf_model.py: 0.1. Drawn from the step's generator (torch.random.fork_rng), never
    # from the global RNG, so a run is reproduced by its seed.
    lora_dropout: float = option(0.1, "LoRA dropout (drawn from the step's seed)")
    # hf_model.py: q, k, v, o
    lora_targets: str = option(
        "q_proj,k_proj,v_proj,o_proj", "comma-separated LM modules that get LoRA"
    )
    # hf_model.py EosAttentionPooler: 8-head MHA over the LM width
    pool_heads: int = option(
        8, "attention-pooler heads (must divide the LM width)", bounds=(1, 256)
    )
    # see above; CLAMP_WRAPPER is the paper's own
    wrapper: str = option(
        DEFAULT_WRAPPER, "how a caption is put to the LM; every {} is the caption"
    )
    # CLAMP's HF tokenizer: max_length 77, right truncation
    context_length: int = option(77, "LM tokens kept per caption", bounds=(1, 4096))
    # DistillClipLoss: the two terms summed
    distill_weight: float = option(
        1.0, "weight of the distillation from CLIP's text tower (0: off)"
    )
    # DistillClipLoss: 100 cos for teacher and student
    distill_scale: float = option(100.0, "teacher and student temperature of the distillation")
    # train.py clamps logit_scale to ln(100) after a step
    max_logit_scale: float = option(100.0, "cap of the learned logit scale")
    # src/training/zero_shot.py:32 `logits = 100. * image_features @ classifier`
    score_scale: float | None = option(
        100.0,
        "scale the scorers multiply cosines by (CLAMP's zero-shot code: a fixed 100; "
        "none: the learned, capped scale)",
    )
    # None: the backbone's (CLIP's image tower is its)
    init_logit_scale: float | None = option(None, "initial logit scale (none: the backbone's)")
    # a JSONL of {"image", "caption"}: train on those pairs
    captions: str | None = option(
        None, 'JSONL of {"image": path, "caption": text}: train on these pairs'
    )
    # LM sequences per forward pass in class_embeddings
    text_batch_size: int = option(64, "LM sequences per forward pass", bounds=(1, 4096))

    def __post_init__(self) -> None:
        for name in ("n_prompt_tokens", "lora_r", "pool_heads", "context_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
        if isinstance(self.text_batch_size, bool) or self.text_batch_size < 1:
            raise ValueError(f"text_batch_size must be >= 1, got {self.text_batch_size!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.score_scale is not None and not 0 < self.score_scale:
            raise ValueError(f"score_scale must be > 0 or none, got {self.score_scale}")
        if self.init_logit_scale is not None and not 0 < self.init_logit_scale:
            raise ValueError(f"init_logit_scale must be > 0, got {self.init_logit_scale}")
        for name in ("lora_alpha", "distill_scale", "max_logit_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.distill_weight >= 0:
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}")
        if "{}" not in self.wrapper:
            raise ValueError(
                f"wrapper must contain {{}} where the caption goes, got {self.wrapper!r}"
            )
        if not self.targets:
            raise ValueError(f"lora_targets names no module, got {self.lora_targets!r}")

    @property
    def targets(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]


def clamp_train_defaults(shots: int, dataset: str | None) -> TrainConfig:
    """CLAMP's optimiser (launch_scripts/rebuttal.sh, open_clip's non-ViT defaults for
    betas and eps). CLAMP trains 6 epochs of 10M pairs with 1220 warm-up steps (~8%);
    labelled few-shot data has no paper setting: 20 epochs, the first 2 a linear warm-up
    (the schedule is per epoch here), batch 64 (CLAMP's per-GPU batch)."""
    return TrainConfig(
        epochs=20,
        lr=5e-4,
        batch_size=64,
        optimizer="adamw",
        betas=(0.9, 0.999),
        weight_decay=0.5,
        warmup_epochs=2,
        warmup="linear",
        grad_clip=1.0,
    )


# MethodSpec.presets (see clamp.py's table): the released code's zero-shot scale, and a
# recipe for a small LM on a CPU or small GPU (Qwen2.5-0.5B-Instruct: width 896, which the
# 8 pooler heads divide; smaller batches and LM calls)
PRESETS = {
    "released": {"score_scale": 100.0},  # src/training/zero_shot.py:32
    "small": {
        "llm": "Qwen/Qwen2.5-0.5B-Instruct",
        "pool_heads": 8,
        "text_batch_size": 16,
        "batch_size": 16,
    },
}
