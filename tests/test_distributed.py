"""Stages in TWO real processes on CPU (torch.distributed, gloo) through `accelerate launch`, checked against one
process at the same global batch.

One `accelerate launch --config_file accelerate_configs/multi_cpu.yaml --num_processes 2 -m rlhf_lm pipeline` runs
the stages (one launch: the two ranks import the stack once). Each rank gets half the per-device batch, so the
global batch equals the one-process run's. With DDP the two runs see the same samples per optimizer step and average
the same gradients, so the logged train loss and the saved weights match up to float reduction order:

    TOLERANCE: |train loss difference| <= 1e-4 and max |weight difference| <= 2e-3 (weights are O(0.1); Adam's
    normalised steps turn reduction-order noise into ~1e-4 weight noise over a few steps).

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
GLOBAL_BATCH = 8
LOSS_TOL, WEIGHT_TOL = 1e-4, 2e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe(task: Path, per_device: int) -> dict:
    data = {"model_name_or_path": str(task / "base_policy"), "dataset_name": str(task / "data")}
    common = {"per_device_train_batch_size": per_device, "gradient_accumulation_steps": 1, "max_steps": 4,
              "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no", "disable_tqdm": True,
              "dataloader_num_workers": 0}
    return {
        "stages": ["reward"],
        "seed": 0,
        "reward": {**data, **common, "dataset_train_split": "pairs_train", "dataset_eval_split": "pairs_eval",
                   "learning_rate": 3e-3, "max_eval_samples": 16},
    }


def adapter(directory: Path) -> dict:
    return load_file(str(directory / "adapter_model.safetensors"))


def test_two_processes_match_one_at_the_same_global_batch(tiny_task_dir, tmp_path):
    two = tmp_path / "two"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(recipe(tiny_task_dir, per_device=GLOBAL_BATCH // 2)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("ACCELERATE_USE_CPU", None)  # the CLI must set it by itself for CPU ranks
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "multi_cpu.yaml"), "--num_processes", "2", "--main_process_port",
           str(free_port()), "-m", "rlhf_lm", "pipeline", "--config", str(path), "--output_dir", str(two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((two / "pipeline.json").read_text())
    assert record["num_processes"] == 2

    one = tmp_path / "one"
    results = run_pipeline(plan_pipeline(recipe(tiny_task_dir, per_device=GLOBAL_BATCH), output_dir=str(one)))
    two_metrics = record["metrics"]
    for stage in ("reward",):
        assert abs(two_metrics[stage]["train/loss"] - results[stage]["train/loss"]) <= LOSS_TOL
        w1, w2 = adapter(one / stage), adapter(two / stage)
        assert w1.keys() == w2.keys()
        assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= WEIGHT_TOL
        # only rank 0 wrote: one output dir, no leftovers from a second writer
        assert sorted(p.name for p in two.iterdir() if p.name.startswith(stage)) == [stage]
