"""Our PPO vs trl==1.12.0's ``trl.experimental.ppo.PPOTrainer`` (the last TRL with PPO), same task and budget.

    python benchmarks/ppo_vs_trl112.py [--work_dir runs/bench_ppo] [--steps 60] [--seeds 0,1,2]

Both trainers start from the built-in task's base policy with a LoRA adapter of the same shape, use the same
reward model (our reward stage, merged so TRL can load it as a plain classifier), the same prompts, the same number
of episodes, rollout batch, minibatches, PPO epochs, learning rate, response length, temperature, KL coefficient and
missing-EOS penalty. TRL 1.12 runs in its own virtualenv (``.venv/trl112``, created on first use); each run is a
fresh subprocess, ours and theirs alternating, timed around ``train()`` and measured for peak RSS.

Each training seed runs both sides, and every adapter is judged the same way, in this process:
:func:`rlhf_lm.evaluation.evaluate_policy` on the held-out prompts with the gold reward (same evaluation seed and
sampling for all). Quality is the mean over training seeds, because one seed's gold reward varies by about +-0.1 on
this task, more than the difference being measured. Writes ``benchmarks/results/ppo_vs_trl112.json``:
gold_reward_ours / gold_reward_trl (means, and per seed), win-rates and KL vs the reference,
wall_ratio (ours / theirs, of the median wall times over seeds), cpu_ratio (the same for CPU seconds of the training
process, which other jobs on a shared machine do not inflate) and peak_mem_ratio (peak RSS, ours / theirs).

Differences by design (each side's own defaults where the other has no equivalent): TRL 1.12 trains a separate,
fully trainable value model initialised from the reward model; ours trains a value head on the policy's LoRA trunk.
Ours normalises scores with running statistics and takes the KL penalty exactly over the vocabulary (recipe
settings: ``normalize_scores``, ``kl_estimator: full``); TRL 1.12 has neither and uses the sampled k1 estimate. The
objective is the same, ``kl_coef`` x KL(policy || reference); eval/kl is measured the same way for both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This checkout's rlhf_lm, in this process and in our worker (both run this file, whose folder is sys.path[0]): an
# installed rlhf_lm from another checkout (an editable install of the main worktree) would be benchmarked otherwise.
sys.path.insert(0, str(ROOT))
VENV = ROOT / ".venv" / "trl112"
TRL_PACKAGES = ["trl==1.12.0", "transformers==5.23.0", "torch==2.13.0", "peft", "datasets", "accelerate"]

# Shared settings (both sides read these). The learning rate is recipes/builtin/ppo.yaml's: at 3e-3 both trainers
# diverge on the task's base policy (KL ~8.5 nats/token, gold reward far below the reference), which compares nothing.
COMMON = dict(learning_rate=1e-3, rollout_batch_size=64, minibatch_size=16, num_ppo_epochs=4, max_new_tokens=40,
              temperature=1.0, kl_coef=0.05, missing_eos_penalty=1.0, lora_r=16, lora_alpha=32, seed=0)
OURS_EXTRA = dict(normalize_scores=True, vf_coef=0.5, kl_estimator="full")  # recipes/builtin/ppo.yaml's
TRL_EXTRA = dict(vf_coef=0.1)  # TRL 1.12's default, for its separate value model

TRL_WORKER = r'''
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed
from trl.experimental.ppo import PPOConfig, PPOTrainer

def peak_rss_mb() -> float:
    # This process's own resident-memory high-water mark. Not ru_maxrss: a worker started with fork+exec inherits
    # its parent's peak there, so both sides would report the driver's memory.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tensor_mb(modules, optimizer) -> float:
    """MB held by the parameters of ``modules`` and the optimizer's state, each storage counted once."""
    seen, total = set(), 0
    tensors = [p for m in modules for p in m.parameters()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**20
spec = json.loads(sys.argv[1])
c = spec["common"]
set_seed(c["seed"])
tok = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")
policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
value = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, dtype=torch.float32)
reward = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, dtype=torch.float32)
prompts = [json.loads(line)["prompt"] for line in open(spec["prompts"])]
ds = Dataset.from_dict({"input_ids": [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]})
args = PPOConfig(
    output_dir=spec["output_dir"], learning_rate=c["learning_rate"], lr_scheduler_type="constant",
    per_device_train_batch_size=c["rollout_batch_size"], gradient_accumulation_steps=1,
    num_mini_batches=c["rollout_batch_size"] // c["minibatch_size"], num_ppo_epochs=c["num_ppo_epochs"],
    total_episodes=spec["steps"] * c["rollout_batch_size"], local_rollout_forward_batch_size=c["rollout_batch_size"],
    response_length=c["max_new_tokens"], temperature=c["temperature"], kl_coef=c["kl_coef"],
    missing_eos_penalty=c["missing_eos_penalty"], stop_token="eos", num_sample_generations=0, seed=c["seed"],
    report_to="none", save_strategy="no", use_cpu=True, bf16=False, logging_steps=10, disable_tqdm=True,
    **spec["extra"])
