"""Run by tests/test_fsdp.py under `accelerate launch --config_file accelerate_configs/fsdp_cpu.yaml`: for each
STAGE:STATE_DICT_TYPE given, train a stage three times in these two processes - straight through, then the same run
killed right after its checkpoint at step 2 is complete, then resumed from it - with the launch's
fsdp_state_dict_type replaced by STATE_DICT_TYPE (SHARDED_STATE_DICT: each rank writes its shards; FULL_STATE_DICT:
gathered on rank 0).

    python tests/fsdp_resume_run.py TASK_DIR OUT_DIR reward:SHARDED_STATE_DICT ppo:FULL_STATE_DICT ...

Writes OUT_DIR/<stage>_<type>/{straight,resumed} and, per rank, OUT_DIR/<stage>_<type>/checkpoint_rank<i>.json with
the files of the checkpoint the resume started from.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

from rlhf_lm.checkpoints import AtomicCheckpoints
from rlhf_lm.configs import parse_config
from rlhf_lm.launch import check_current_launch, cpu_ranks_join_one_group, leave_process_group
from rlhf_lm.ppo.trainer import PPOTrainer

CRASH_STEP = 2
_crash = {"on": False}


class Killed(KeyboardInterrupt):
    """Stands in for a job killed right after a checkpoint was published."""


def crash_after_checkpoint(cls: type, method: str) -> None:
    original = getattr(cls, method)

    def save_then_crash(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if _crash["on"] and self.state.global_step == CRASH_STEP:
            raise Killed(f"killed after the checkpoint of step {CRASH_STEP}")
        return result

    setattr(cls, method, save_then_crash)


def stage_args(stage: str, task: str) -> list[str]:
    common = {"model_name_or_path": f"{task}/base_policy", "dataset_name": f"{task}/data", "seed": 0,
              "max_steps": 4, "save_strategy": "steps", "save_steps": CRASH_STEP, "logging_steps": 1,
              "disable_tqdm": "true"}
    pairs = {"dataset_train_split": "pairs_train", "dataset_eval_split": "pairs_eval", "max_eval_samples": 8,
             "per_device_train_batch_size": 4}
    own = {
        "reward": {**pairs, "learning_rate": 3e-3, "eval_strategy": "no"},
        "dpo": {**pairs, "learning_rate": 1e-2, "max_length": 96, "eval_num_prompts": 4, "eval_max_new_tokens": 4},
        "ppo": {"dataset_train_split": "prompts_train", "dataset_eval_split": "prompts_eval", "max_eval_samples": 4,
                "reward_model": "gold", "rollout_batch_size": 4, "per_device_train_batch_size": 4,
                "max_new_tokens": 8, "num_ppo_epochs": 2, "learning_rate": 3e-3},
    }[stage]
    return [part for key, value in {**common, **own}.items() for part in (f"--{key}", str(value))]


def main(task: str, out: str, *cases: str) -> None:
    cpu_ranks_join_one_group()  # what the rlhf-lm CLI does first
    check_current_launch()
    crash_after_checkpoint(AtomicCheckpoints, "_save_checkpoint")  # reward, DPO (transformers' Trainer)
    crash_after_checkpoint(PPOTrainer, "save_checkpoint")
    rank = int(os.environ["RANK"])
    for case in cases:
        stage, state_dict_type = case.split(":")
        os.environ["FSDP_STATE_DICT_TYPE"] = state_dict_type  # read when each trainer builds its FSDP plugin
        module = importlib.import_module(f"rlhf_lm.stages.{stage}")
        root = Path(out) / f"{stage}_{state_dict_type}"
        argv = stage_args(stage, task)
        module.run(parse_config(module.CONFIG, [*argv, "--output_dir", str(root / "straight")]))
        _crash["on"] = True
        try:
            module.run(parse_config(module.CONFIG, [*argv, "--output_dir", str(root / "resumed")]))
            raise AssertionError("the run was not killed")
        except Killed:
            pass
        finally:
            _crash["on"] = False
        checkpoint = root / "resumed.partial" / f"checkpoint-{CRASH_STEP}"
        files = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())
        (root / f"checkpoint_rank{rank}.json").write_text(json.dumps(files))
        module.run(parse_config(module.CONFIG, [*argv, "--output_dir", str(root / "resumed"),
                                                "--resume_from_checkpoint", "true"]))


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave_process_group()  # as the CLI does: no gloo thread may outlive the interpreter
