"""eP-ALM's options (:class:`EPALMConfig`, each with its source and help) and its training
defaults (:func:`epalm_train_defaults`); the model is :mod:`awt_engine.methods.epalm`.
Sources: mshukor/eP-ALM @ 9ecfeb9acf."""

from __future__ import annotations

from dataclasses import dataclass

from awt_engine.methods.base import option
from awt_engine.methods.train_config import TrainConfig


@dataclass(frozen=True)
class EPALMConfig:
    # eP-ALM's main LM (text_model in its scripts)
    llm: str = option(
        "facebook/opt-2.7b",
        "the frozen causal LM: a hub id or a local folder (eP-ALM: facebook/opt-2.7b)",
    )
    # start_layer_idx (ePALM_caption.yaml, OPT-2.7B's 32 layers)
    start_layer: int = option(
        19, "first LM layer that gets the visual slot (eP-ALM: 19)", bounds=(0, 1024)
    )
    # end_layer_idx, exclusive
    end_layer: int = option(
        31, "LM layer after the last injection (exclusive; eP-ALM: 31)", bounds=(0, 1024)
    )
    # injected_hidden_states: [CLS] of the last 6 vision blocks
    n_levels: int = option(
        6, "vision blocks whose [CLS] is injected, one connector each (eP-ALM: 6)", bounds=(1, 256)
    )
    # prompt_len (prompt_tuning: True)
    prompt_len: int = option(10, "soft prompt tokens (eP-ALM: 10)", bounds=(1, 512))
    # the prefix before the class text ("": none)
    question: str = option(
        "What is in the image?",
        "the text before the class text ('' for eP-ALM's captioning layout)",
    )
    # lm_loss_weight
    lm_loss_weight: float = option(0.1, "weight of the causal-LM loss (eP-ALM: 0.1)")
    # optimizer.prompt_lr: read by the released code from the config's top level, where it
    # is not, so unused there; used here with optimizer_groups="config" only
    prompt_lr: float = option(
        1e-5, "soft prompt's learning rate with optimizer_groups=config (eP-ALM yaml: 1e-5)"
    )
    # what optim/optim_factory.py builds (see the module docstring's table)
    optimizer_groups: str = option(
        "released",
        "released: biases scheduled without weight decay, matrices at the constant lr "
        "(eP-ALM's code); config: connectors scheduled, prompt at a constant prompt_lr",
    )
    # dataset/caption.py:57: RandomAugment(2, 7) after the crop and flip
    randaugment: bool = option(True, "RandAugment(2, 7) on the training crops (eP-ALM: true)")
    # CLIP's: logits of the size AWT's temperatures expect
    logit_scale: float = option(100.0, "logits = scale * exp(mean token log-prob) (CLIP's 100)")
    # 0: score every class; k: rank_answer's first-token shortlist
    shortlist_k: int = option(
        0, "score only the k classes likeliest by first token (0: all)", bounds=(0, 1 << 20)
    )

    def __post_init__(self) -> None:
        for name in ("start_layer", "end_layer", "n_levels", "prompt_len", "shortlist_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {v!r}")
        if self.n_levels < 1 or self.prompt_len < 1:
            raise ValueError(
                f"n_levels and prompt_len must be >= 1, got {self.n_levels}, {self.prompt_len}"
            )
        if self.end_layer <= self.start_layer:
            raise ValueError(
                f"the injection layers [start_layer, end_layer) = [{self.start_layer}, "
                f"{self.end_layer}) are empty"
            )
        if not self.logit_scale > 0:
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale}")
        if self.optimizer_groups not in ("released", "config"):
            raise ValueError(
                f"optimizer_groups must be released or config, got {self.optimizer_groups!r}"
            )
        if self.lm_loss_weight < 0 or self.prompt_lr < 0:
            raise ValueError("lm_loss_weight and prompt_lr must be >= 0")


def epalm_train_defaults(shots: int, dataset: str | None) -> TrainConfig:
    """eP-ALM's captioning schedule (the same for every shot count): timm's cosine over 8
    epochs from 2e-5 to 1e-6, its 4 warm-up stairs of 100 iterations inside epoch 0 from
    1e-5, float32 (``float32/caption.py``, ``configs/image/ePALM_caption.yaml``)."""
    return TrainConfig(
        epochs=8,  # schedular.epochs
        lr=2e-5,  # optimizer.lr
        batch_size=16,  # batch_size_train
        optimizer="adamw",
        weight_decay=0.02,
        warmup_epochs=4,  # schedular.warmup_epochs: timm's warmup_t, 4 stairs ...
        warmup="linear",
        warmup_lr=1e-5,  # schedular.warmup_lr
        warmup_iters=400,  # ... of step_size = 100 iterations (caption.py's train())
        min_lr=1e-6,  # schedular.min_lr: timm's lr_min, annealed to
        min_lr_mode="anneal",
        precision="fp32",  # the float32/ scripts (no autocast)
    )


# MethodSpec.presets (see epalm.py's table). released: the optimizer groups the released
# code builds (the defaults); config: those its yaml intends (prompt_lr used); small:
# OPT-125m (eP-ALM's own LM family, 12 layers, width 768) with the visual levels in its
# last 6 layers, one each (eP-ALM: 6 levels over OPT-2.7B's layers [19, 31), 2 each)
PRESETS = {
    "released": {"optimizer_groups": "released"},
    "config": {"optimizer_groups": "config"},
    "small": {"llm": "facebook/opt-125m", "start_layer": 6, "end_layer": 12, "n_levels": 6},
}