peft_config = LoraConfig(r=c["lora_r"], lora_alpha=c["lora_alpha"], lora_dropout=0.0, target_modules="all-linear",
                         task_type="CAUSAL_LM")
trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                     value_model=value, train_dataset=ds, peft_config=peft_config)
cpu0, start = time.process_time(), time.perf_counter()
trainer.train()
wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
trainer.save_model(spec["output_dir"] + "/adapter")
print("RESULT" + json.dumps({"wall_s": wall, "cpu_s": cpu,
                             "model_and_optimizer_mb": tensor_mb([trainer.model, trainer.reward_model], trainer.optimizer),
                             "peak_rss_mb": peak_rss_mb()}))
'''


def peak_rss_mb() -> float:
    # This process's own resident-memory high-water mark. Not ru_maxrss: a worker started with fork+exec inherits
    # its parent's peak there, so both sides would report the driver's memory.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tensor_mb(modules, optimizer) -> float:
    """MB held by the parameters of ``modules`` and the optimizer's state, each storage counted once."""
    import torch

    seen, total = set(), 0
    tensors = [p for m in modules for p in m.parameters()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**20


def ours_worker(spec: dict) -> None:
    """Train our PPO in this (fresh) process and print wall time and peak RSS."""
    import torch

    torch.set_num_threads(1)
    from peft import get_peft_model
    from transformers import set_seed

    from rlhf_lm.configs import ModelArguments
    from rlhf_lm.modeling import load_causal_lm, load_tokenizer, lora_config_from_args
    from rlhf_lm.ppo import PPOConfig, PPOTrainer
    from rlhf_lm.rewards import load_reward

    c = spec["common"]
    set_seed(c["seed"])
    tokenizer = load_tokenizer(spec["policy"], padding_side="left")
    model = load_causal_lm(spec["policy"], dtype="float32")
    model = get_peft_model(model, lora_config_from_args(ModelArguments(lora_r=c["lora_r"], lora_alpha=c["lora_alpha"])))
    prompts = [json.loads(line)["prompt"] for line in open(spec["prompts"])]
    args = PPOConfig(output_dir=spec["output_dir"], max_steps=spec["steps"], learning_rate=c["learning_rate"],
                     lr_scheduler_type="constant", rollout_batch_size=c["rollout_batch_size"],
                     per_device_train_batch_size=c["minibatch_size"], num_ppo_epochs=c["num_ppo_epochs"],
                     max_new_tokens=c["max_new_tokens"], temperature=c["temperature"], kl_coef=c["kl_coef"],
                     missing_eos_penalty=c["missing_eos_penalty"], seed=c["seed"], report_to="none",
                     save_strategy="no", use_cpu=True, logging_steps=10, disable_tqdm=True, **spec["extra"])
    trainer = PPOTrainer(model, args, tokenizer, load_reward(spec["reward"]), prompts)
    cpu0, start = time.process_time(), time.perf_counter()
    trainer.train()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    trainer.save_model(Path(spec["output_dir"]) / "adapter")
    reward_modules = [trainer.reward_model.model] if hasattr(trainer.reward_model, "model") else []
    print("RESULT" + json.dumps({"wall_s": wall, "cpu_s": cpu,
                                 "model_and_optimizer_mb": tensor_mb([trainer.model, *reward_modules], trainer.optimizer),
                                 "peak_rss_mb": peak_rss_mb()}))


def ensure_trl112_venv() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_PACKAGES], check=True)
    check = subprocess.run([str(python), "-c", "import trl; from trl.experimental.ppo import PPOTrainer; "
                            "print(trl.__version__)"], capture_output=True, text=True)
    if check.returncode != 0 or check.stdout.strip() != "1.12.0":
        raise SystemExit(f"{VENV} does not hold a working trl 1.12.0: {check.stderr[-500:]}")
    return python


def run_worker(cmd: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"worker failed ({' '.join(cmd[:3])}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT"):])


def prepare(work: Path) -> tuple[Path, Path]:
    """The built-in task and a merged reward model trained on its noisy pairs (both reused when present)."""
    from rlhf_lm.builtin_task.task import TaskConfig, build_task
    from rlhf_lm.stages import reward as reward_stage

    task, rm = work / "task", work / "reward"
    if not (task / "base_policy").is_dir():
        build_task(task, TaskConfig(seed=0))
    if not (rm / "metrics.json").is_file():  # the builtin reward recipe, merged so TRL loads a plain classifier
        from rlhf_lm.configs import parse_config

        reward_stage.run(parse_config(reward_stage.CONFIG, [
            "--config", str(ROOT / "recipes" / "builtin" / "reward.yaml"),
            "--model_name_or_path", str(task / "base_policy"), "--dataset_name", str(task / "data"),
            "--output_dir", str(rm), "--merge_adapter", "true", "--use_cpu", "true"]))
    return task, rm


def evaluate(task: Path, rm: Path, adapter: Path) -> dict[str, float]:
    from peft import PeftModel

    from rlhf_lm.evaluation import evaluate_policy
    from rlhf_lm.modeling import load_causal_lm, load_tokenizer
    from rlhf_lm.rewards import load_reward

    tokenizer = load_tokenizer(str(task / "base_policy"), padding_side="left")
    policy = PeftModel.from_pretrained(load_causal_lm(str(task / "base_policy"), dtype="float32"), str(adapter))
    prompts = [json.loads(line)["prompt"] for line in open(task / "data" / "prompts_eval.jsonl")]
    return evaluate_policy(policy, tokenizer, prompts, load_reward(str(rm)), gold=True, seed=0,
                           max_new_tokens=COMMON["max_new_tokens"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default=str(ROOT / "runs" / "bench_ppo"))
    parser.add_argument("--steps", type=int, default=60, help="PPO iterations (x rollout_batch_size episodes).")
    parser.add_argument("--seeds", default="0,1,2",
                        help="Comma-separated training seeds; each runs ours then theirs. Quality is compared on the "
                             "mean over seeds: one seed's gold reward varies by about +-0.1, more than the gap.")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "ppo_vs_trl112.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return ours_worker(json.loads(args.worker))

    import torch

    torch.set_num_threads(1)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    trl_python = ensure_trl112_venv()
    task, rm = prepare(work)
    worker_file = work / "trl112_worker.py"
    worker_file.write_text(TRL_WORKER)
    seeds = [int(x) for x in args.seeds.split(",")]
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    evals: dict[str, list[dict]] = {"ours": [], "trl": []}
    for seed in seeds:
        for side in ("ours", "trl"):
            out = work / f"{side}_seed{seed}"
            spec = {"policy": str(task / "base_policy"), "reward": str(rm), "steps": args.steps,
                    "prompts": str(task / "data" / "prompts_train.jsonl"), "common": {**COMMON, "seed": seed},
                    "extra": OURS_EXTRA if side == "ours" else TRL_EXTRA, "output_dir": str(out)}
            cmd = ([sys.executable, __file__, "--worker", json.dumps(spec)] if side == "ours"
                   else [str(trl_python), str(worker_file), json.dumps(spec)])
            result = run_worker(cmd)
            runs[side].append(result)
            evals[side].append(evaluate(task, rm, out / "adapter"))
            print(side, seed, result, flush=True)

    def mean(side: str, key: str) -> float:
        return statistics.mean(e[key] for e in evals[side])

    wall = {s: statistics.median([r["wall_s"] for r in runs[s]]) for s in runs}
    cpu = {s: statistics.median([r["cpu_s"] for r in runs[s]]) for s in runs}
    mem = {s: max(r["peak_rss_mb"] for r in runs[s]) for s in runs}
    result = {
        "gold_reward_ours": mean("ours", "eval/gold_reward/policy"),
        "gold_reward_trl": mean("trl", "eval/gold_reward/policy"),
        "gold_reward_reference": evals["ours"][0]["eval/gold_reward/reference"],
        "gold_reward_per_seed": {s: [e["eval/gold_reward/policy"] for e in evals[s]] for s in evals},
        "gold_win_rate_ours": mean("ours", "eval/gold_win_rate"),
        "gold_win_rate_trl": mean("trl", "eval/gold_win_rate"),
        "kl_ours": mean("ours", "eval/kl"),
        "kl_trl": mean("trl", "eval/kl"),
        "kl_per_seed": {s: [e["eval/kl"] for e in evals[s]] for s in evals},
        "reward_model_score_ours": mean("ours", "eval/reward/policy"),
        "reward_model_score_trl": mean("trl", "eval/reward/policy"),
        "wall_s_ours": wall["ours"], "wall_s_trl": wall["trl"], "wall_ratio": wall["ours"] / wall["trl"],
        "wall_ratio_per_pair": [a["wall_s"] / b["wall_s"] for a, b in zip(runs["ours"], runs["trl"])],
        # CPU seconds of the training process (one thread each): robust to other jobs sharing the machine
        "cpu_s_ours": cpu["ours"], "cpu_s_trl": cpu["trl"], "cpu_ratio": cpu["ours"] / cpu["trl"],
        "model_and_optimizer_mb_ours": runs["ours"][0]["model_and_optimizer_mb"],
        "model_and_optimizer_mb_trl": runs["trl"][0]["model_and_optimizer_mb"],
        "peak_rss_mb_ours": mem["ours"], "peak_rss_mb_trl": mem["trl"], "peak_mem_ratio": mem["ours"] / mem["trl"],
        "runs": runs, "evals": evals,
        "settings": {"steps": args.steps, "episodes": args.steps * COMMON["rollout_batch_size"], "common": COMMON,
                     "ours_extra": OURS_EXTRA, "trl_extra": TRL_EXTRA, "seeds": seeds},
        "conditions": f"CPU, {os.cpu_count()} cores shared with other jobs, OMP_NUM_THREADS=1, torch "
                      f"{torch.__version__}; timings alternate ours/theirs in fresh subprocesses",
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
