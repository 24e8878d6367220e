"""Stage ``rloo``: fine-tune a policy with RLOO (REINFORCE leave-one-out) through TRL's RLOOTrainer.

    rlhf-lm rloo --config recipes/builtin/rloo.yaml --reward_model runs/reward [--key value ...]

Same reward specs, LoRA, length filtering and outputs as the ``grpo`` stage (see :mod:`rlhf_lm.online_rl`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import RLOOConfig

from rlhf_lm.online_rl import OnlineRLArguments, online_main, run_online


@dataclass
class RLOOStageConfig(OnlineRLArguments, RLOOConfig):
    """Model + LoRA, prompt data, reward spec and TRL's RLOOConfig (beta 0 by default: no reference model)."""

    TRL_CONFIG = RLOOConfig

    output_dir: str = field(default="runs/rloo", metadata={"help": "Where the adapter and metrics go."})


CONFIG = RLOOStageConfig


def run(cfg: RLOOStageConfig, callbacks: list | None = None) -> dict[str, float]:
    from trl import RLOOTrainer

    return run_online(cfg, RLOOTrainer, "rloo", callbacks)


def main(argv: list[str] | None = None) -> int:
    return online_main(RLOOStageConfig, run, "rloo", argv)
