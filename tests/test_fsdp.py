"""Every stage under FSDP2 in TWO real processes on CPU (torch.distributed over gloo), through `accelerate launch
--config_file accelerate_configs/fsdp_cpu.yaml`, checked against one process at the same global batch.

One launch runs reward (LoRA + score head), DPO with LoRA, DPO as a full fine-tune, PPO (LoRA + value head, the
reward model of the first stage), GRPO and RLOO as one pipeline; the one-process pipeline is the same recipe with twice
the per-device batch. FSDP2 shards every parameter across the two ranks and all-gathers them for each forward, so
the math is the one-process math up to float reduction order:

    TOLERANCE (reward, DPO LoRA, DPO full): every logged train loss of the first 5 steps within 1e-4 and the final
    weights within 2e-3 (what tests/test_distributed.py asks of DDP).
    MEMORY (DPO full): parameter and optimizer bytes per rank, summed over the local shards, <= 0.6x one process's.
    PPO, GRPO, RLOO: each rank samples its own completions (as under DDP), so only statistics can match one process:
    the mean score of the first rollout within 0.2. tests/test_fsdp.py::test_online_stages_match_ddp_sample_for_sample
    (slow) checks them sample for sample against DDP.

If accelerate's silent fallback came back (FSDP dropped on CPU ranks: plain DDP), the per-rank bytes would equal one
process's; if the ranks trained apart, the weights would differ far beyond 2e-3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf_lm.pipeline import plan_pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
FSDP_CPU = ROOT / "accelerate_configs" / "fsdp_cpu.yaml"
GLOBAL_BATCH, GLOBAL_ROLLOUT, STEPS = 8, 16, 5
LOSS_TOL, WEIGHT_TOL, MEMORY_RATIO, SCORE_TOL = 1e-4, 2e-3, 0.6, 0.2
SUPERVISED = ("reward", "dpo", "dpo_full")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe(task: Path, processes: int) -> dict:
    """reward -> dpo (LoRA) -> dpo_full -> ppo -> grpo -> rloo; per-process sizes shrink with the process count,
    global ones do not."""
    batch, rollout = GLOBAL_BATCH // processes, GLOBAL_ROLLOUT // processes
    pairs = {"dataset_train_split": "pairs_train", "dataset_eval_split": "pairs_eval", "max_eval_samples": 16}
    dpo = {**pairs, "per_device_train_batch_size": batch, "per_device_eval_batch_size": 8, "max_steps": STEPS,
           "max_length": 96, "eval_num_prompts": 8, "eval_max_new_tokens": 8}
    prompts = {"dataset_train_split": "prompts_train", "dataset_eval_split": "prompts_eval", "max_eval_samples": 8}
    online = {**prompts, "eval_strategy": "no", "per_device_train_batch_size": rollout, "num_generations": 4,
              "max_completion_length": 12, "max_steps": 2, "learning_rate": 3e-3}
    return {
        "stages": ["reward", "dpo", "dpo_full", "ppo", "grpo", "rloo"],
        "seed": 0,
        "model_name_or_path": str(task / "base_policy"),
        "dataset_name": str(task / "data"),
        "save_strategy": "no",
        "disable_tqdm": True,
        "logging_steps": 1,
        "reward": {**pairs, "per_device_train_batch_size": batch, "max_steps": STEPS, "learning_rate": 3e-3,
                   "eval_strategy": "no"},
        "dpo": {**dpo, "learning_rate": 1e-2},
        "dpo_full": {"stage": "dpo", **dpo, "use_peft": False, "learning_rate": 1e-4},
        # PPO's rollout_batch_size and minibatch are per process: each rank samples its own share of the prompts.
        # The exact KL (as the quickstart runs PPO) adds a reference forward, adapters off, inside the sharded step.
        "ppo": {**prompts, "rollout_batch_size": rollout, "per_device_train_batch_size": rollout, "max_steps": 3,
                "max_new_tokens": 12, "num_ppo_epochs": 2, "learning_rate": 3e-3, "kl_estimator": "full"},
        "grpo": online,
        "rloo": online,
    }


def launch_pipeline(config: Path, recipe_path: Path, out: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("ACCELERATE_USE_CPU", None)  # the CLI must set it by itself for CPU ranks
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "rlhf_lm", "pipeline", "--config", str(recipe_path),
           "--output_dir", str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def runs(tiny_task_dir, tmp_path_factory) -> dict:
    """The FSDP2 pipeline in 2 processes and the same recipe in one, with their records."""
    tmp = tmp_path_factory.mktemp("fsdp")
    (tmp / "two.yaml").write_text(yaml.safe_dump(recipe(tiny_task_dir, processes=2)))
    proc = launch_pipeline(FSDP_CPU, tmp / "two.yaml", tmp / "two", tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = tmp / "one"
    run_pipeline(plan_pipeline(recipe(tiny_task_dir, processes=1), output_dir=str(one)))
    return {"two": tmp / "two", "one": one, "stdout": proc.stdout,
            "record": {n: json.loads((tmp / n / "pipeline.json").read_text()) for n in ("two", "one")}}


def weights(directory: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (directory / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(directory / name))


def step_losses(run: Path, record: dict, stage: str) -> list[float]:
    history = (json.loads((run / stage / "metrics.json").read_text()).get("log_history")
               or record["log_history"][stage])
    return [e["loss"] for e in history if "loss" in e][:STEPS]


def test_the_pipeline_ran_sharded_in_two_processes(runs):
    record = runs["record"]["two"]
    assert record["num_processes"] == 2
    assert runs["stdout"].count("Run directory:") == 1  # only rank 0 reports
    assert sorted(p.name for p in runs["two"].iterdir()) == ["dpo", "dpo_full", "grpo", "pipeline.json", "ppo",
                                                             "reward", "rloo"]
    for stage in ("ppo", "grpo", "rloo"):
        assert json.loads((runs["two"] / stage / "metrics.json").read_text())["run"]["distributed_type"] == \
            "DistributedType.FSDP", stage


@pytest.mark.parametrize("stage", SUPERVISED)
def test_supervised_stages_match_one_process(runs, stage):
    """Same samples per optimizer step, gradients reduce-scattered: each step's loss and the final weights agree."""
    two, one = (step_losses(runs[k], runs["record"][k], stage) for k in ("two", "one"))
    assert len(two) == len(one) == STEPS
    assert max(abs(a - b) for a, b in zip(two, one, strict=True)) <= LOSS_TOL, (two, one)
    w2, w1 = weights(runs["two"] / stage), weights(runs["one"] / stage)
    assert w2.keys() == w1.keys()  # the same files: tied weights stay tied, nothing added or lost
    assert max((w2[k] - w1[k]).abs().max().item() for k in w1) <= WEIGHT_TOL, stage


