"""Run by tests/test_fsdp.py under `accelerate launch --config_file accelerate_configs/fsdp_cpu.yaml`: PPO's
sharded policy generates on both ranks, rank 0 stopping after its first token and rank 1 running to max_new_tokens.

Under FSDP every decoding step all-gathers the weights, a collective; the rank that stops first must keep taking part
until the other is done, or the other waits forever (transformers' `generate` does so for modules torch's
fully_shard manages: rlhf_lm.ppo.sharding must shard the very module rollouts call). Each rank writes how many
tokens it generated and whether the weights really were sharded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState
from tiny_lora_policy import tiny_lora_policy, train_prompts

from rlhf_lm.fsdp import is_sharded
from rlhf_lm.launch import check_current_launch, cpu_ranks_join_one_group, leave_process_group
from rlhf_lm.ppo import PPOConfig, PPOTrainer
from rlhf_lm.rewards import GoldReward
from rlhf_lm.sampling import left_pad, sample, sampling_config

NEW_TOKENS = 6


def main(task: str, out: str) -> None:
    torch.set_num_threads(1)
    cpu_ranks_join_one_group()  # what the rlhf-lm CLI does first
    check_current_launch()
    tokenizer, model = tiny_lora_policy(task)
    prompt = train_prompts(task)[0]
    args = PPOConfig(output_dir=f"{out}/run", rollout_batch_size=2, per_device_train_batch_size=2, use_cpu=True,
                     report_to="none", disable_tqdm=True, seed=0)
    trainer = PPOTrainer(model, args, tokenizer, GoldReward(), [prompt] * 4)
    policy, rank = trainer.unwrapped.policy, PartialState().process_index
    ids, mask = left_pad(trainer.prompt_ids[:2], tokenizer.pad_token_id, "cpu")
    with torch.no_grad():  # greedy's first token, the same on both ranks (a collective forward too)
        first = int(policy(input_ids=ids, attention_mask=mask).logits[0, -1].argmax())
    # rank 0 stops at its first token (all rows: same prompt, greedy); rank 1 has no stop token at all
    config = sampling_config(max_new_tokens=NEW_TOKENS, stop_ids=[first] if rank == 0 else [],
                             pad_id=tokenizer.pad_token_id, temperature=0)
    generated = sample(policy, ids, mask, config).shape[1] - ids.shape[1]
    dist.barrier()
    record = {"rank": rank, "generated": generated, "sharded": is_sharded(trainer.unwrapped),
              "distributed_type": str(trainer.accelerator.distributed_type)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:3])
    leave_process_group()  # as the CLI does: no gloo thread may outlive the interpreter
