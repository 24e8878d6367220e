"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2`: PPO with the reward-stage adapter on
the policy's own base (rlhf_lm.shared_reward) and the exact KL penalty (`kl_estimator="full"`, as the quickstart
runs PPO), under DDP. Each rank writes what the test compares across ranks: the
trained policy weights (DDP keeps them equal), the reward adapter's weights before and after (frozen: unchanged), and
whether any reward weight required grad or sat in the optimizer."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from tiny_lora_policy import tiny_lora_policy, train_prompts

from rlhf_lm.launch import leave_process_group
from rlhf_lm.ppo import PPOConfig, PPOTrainer
from rlhf_lm.shared_reward import SharedBaseReward, load_reward_for_policy


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].detach().cpu().numpy().tobytes())
    return h.hexdigest()


def main(task: str, out: str, reward_dir: str) -> None:
    torch.set_num_threads(1)
    state = PartialState()
    tokenizer, policy = tiny_lora_policy(task)
    reward, layout = load_reward_for_policy(reward_dir, policy, tokenizer)
    before = digest(reward.adapter_parameters())
    prompts = train_prompts(task)
    args = PPOConfig(output_dir=f"{out}/run", rollout_batch_size=8, per_device_train_batch_size=8, max_new_tokens=12,
                     max_steps=2, num_ppo_epochs=2, learning_rate=3e-3, use_cpu=True, report_to="none",
                     disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0, kl_estimator="full")
    trainer = PPOTrainer(policy, args, tokenizer, reward, prompts)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    trainer.train()
    trainer.save_model(f"{out}/final")
    adapter = reward.adapter_parameters()
    record = {
        "num_processes": trainer.accelerator.num_processes, "shared": isinstance(reward, SharedBaseReward),
        "layout": layout, "reward_before": before, "reward_after": digest(adapter),
        "reward_trainable": any(p.requires_grad or p.grad is not None for p in adapter.values()),
        "reward_in_optimizer": any(id(p) in optimized for p in adapter.values()),
        "policy": digest({n: p for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}),
        "scores": [h["objective/scores"] for h in trainer.state.log_history if "objective/scores" in h],
        "kl_exact": [h["objective/kl_exact"] for h in trainer.state.log_history if "objective/kl_exact" in h],
    }
    Path(out, f"rank{state.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:4])
    leave_process_group()  # as the CLI does: no gloo thread may outlive the interpreter
