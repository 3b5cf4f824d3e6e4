"""LLaMP's options (:class:`LLaMPConfig`, each with its source and help) and the paper's
training defaults; the model is :mod:`awt_engine.methods.llamp`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from awt_engine.methods.base import option
from awt_engine.methods.train_config import TrainConfig

LN_100 = math.log(100.0)  # the code's clamp of the learned logit scale


@dataclass(frozen=True)
class LLaMPConfig:
    # the paper's LLM
    llm: str = option(
        "meta-llama/Llama-2-7b-chat-hf",
        "causal LM (hub id or folder; --llm): Llama-2-7b-chat in the paper",
    )
    # checkpoint dtype on a GPU, float32 on CPU (models/llm.py)
    llm_dtype: str = option("auto", "auto, float32, float16 or bfloat16")
    # K, --num_llm_prompts
    n_tokens: int = option(16, "K learned class tokens (16)", bounds=(1, 512))
    # CLIP text layers fed LLM prompts, --llm_prompt_depth
    prompt_depth: int = option(9, "CLIP text layers given LLM prompts (9)", bounds=(1, 256))
    # layer-0 context (the code: 4 tokens, this phrase)
    ctx_init: str = option("a photo of a", "layer-0 text context phrase")
    # flags.py --visual_prompt_depth (vision layers 0..5)
    visual_prompt_depth: int = option(
        6, "vision layers with visual prompts (6; 0: none)", bounds=(0, 256)
    )
    # flags.py --num_vis_ctx
    n_visual_ctx: int = option(4, "visual prompt tokens per layer (4)", bounds=(0, 512))
    # launch scripts --lora_rank
    lora_rank: int = option(8, "vision LoRA rank (8; 0: none)", bounds=(0, 1024))
    # --lora_alpha
    lora_alpha: float = option(16.0, "vision LoRA alpha (16)")
    # --v_lora_start
    lora_start: int = option(6, "first vision layer with LoRA (6)", bounds=(0, 1024))
    # --v_lora_end (exclusive)
    lora_end: int = option(12, "vision layer after the last with LoRA (12)", bounds=(0, 1024))
    # --lora_lr: LoRA's own parameter group
    lora_lr: float = option(2e-5, "LoRA learning rate (2e-5)")
    # models/llamp.py
    text_l1_weight: float = option(25.0, "L1 to frozen CLIP text features (25)")
    # models/llamp.py
    image_l1_weight: float = option(10.0, "L1 to frozen CLIP image features (10)")
    # --lambda_dist: 1.0 few-shot, 2.5 base-to-novel
    kl_weight: float = option(1.0, "KL to frozen CLIP logits (1.0; base-to-novel 2.5)")
    # the code learns it (clamped to [0, ln 100])
    learn_logit_scale: bool = option(True, "learn the temperature (clamped to [0, ln 100])")
    request: str = option(
        "In one sentence, describe the distinctive appearance of a {}.",
        "the chat request, with {} for the class",
    )
    # tools/run_inference_chat.py
    answer_start: str = option("The {} appears as", "the answer's start, with {} for the class")
    # tools/run_inference_chat.py
    system_prompt: str = option("You are a helpful assistant.", "system message ('' for none)")
    # prompt 0 continues answer_start with the LLM's own sentence
    self_describe: bool = option(True, "prompt 0 ends with the LLM's own one-sentence description")
    # the code's max_new_tokens (greedy)
    self_description_tokens: int = option(
        64, "at most this many tokens per self-description", bounds=(1, 4096)
    )

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
    with a floor of 1e-5, bf16 on a GPU, gradients clipped at norm 1 (its DeepSpeed config)."""
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
        grad_clip=1.0,  # deepspeed_config/zero2_a100_40g.json:22 "gradient_clipping": 1.0
    )


# MethodSpec.presets (see llamp.py's table): the released code's settings, and a recipe
# for a small chat LM (Qwen2.5-0.5B-Instruct: 24 layers, width 896; LLaMP runs only a
# copy of its last layer, so no layer setting depends on the LLM's depth)
PRESETS = {
    "released": {"grad_clip": 1.0},  # deepspeed_config/zero2_a100_40g.json:22
    "small": {"llm": "Qwen/Qwen2.5-0.5B-Instruct"},
}
