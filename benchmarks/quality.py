"""The yardstick: the quickstart pipeline over several seeds, reported per seed and as mean +- std and worst seed.

The seed changes the built-in task (its data and pre-trained base policy) as well as every training run, so the
spread over seeds is the spread a user sees on another machine too. Each seed runs as its own process, exactly as
``rlhf-lm quickstart --seed N`` does, one after the other (timings are not comparable across parallel runs).

    python -m benchmarks.quality                      # seeds 0-4 (~10 minutes on 2 CPU cores)
    python -m benchmarks.quality --seeds 0,1 --workdir /tmp/q

Writes ``benchmarks/results/quality.json``: per seed the reward model's gold accuracy, DPO's and PPO's gold win-rate,
gold gain and KL (nats per token), the largest ``objective/kl`` of any PPO iteration (nats per sequence) and wall
time; then mean, std and worst over the seeds, the targets, the CPU model and the library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "quality.json"
# metric -> True when higher is better (decides which seed is the worst)
METRICS = {
    "reward_model/gold_accuracy": True,
    "reward_model/accuracy": True,
    "dpo/gold_win_rate": True,
    "ppo/gold_win_rate": True,
    "gold_gain/dpo": True,
    "gold_gain/ppo": True,
    "kl/dpo": False,
    "kl/ppo": False,
    "ppo/max_iteration_kl": False,
    "seconds": False,
}
TARGETS = {  # issue #13, 2-core CPU, seeds 0-4
    "worst reward_model/gold_accuracy >= 0.78": ("worst", "reward_model/gold_accuracy", 0.78, True),
    "worst dpo/gold_win_rate >= 0.70": ("worst", "dpo/gold_win_rate", 0.70, True),
    "worst ppo/gold_win_rate >= 0.70": ("worst", "ppo/gold_win_rate", 0.70, True),
    "mean dpo/gold_win_rate >= 0.80": ("mean", "dpo/gold_win_rate", 0.80, True),
    "mean ppo/gold_win_rate >= 0.80": ("mean", "ppo/gold_win_rate", 0.80, True),
    "worst ppo/max_iteration_kl <= 5 nats": ("worst", "ppo/max_iteration_kl", 5.0, False),
    "worst seconds <= 180": ("worst", "seconds", 180.0, False),
}


def run_seed(seed: int, workdir: Path) -> dict:
    """One quickstart run in a fresh process; its summary plus the largest PPO iteration KL."""
    out = workdir / f"seed{seed}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "rlhf_lm", "quickstart", "--output_dir", str(out), "--seed", str(seed), "--force"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"seed {seed} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["process_seconds"] = round(time.perf_counter() - start, 1)
    history = json.loads((out / "ppo" / "metrics.json").read_text())["log_history"]
    summary["ppo/max_iteration_kl"] = max(h["objective/kl"] for h in history if "objective/kl" in h)
    return summary


def aggregate(per_seed: dict[int, dict], metrics: dict[str, bool] = METRICS) -> dict:
    """mean, std (sample, n-1) and worst seed's value of each metric (metric -> higher is better)."""
    out = {}
    for metric, higher_is_better in metrics.items():
        values = [s[metric] for s in per_seed.values() if metric in s]
        if not values:
            continue
        out[metric] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                       "worst": min(values) if higher_is_better else max(values), "n": len(values)}
    return out


def check_targets(stats: dict) -> dict[str, dict]:
    checked = {}
    for name, (kind, metric, bound, at_least) in TARGETS.items():
        value = stats.get(metric, {}).get(kind)
        met = None if value is None else (value >= bound if at_least else value <= bound)
        checked[name] = {"measured": value, "met": met}
    return checked


def machine() -> dict:
    import importlib.metadata as md

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")]
        cpu = models[0] if models else cpu
    versions = {name: md.version(name) for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets")}
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), **versions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="Comma-separated seeds (default 0-4).")
    parser.add_argument("--workdir", default="/tmp/rlhf_lm_quality", help="Where the runs go.")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    per_seed = {}
    for seed in seeds:
        per_seed[seed] = run_seed(seed, Path(args.workdir))
        print(f"[quality] seed {seed}: " + ", ".join(f"{k}={per_seed[seed][k]:.3f}" for k in METRICS
                                                      if k in per_seed[seed]), flush=True)
    stats = aggregate(per_seed)
    report = {"benchmark": "quality", "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), "seeds": seeds, "per_seed": per_seed, "stats": stats,
              "targets": check_targets(stats), "total_seconds": round(time.perf_counter() - start, 1)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    for metric, s in stats.items():
        print(f"{metric:<30} {s['mean']:8.3f} +- {s['std']:.3f}  worst {s['worst']:.3f}")
    print(f"[quality] wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