def test_full_fine_tuning_holds_about_half_the_state_per_rank(runs):
    two, one = (json.loads((runs[k] / "dpo_full" / "metrics.json").read_text())["metrics"] for k in ("two", "one"))
    for key in ("memory/param_bytes_per_rank", "memory/optimizer_bytes_per_rank"):
        assert one[key] > 0 and two[key] <= MEMORY_RATIO * one[key], (key, two[key], one[key])


def test_online_stages_sample_like_one_process(runs):
    """PPO, GRPO and RLOO ranks sample their own completions, so the runs cannot match sample for sample: what must hold is
    the global episode count and a first rollout (same initial policy and reward model) that scores alike."""
    ppo_two, ppo_one = (json.loads((runs[k] / "ppo" / "metrics.json").read_text()) for k in ("two", "one"))
    assert ppo_two["run"]["num_processes"] == 2 and ppo_two["run"]["episodes"] == ppo_one["run"]["episodes"] == GLOBAL_ROLLOUT * 3
    first = [next(e for e in m["log_history"] if "objective/scores" in e) for m in (ppo_two, ppo_one)]
    assert abs(first[0]["objective/scores"] - first[1]["objective/scores"]) <= SCORE_TOL
    exact_kl = [e["objective/kl_exact"] for e in ppo_two["log_history"] if "objective/kl_exact" in e]
    assert len(exact_kl) == 3 and exact_kl[-1] > 0.0  # the sharded policy moved away from its reference
    for stage in ("grpo", "rloo"):
        two, one = (json.loads((runs[k] / stage / "metrics.json").read_text()) for k in ("two", "one"))
        assert abs(two["metrics"]["reward/first"] - one["metrics"]["reward/first"]) <= SCORE_TOL, stage
        lora_b = [v for k, v in weights(runs["two"] / stage).items() if "lora_B" in k]
        assert lora_b and all(v.abs().sum() > 0 for v in lora_b), stage  # B starts at zero; training moved it


