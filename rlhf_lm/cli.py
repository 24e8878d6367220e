"""``rlhf-lm`` / ``python -m rlhf_lm``: one subcommand per stage, plus pipeline, quickstart and push.

Works the same under ``accelerate launch -m rlhf_lm <command> ...``. Mistakes we can detect (``RlhfError``) print
one clear line and exit 2; anything else keeps its traceback because it is a bug.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys

from rlhf_lm.errors import RlhfError

# command -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("rlhf_lm.quickstart", "The whole pipeline on the built-in task, offline on CPU, in minutes."),
    "task": ("rlhf_lm.stages.task", "Build the built-in gold-reward task: data files and a tiny base policy."),
    "reward": ("rlhf_lm.stages.reward", "Train a reward model on preference pairs (TRL RewardTrainer, LoRA)."),
    "dpo": ("rlhf_lm.stages.dpo", "Fine-tune a policy with DPO (TRL DPOTrainer, LoRA, reference = adapters off)."),
    "ppo": ("rlhf_lm.stages.ppo", "Fine-tune a policy with PPO (LoRA policy + value head on one frozen base)."),
    "grpo": ("rlhf_lm.stages.grpo", "Fine-tune a policy with GRPO (TRL GRPOTrainer)."),
    "rloo": ("rlhf_lm.stages.rloo", "Fine-tune a policy with RLOO (TRL RLOOTrainer)."),
    "evaluate": ("rlhf_lm.stages.evaluate", "Win-rate vs the reference, reward, KL and samples on held-out prompts."),
    "pipeline": ("rlhf_lm.pipeline", "Run the stages of a pipeline recipe in order, each using the last's output."),
    "push": ("rlhf_lm.hub", "Push a run's adapters, reward model and a model card to the Hugging Face Hub."),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rlhf-lm <command> [--config recipe.yaml] [--key value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`rlhf-lm <command> --help` lists every config key of that command."]
    return "\n".join(lines)


def _cpu_ranks_join_one_group() -> None:
    """Under torchrun on a machine without CUDA, make the ranks one gloo process group.

    Accelerate's multi-process launcher does not tell the ranks they run on CPU, and a Trainer without
    ``use_cpu`` then silently runs N independent single-process copies. ACCELERATE_USE_CPU is what both
    transformers' TrainingArguments and Accelerator read to pick the MULTI_CPU (gloo) setup instead.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "ACCELERATE_USE_CPU" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["ACCELERATE_USE_CPU"] = "true"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"rlhf-lm: unknown command '{command}'.{hint}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=os.environ.get("RLHF_LM_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    _cpu_ranks_join_one_group()
    module = importlib.import_module(COMMANDS[command][0])
    try:
        code = module.main(rest)
    except RlhfError as e:
        print(f"rlhf-lm {command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
