"""Stage ``grpo``: fine-tune a policy with GRPO through TRL's GRPOTrainer, LoRA on, any reward spec.

    rlhf-lm grpo --config recipes/builtin/grpo.yaml --reward_model runs/reward [--key value ...]

TRL does the algorithm; :mod:`rlhf_lm.online_rl` adds what it lacks for our recipes (the same reward specs as PPO,
counted prompt-length filtering, the stage contract), shared with ``rloo``, which runs TRL's RLOOTrainer instead.

Engines (docs/distributed.md): one process, DDP and FSDP2 (TRL generates from the shards; the adapter is gathered for
saving). Run in 2 CPU processes in CI (tests/test_fsdp.py); DeepSpeed and GPUs: config only, not run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from rlhf_lm.online_rl import OnlineRLArguments, online_main, run_online


@dataclass
class GRPOStageConfig(OnlineRLArguments, GRPOConfig):
    """Model + LoRA, prompt data, reward spec and TRL's GRPOConfig (beta 0 by default: no reference model)."""

    TRL_CONFIG = GRPOConfig

    output_dir: str = field(default="runs/grpo", metadata={"help": "Where the adapter and metrics go."})


CONFIG = GRPOStageConfig


def run(cfg: GRPOStageConfig, callbacks: list | None = None) -> dict[str, float]:
    from trl import GRPOTrainer

    return run_online(cfg, GRPOTrainer, "grpo", callbacks)


def main(argv: list[str] | None = None) -> int:
    return online_main(GRPOStageConfig, run, "grpo", argv)