def test_artifacts_are_plain_adapters_that_load_in_one_process(runs):
    """The saved outputs of the sharded run: the reward adapter with its score head (it scores as the one-process
    model does), the PPO adapter with its value head, both loadable without any process group."""
    from peft import PeftModel

    from rlhf_lm.modeling import load_causal_lm
    from rlhf_lm.rewards import ClassifierReward

    assert any(".score." in k for k in weights(runs["two"] / "reward"))
    prompts, replies = ["Describe the cat.\n", "Describe the dog.\n"], ["the cat is happy .", "a cold rain ."]
    scores = [ClassifierReward.from_pretrained(runs[k] / "reward")(prompts, replies) for k in ("two", "one")]
    torch.testing.assert_close(scores[0], scores[1], atol=1e-3, rtol=0)
    ppo = runs["two"] / "ppo"
    head = load_file(str(ppo / "value_head.safetensors"))
    assert set(head) == {"weight", "bias"} and head["weight"].shape[0] == 1
    base = json.loads((ppo / "adapter_config.json").read_text())["base_model_name_or_path"]
    policy = PeftModel.from_pretrained(load_causal_lm(base, dtype="float32"), ppo)
    assert any("lora_" in n for n, _ in policy.named_parameters())


def test_ppo_generates_in_step_when_ranks_stop_at_different_tokens(tiny_task_dir, tmp_path):
    """Rank 0's samples end at their first token, rank 1's run to max_new_tokens: the sharded rollout generation must
    not leave rank 1 waiting for all-gathers rank 0 never joins (tests/fsdp_generate_run.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CPU), "--num_processes", "2",
           "--main_process_port", str(free_port()), str(ROOT / "tests" / "fsdp_generate_run.py"), str(tiny_task_dir),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [r["generated"] for r in ranks] == [1, 6]
    assert all(r["sharded"] and r["distributed_type"] == "DistributedType.FSDP" for r in ranks)


# ----------------------------------------------------------------------------------------- resume from checkpoints
def resume_runs(task: Path, out: Path, *cases: str) -> None:
    """tests/fsdp_resume_run.py: each STAGE:STATE_DICT_TYPE straight, killed after its step-2 checkpoint, resumed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CPU), "--num_processes", "2",
           "--main_process_port", str(free_port()), str(ROOT / "tests" / "fsdp_resume_run.py"), str(task), str(out),
           *cases]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]


def check_resumed_run(root: Path, stage: str, state_dict_type: str) -> None:
    """The resumed run ends exactly where the uninterrupted one does, from a checkpoint of the requested kind."""
    files = [json.loads((root / f"checkpoint_rank{i}.json").read_text()) for i in (0, 1)]
    assert files[0] == files[1]
    shards = [f for f in files[0] if f.endswith(".distcp")]
    if state_dict_type == "SHARDED_STATE_DICT":  # one shard file per rank, nothing gathered
        assert len(shards) == 2 * (1 if stage == "ppo" else 2), files[0]  # PPO: one folder; Trainer: model + optim
        assert not {"pytorch_model_fsdp.bin", "optimizer.bin", "full_state.pt"} & set(files[0])
    else:
        assert not shards and ({"full_state.pt"} if stage == "ppo" else {"optimizer.bin"}) <= set(files[0])
    names = ["adapter_model.safetensors"] + (["value_head.safetensors"] if stage == "ppo" else [])
    for name in names:
        straight, resumed = (load_file(str(root / run / name)) for run in ("straight", "resumed"))
        assert straight.keys() == resumed.keys()
        for key in straight:
            torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=0, msg=f"{stage} {key}")


