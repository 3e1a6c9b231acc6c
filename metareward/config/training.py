"""The settings of training: DPO on each iteration's pairs (``train``), and aligning a judge toward
human labels (``align``, and the EFT step before iteration 1 with ``judge_alignment.enabled``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from metareward.config.checks import Section, require, setting
from metareward.config.choices import ALIGN_OBJECTIVES, DPO_LOSS_TYPES, LAUNCHERS, ON_NO_PAIRS, PRECISIONS

# `accelerate launch` config files shipped with metareward (train.accelerate_config); not Hydra options.
ACCELERATE_CONFIGS = Path(__file__).parent.parent / "accelerate_configs"
DEFAULT_ACCELERATE_CONFIG = ACCELERATE_CONFIGS / "deepspeed_zero3.yaml"


@dataclass
class FineTuning(Section):
    """What DPO (``train.dpo``) and judge alignment (``align``) share: optimiser steps, batches,
    precision, LoRA. Each subclass gives its own learning rate and length."""

    learning_rate: float = setting(5e-7, "> 0")
    num_epochs: float = setting(1.0, "> 0")
    batch_size: int = setting(4, ">= 1")
    gradient_accumulation_steps: int = setting(1, ">= 1")
    max_length: int = setting(1024, ">= 16")
    # fp32 master weights always; bf16 autocasts the compute. auto: bf16 where the device multiplies
    # bf16 natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else fp32.
    precision: str = setting("auto", PRECISIONS)
    use_lora: bool = False
    lora_r: int = setting(16, ">= 1")
    lora_alpha: int = 32
    lora_dropout: float = 0.05


@dataclass
class DPOSettings(FineTuning):
    """Our DPO settings; ``training.py`` turns them into ``trl.DPOConfig``."""

    beta: float = setting(0.1, "> 0")
    # TRL's loss: sigmoid (DPO), ipo, robust (with label_smoothing), hinge, exo_pair, ... (DPO_LOSS_TYPES).
    loss_type: str = setting("sigmoid", DPO_LOSS_TYPES)
    # robust: the probability a preference label is flipped (cDPO); exo_pair: its epsilon.
    label_smoothing: float = setting(0.0, "[0, 0.5)")
    # RPO: the loss plus rpo_alpha x the chosen response's NLL (TRL's "sft" term at this weight).
    rpo_alpha: float | None = setting(None, "> 0", note="(or null: no NLL term)")
    weight_decay: float = setting(0.0, ">= 0")
    # Gradient clipping; 0 turns it off.
    max_grad_norm: float = setting(1.0, ">= 0")
    warmup_ratio: float = setting(0.0, "[0, 1)")
    lr_scheduler_type: str = "linear"
    precompute_ref_log_probs: bool = False
    gradient_checkpointing: bool = False

    def check(self) -> None:
        require(
            self.rpo_alpha is None or self.loss_type != "sft",
            "rpo_alpha",
            self.rpo_alpha,
            "adds the sft term, which loss_type=sft already is",
        )


@dataclass
class TrainConfig(Section):
    # Iterations whose DPO data also holds the judge pairs (the paper: 1 and 2).
    judge_iterations: list[int] = field(default_factory=lambda: [1, 2])
    dpo: DPOSettings = field(default_factory=DPOSettings)
    # inline: train in this process; accelerate: `accelerate launch --config_file <accelerate_config>`
    # (multi-GPU, DeepSpeed ZeRO-3 with the shipped accelerate_configs/deepspeed_zero3.yaml).
    launcher: str = setting("inline", LAUNCHERS, says="must be one of")
    # Empty: metareward/accelerate_configs/deepspeed_zero3.yaml from the installed package.
    accelerate_config: str | None = setting(None, file=True)
    # When an iteration yields no preference pairs: stop the run (saying why), or carry M_{t-1}
    # forward unchanged as M_t and go on.
    on_no_pairs: str = setting("stop", ON_NO_PAIRS)

    def check(self) -> None:
        for value in self.judge_iterations:
            require(value >= 1, "judge_iterations", self.judge_iterations, "iterations count from 1")


@dataclass
class AlignConfig(FineTuning):
    """Training a judge toward the spread of human labels (``metareward-align-judge``, and the EFT step
    before iteration 1 with ``judge_alignment.enabled``); alignment.py says what each objective is."""

    # Human evaluation rows: a bundled suite (pandalm, llmbar_natural, hh_rlhf) or a JSONL file of
    # pairwise, pointwise or generic rows (align_data.py).
    train: str = "pandalm"
    # Held-out rows (the same kinds); empty: hold out `heldout_fraction` of train's prompts.
    heldout: str | None = None
    heldout_fraction: float = setting(0.2, "[0, 1)")
    # distribution: KL(human || model) against the worst target within adversarial_epsilon (total
    # variation) of the human one, + ce_weight * CE(majority); point: CE(majority) alone.
    objective: str = setting("distribution", ALIGN_OBJECTIVES)
    ce_weight: float = setting(0.1, ">= 0")
    adversarial_epsilon: float = setting(0.05, "[0, 1]", note="(a total-variation radius)")
    # The settings shared with train.dpo (FineTuning), with a judge's learning rate; items with more
    # tokens than max_length (prompt and cue) are left out of training and evaluation, and counted.
    learning_rate: float = 1e-5
    max_length: int = 2048
    seed: int = 0
    # A checkpoint every this many optimiser steps: a killed alignment resumes from the last one.
    save_steps: int = setting(20, ">= 1")
    eval_batch_size: int = setting(8, ">= 1")
    progress: bool = True
    # Where the aligned model is saved; empty: runs/<run_name>/align/model.
    model_dir: str | None = None

    def check(self) -> None:
        require(bool(self.train), "train", self.train, "must name a bundled suite or a file")
        require(
            self.heldout is not None or self.heldout_fraction > 0,
            "heldout_fraction",
            self.heldout_fraction,
            "must be > 0 when align.heldout is not set (held-out rows are what the judge is measured on)",
        )


@dataclass
class JudgeAlignmentConfig(Section):
    """The EFT step: align the seed as a judge (``align.*``) once, before iteration 1; the aligned
    model is then M_0 for every role."""

    enabled: bool = False
