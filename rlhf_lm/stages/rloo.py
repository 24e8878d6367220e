"""Stage ``rloo``: fine-tune a policy with RLOO (REINFORCE leave-one-out) through TRL's RLOOTrainer.

    rlhf-lm rloo --config recipes/builtin/rloo.yaml --reward_model runs/reward [--key value ...]

Same reward specs, LoRA, length filtering and outputs as the ``grpo`` stage (see :mod:`rlhf_lm.online_rl`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import RLOOConfig

from rlhf_lm.configs import (
    ControllerArguments,
    DataArguments,
    ModelArguments,
    NoQuantization,
    PromptsOnly,
    TrainingDefaults,
    finish_config,
    parse_config,
)
from rlhf_lm.online_rl import OnlineRLArguments, run_online
from rlhf_lm.progress import stage_summary


@dataclass
class RLOOStageConfig(OnlineRLArguments, NoQuantization, ModelArguments, PromptsOnly, DataArguments,
                      ControllerArguments, TrainingDefaults, RLOOConfig):
    """Model + LoRA, prompt data, reward spec and TRL's RLOOConfig (beta 0 by default: no reference model)."""

    output_dir: str = field(default="runs/rloo", metadata={"help": "Where the adapter and metrics go."})

    def __post_init__(self) -> None:
        finish_config(self, RLOOConfig)  # the shared mixins' checks, then TRL's


CONFIG = RLOOStageConfig


def run(cfg: RLOOStageConfig, callbacks: list | None = None) -> dict[str, float]:
    from trl import RLOOTrainer

    return run_online(cfg, RLOOTrainer, "rloo", callbacks)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(RLOOStageConfig, argv)
    print(stage_summary("rloo", "rloo", run(cfg), f"written to {cfg.output_dir}"))
    return 0