def test_ppo_resumes_from_a_sharded_checkpoint(tiny_task_dir, tmp_path):
    resume_runs(tiny_task_dir, tmp_path, "ppo:SHARDED_STATE_DICT")
    check_resumed_run(tmp_path / "ppo_SHARDED_STATE_DICT", "ppo", "SHARDED_STATE_DICT")


@pytest.mark.slow
def test_every_stage_resumes_from_sharded_and_full_checkpoints(tiny_task_dir, tmp_path):
    """transformers' Trainer writes SHARDED checkpoints through accelerate's save_fsdp_model (DCP) and FULL ones as
    gathered files; our PPO writes either itself (rlhf_lm.ppo.sharding). Every kind resumes to the same end."""
    cases = ["reward:SHARDED_STATE_DICT", "reward:FULL_STATE_DICT", "dpo:SHARDED_STATE_DICT", "dpo:FULL_STATE_DICT",
             "ppo:FULL_STATE_DICT"]
    resume_runs(tiny_task_dir, tmp_path, *cases)
    for case in cases:
        stage, state_dict_type = case.split(":")
        check_resumed_run(tmp_path / f"{stage}_{state_dict_type}", stage, state_dict_type)


# ------------------------------------------------------------------------------------------- FSDP2 against DDP
@pytest.mark.slow
def test_online_stages_match_ddp_sample_for_sample(tiny_task_dir, tmp_path):
    """PPO and GRPO under FSDP2 and under DDP, both in 2 processes with the same per-rank seeds: the ranks draw the
    same samples, so every logged loss and the final adapter (and PPO's value head) agree as for one process."""
    task = tiny_task_dir
    rollout = GLOBAL_ROLLOUT // 2
    prompts = {"dataset_train_split": "prompts_train", "dataset_eval_split": "prompts_eval", "max_eval_samples": 8}
    pipeline = {"stages": ["ppo", "grpo"], "seed": 0, "model_name_or_path": str(task / "base_policy"),
                "dataset_name": str(task / "data"), "reward_model": "gold", "save_strategy": "no",
                "disable_tqdm": True, "logging_steps": 1,
                "ppo": recipe(task, 2)["ppo"] | {"max_steps": STEPS},
                "grpo": {**prompts, "eval_strategy": "no", "per_device_train_batch_size": rollout,
                         "num_generations": 4, "max_completion_length": 12, "max_steps": STEPS,
                         "learning_rate": 3e-3}}
    (tmp_path / "online.yaml").write_text(yaml.safe_dump(pipeline))
    for name, config in (("fsdp", FSDP_CPU), ("ddp", ROOT / "accelerate_configs" / "multi_cpu.yaml")):
        proc = launch_pipeline(config, tmp_path / "online.yaml", tmp_path / name, tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
    for stage, loss in (("ppo", "loss/policy"), ("grpo", "loss")):
        fsdp, ddp = (json.loads((tmp_path / k / stage / "metrics.json").read_text()) for k in ("fsdp", "ddp"))
        assert fsdp["run"]["distributed_type"] == "DistributedType.FSDP" and "FSDP" not in ddp["run"]["distributed_type"]
        curves = [[e[loss] for e in m["log_history"] if loss in e] for m in (fsdp, ddp)]
        assert len(curves[0]) == len(curves[1]) == STEPS
        assert max(abs(a - b) for a, b in zip(*curves, strict=True)) <= LOSS_TOL, (stage, curves)
        names = ["adapter_model.safetensors"] + (["value_head.safetensors"] if stage == "ppo" else [])
        for name in names:
            w_fsdp, w_ddp = (load_file(str(tmp_path / k / stage / name)) for k in ("fsdp", "ddp"))
            assert w_fsdp.keys() == w_ddp.keys()
            assert max((w_fsdp[k] - w_ddp[k]).abs().max().item() for k in w_ddp) <= WEIGHT_TOL, (stage, name)
