"""The reward, DPO and PPO stages in TWO real processes on CPU (torch.distributed, gloo) through `accelerate launch`,
checked against one process at the same global batch.

One `accelerate launch --config_file accelerate_configs/multi_cpu.yaml --num_processes 2 -m rlhf_lm pipeline` runs
the three stages (one launch: the two ranks import the stack once). Each rank gets half the per-device batch, so the
global batch equals the one-process run's. For reward and DPO, DDP then sees the same samples per optimizer step and
averages the same gradients, so the logged train loss and the saved weights match up to float reduction order:

    TOLERANCE (reward, DPO): |train loss difference| <= 1e-4 and max |weight difference| <= 2e-3 (weights are
    O(0.1); Adam's normalised steps turn reduction-order noise into ~1e-4 weight noise over a few steps).
    TOLERANCE (PPO): ranks sample their own completions, so only statistics can agree: the mean reward-model score
    of the first rollout (16 samples from the same initial policy) within 0.2 of the one-process run's.

If the ranks did NOT form one group (e.g. `--cpu`, which starts one process, or ranks that never join), each would
train alone on batches of half the size and the weights would differ by far more. Only rank 0 writes outputs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from rlhf_lm.pipeline import plan_pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, GLOBAL_ROLLOUT = 8, 16
LOSS_TOL, WEIGHT_TOL, PPO_SCORE_TOL = 1e-4, 2e-3, 0.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe(task: Path, processes: int) -> dict:
    """reward -> dpo -> ppo on the tiny task; per-process sizes shrink with the process count, global ones do not."""
    batch, rollout = GLOBAL_BATCH // processes, GLOBAL_ROLLOUT // processes
    pairs = {"dataset_train_split": "pairs_train", "dataset_eval_split": "pairs_eval", "max_eval_samples": 16}
    return {
        "stages": ["reward", "dpo", "ppo"],
        "seed": 0,
        "model_name_or_path": str(task / "base_policy"),
        "dataset_name": str(task / "data"),
        "save_strategy": "no",
        "disable_tqdm": True,
        "logging_steps": 1,
        "reward": {**pairs, "per_device_train_batch_size": batch, "max_steps": 4, "learning_rate": 3e-3,
                   "eval_strategy": "no"},
        "dpo": {**pairs, "per_device_train_batch_size": batch, "per_device_eval_batch_size": 8, "max_steps": 4,
                "learning_rate": 1e-2, "max_length": 96, "eval_num_prompts": 8, "eval_max_new_tokens": 8},
        # PPO's rollout_batch_size and minibatch are per process: each rank samples its own share of the prompts.
        "ppo": {"dataset_train_split": "prompts_train", "dataset_eval_split": "prompts_eval", "max_eval_samples": 8,
                "rollout_batch_size": rollout, "per_device_train_batch_size": rollout, "max_steps": 3,
                "max_new_tokens": 12, "num_ppo_epochs": 2, "learning_rate": 3e-3},
    }


def adapter(directory: Path) -> dict:
    return load_file(str(directory / "adapter_model.safetensors"))


def test_two_processes_match_one_at_the_same_global_batch(tiny_task_dir, tmp_path):
    two = tmp_path / "two"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(recipe(tiny_task_dir, processes=2)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("ACCELERATE_USE_CPU", None)  # the CLI must set it by itself for CPU ranks
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "multi_cpu.yaml"), "--num_processes", "2", "--main_process_port",
           str(free_port()), "-m", "rlhf_lm", "pipeline", "--config", str(path), "--output_dir", str(two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((two / "pipeline.json").read_text())
    assert record["num_processes"] == 2
    assert proc.stdout.count("Run directory:") == 1  # only rank 0 reports

    one = tmp_path / "one"
    results = run_pipeline(plan_pipeline(recipe(tiny_task_dir, processes=1), output_dir=str(one)))
    assert json.loads((one / "pipeline.json").read_text())["num_processes"] == 1
    two_metrics = record["metrics"]

    # reward and DPO: same samples per optimizer step, averaged gradients -> the same run up to reduction order
    for stage in ("reward", "dpo"):
        assert abs(two_metrics[stage]["train/loss"] - results[stage]["train/loss"]) <= LOSS_TOL, stage
        w1, w2 = adapter(one / stage), adapter(two / stage)
        assert w1.keys() == w2.keys()
        assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= WEIGHT_TOL, stage

    # PPO samples its own completions on each rank, so the runs cannot match sample for sample. What must hold: the
    # trainer saw 2 processes, the global episode count equals the one-process run's, and the first rollout (same
    # initial policy and reward model, 16 samples each) scores alike within PPO_SCORE_TOL.
    ppo_two, ppo_one = (json.loads((d / "ppo" / "metrics.json").read_text()) for d in (two, one))
    assert ppo_two["run"]["num_processes"] == 2 and ppo_one["run"]["num_processes"] == 1
    assert ppo_two["run"]["episodes"] == ppo_one["run"]["episodes"] == GLOBAL_ROLLOUT * 3
    first = [next(e for e in m["log_history"] if "objective/scores" in e) for m in (ppo_two, ppo_one)]
    assert abs(first[0]["objective/scores"] - first[1]["objective/scores"]) <= PPO_SCORE_TOL
    assert (two / "ppo" / "adapter_model.safetensors").is_file()
    # the reward stage's adapter was trained on the policy's base: both runs scored it on the policy's own weights
    assert ppo_two["run"]["reward_layout"]["shared_base"] and ppo_one["run"]["reward_layout"]["shared_base"]
    assert not (two / "ppo" / "reward").exists()

    # only rank 0 wrote: one output dir per stage, nothing left in side directories
    assert sorted(p.name for p in two.iterdir()) == ["dpo", "pipeline.json", "ppo", "reward"]


def launch_two_ranks(script: str, task: Path, out: Path, *extra: str) -> tuple[dict, dict]:
    """Run tests/<script> in 2 CPU processes of one group (arguments: task, out, *extra); each rank writes
    rank<i>.json into ``out``."""
    # a bare script, not the rlhf-lm CLI: it must tell accelerate itself that the ranks are CPU ranks of one group
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "multi_cpu.yaml"), "--num_processes", "2", "--main_process_port",
           str(free_port()), str(ROOT / "tests" / script), str(task), str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tuple(json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1))


def test_controller_decides_once_for_both_ranks(tiny_task_dir, tmp_path):
    """The online controller under 2-process DDP, with rank 1's probe planner disagreeing: both ranks follow rank
    0 (same probes, same decisions) and end with identical weights, instead of hanging or training apart."""
    rank0, rank1 = launch_two_ranks("ddp_controller_run.py", tiny_task_dir, tmp_path)
    assert rank0["num_processes"] == 2
    assert rank0["probes"] >= 2  # rank 0's planner probed more than once; rank 1's alone would never have
    for key in ("probes", "decisions", "lr_multiplier", "history"):
        assert rank0[key] == rank1[key], key
    assert rank0["weights"] == rank1["weights"]


def test_each_rank_samples_with_its_own_seed(tiny_task_dir, tmp_path):
    """Same weights and the same prompt on both ranks: one seed for all ranks would give identical samples."""
    rank0, rank1 = launch_two_ranks("ddp_ppo_seed_run.py", tiny_task_dir, tmp_path)
    assert rank0["num_processes"] == rank1["num_processes"] == 2
    assert rank0["completions"] != rank1["completions"]


def test_ppo_with_a_shared_reward_adapter_under_ddp(tiny_task_dir, tmp_path):
    """The reward-stage adapter on the policy's base in 2 DDP processes, with the exact KL penalty: it scores on every
    rank, is in no optimizer and no gradient, ends bit-identical to how it was loaded on both ranks, and the policy
    weights stay in sync (the exact KL's extra reference forward runs inside the DDP-wrapped step)."""
    from rlhf_lm.configs import config_from_dict
    from rlhf_lm.stages import reward as reward_stage

    rm = tmp_path / "reward"
    reward_stage.run(config_from_dict(reward_stage.RewardStageConfig, dict(
        model_name_or_path=str(tiny_task_dir / "base_policy"), dataset_name=str(tiny_task_dir / "data"),
        dataset_train_split="pairs_train", dataset_eval_split="pairs_eval", output_dir=str(rm), max_steps=2,
        per_device_train_batch_size=16, learning_rate=3e-3, save_strategy="no", disable_tqdm=True, use_cpu=True,
        report_to="none"), "test"))
    out = tmp_path / "ddp"
    out.mkdir()
    rank0, rank1 = launch_two_ranks("ddp_shared_reward_run.py", tiny_task_dir, out, str(rm))
    for rank in (rank0, rank1):
        assert rank["num_processes"] == 2 and rank["shared"] and rank["layout"]["shared_base"]
        assert rank["reward_after"] == rank["reward_before"] == rank0["reward_before"]
        assert not rank["reward_trainable"] and not rank["reward_in_optimizer"]
        assert len(rank["scores"]) == 2
        assert len(rank["kl_exact"]) == 2 and rank["kl_exact"][0] >= 0.0 and rank["kl_exact"][1] > 0.0  # moved
    assert rank0["policy"] == rank1["policy"]
    assert not (out / "final" / "reward").exists() and (out / "final" / "adapter_model.safetensors").is_file()
