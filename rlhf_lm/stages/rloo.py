"""Stage ``rloo``: fine-tune a policy with RLOO (REINFORCE leave-one-out) through TRL's RLOOTrainer.

    rlhf-lm rloo --config recipes/builtin/rloo.yaml --reward_model runs/reward [--key value ...]

Same reward specs, LoRA, length filtering and outputs as the ``grpo`` stage (see :mod:`rlhf_lm.stages.grpo`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import RLOOConfig

from rlhf_lm.configs import (
    ControllerArguments,
    DataArguments,
    ModelArguments,
    TrainingDefaults,
    _call_next_post_init,
    parse_config,
)
from rlhf_lm.stages.grpo import run_online


@dataclass
class RLOOStageConfig(ModelArguments, DataArguments, ControllerArguments, TrainingDefaults, RLOOConfig):
    """Model + LoRA, prompt data, reward spec and TRL's RLOOConfig (beta 0 by default: no reference model)."""

    output_dir: str = field(default="runs/rloo", metadata={"help": "Where the adapter and metrics go."})
    reward_model: str | None = field(
        default=None,
        metadata={"help": "Reward spec: 'gold' (built-in task), a reward-stage output dir, 'pkg.mod:Name' or "
                          "'file.py:Name'."},
    )
    max_prompt_length: int | None = field(
        default=512, metadata={"help": "Prompts with more tokens are dropped (and counted). None = keep all."})
    data_format: str = field(default="prompt_only", metadata={"help": "Prompt rows (RLOO reads prompts only)."})

    def __post_init__(self) -> None:
        _call_next_post_init(self, RLOOStageConfig)


CONFIG = RLOOStageConfig


def run(cfg: RLOOStageConfig) -> dict[str, float]:
    from trl import RLOOTrainer

    return run_online(cfg, RLOOTrainer, "rloo")


def main(argv: list[str] | None = None) -> int:
    print(run(parse_config(RLOOStageConfig, argv)))
    return 0
