"""The small LoRA policy the multi-process test scripts start from (ddp_ppo_seed_run, ddp_shared_reward_run,
fsdp_generate_run): the tiny task's base policy with a rank-4 adapter, seeded, and its training prompts. Imported as a
sibling module: those scripts run as files, so tests/ is on their path."""

from __future__ import annotations

import json
from pathlib import Path

from peft import get_peft_model
from transformers import set_seed

from rlhf_lm.configs import ModelArguments
from rlhf_lm.modeling import load_causal_lm, load_tokenizer, lora_config_from_args


def tiny_lora_policy(task: str):
    """(left-padding tokenizer, LoRA policy) on ``task``'s base policy; the same on every rank (seed 0)."""
    set_seed(0)
    tokenizer = load_tokenizer(f"{task}/base_policy", padding_side="left")
    policy = get_peft_model(load_causal_lm(f"{task}/base_policy", dtype="float32"),
                            lora_config_from_args(ModelArguments(lora_r=4, lora_alpha=8)))
    return tokenizer, policy


def train_prompts(task: str) -> list:
    """The task's training prompts, in file order."""
    return [json.loads(line)["prompt"] for line in Path(f"{task}/data/prompts_train.jsonl").read_text().splitlines()]
