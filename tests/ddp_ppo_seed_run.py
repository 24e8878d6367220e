"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2`: our PPOTrainer on both ranks, then
one rollout of the SAME prompt on every rank. The weights are identical on both ranks (DDP); if both ranks also
sampled from one seed, their completions would be identical too. Each rank writes its completions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from tiny_lora_policy import tiny_lora_policy, train_prompts

from rlhf_lm.launch import leave_process_group
from rlhf_lm.ppo import PPOConfig, PPOTrainer
from rlhf_lm.ppo.rollout import collect_rollout
from rlhf_lm.rewards import GoldReward


def main(task: str, out: str) -> None:
    torch.set_num_threads(1)
    state = PartialState()
    tokenizer, model = tiny_lora_policy(task)
    prompt = train_prompts(task)[0]
    args = PPOConfig(output_dir=f"{out}/run", rollout_batch_size=8, max_new_tokens=12, use_cpu=True,
                     report_to="none", disable_tqdm=True, seed=0)
    trainer = PPOTrainer(model, args, tokenizer, GoldReward(), [prompt] * 16)
    rollout = collect_rollout(trainer.unwrapped, tokenizer, trainer.prompts[:8], trainer.prompt_ids[:8],
                              trainer.reward_model, args, forward_batch_size=8)
    record = {"num_processes": state.num_processes, "completions": rollout.completions}
    Path(out, f"rank{state.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:3])
    leave_process_group()  # as the CLI does: no gloo thread may outlive the interpreter
