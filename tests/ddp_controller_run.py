"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2`: DPO with the online controller,
where rank 1's probe planner disagrees with rank 0's, then every rank writes what it ended with.

Each rank's planner budgets probes on its own timings, so a rank that measured itself slower can decide not to
probe while rank 0 probes - and a probe runs DDP collectives, so the ranks would hang or train apart. Here rank 1's
planner always says no; the controller must follow rank 0 on every rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from rlhf_lm.configs import config_from_dict
from rlhf_lm.controller import build_callback
from rlhf_lm.controller.policies.online import ProbePlanner
from rlhf_lm.launch import leave_process_group
from rlhf_lm.stages.dpo import DPOStageConfig, build_trainer


def main(task: str, out: str) -> None:
    torch.set_num_threads(1)
    state = PartialState()
    cfg = config_from_dict(DPOStageConfig, dict(
        model_name_or_path=f"{task}/base_policy", dataset_name=f"{task}/data/pairs_train.jsonl",
        eval_dataset_name=f"{task}/data/pairs_eval.jsonl", output_dir=f"{out}/run", max_steps=8,
        per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=1e-2, max_length=96,
        save_strategy="no", logging_steps=1, disable_tqdm=True, eval_prompts=None, seed=0, report_to="none"))
    controller = build_callback({"policy": "online", "interval": 2, "probe_steps": 1, "val_batch_size": 8,
                                 "compute_budget": 3.0}, stage="dpo")
    if state.process_index == 1:  # this process only
        ProbePlanner.should_probe = lambda self, decision_index: False
    trainer, _, _ = build_trainer(cfg)
    controller.attach(trainer)
    trainer.train()
    weights = {n: p.detach().double().sum().item() for n, p in trainer.model.named_parameters() if p.requires_grad}
    record = {"probes": controller.probes, "decisions": controller.decisions, "lr_multiplier": controller.lr_multiplier,
              "history": controller.history, "weights": weights, "num_processes": state.num_processes}
    Path(out, f"rank{state.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    leave_process_group()  # as the CLI does: no gloo thread may outlive the interpreter
