"""How the real-model reward stage's lead over its length baseline grows with training pairs.

`real_model.py --size cpu` trains its LoRA reward model (SmolLM2-135M-Instruct) on 256 HH-RLHF pairs, and on 2 of its
5 seeds that model ranks held-out pairs little better than "shorter wins". This runs the same reward stage, with the
same settings (`real_model.stage_settings`), on the first N training pairs, seed by seed, judged on either

  validation  train rows 1200-1499: pairs no stage of real_model.py trains on, and not the held-out ones, so a choice
              of N made here is not a choice fitted to the yardstick;
  held_out    the last 300 pairs, real_model.py's own held-out split.

    python -m benchmarks.reward_pairs --split validation --pairs 256 512 --seeds 0 1 2 3 4 --jobs 2

Each (split, pairs, seed) runs in its own process; ``--jobs 2`` runs two at a time (2 cores: about 6 minutes a run
at 256 pairs, 10.5 at 512). Writes ``benchmarks/results/reward_pairs.json``, keeping the entries of earlier calls.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.real_model import HELD_OUT, HH_PAIRS, ROOT, SIZES, hh_pairs, machine, write_train_test

RESULTS = ROOT / "benchmarks" / "results" / "reward_pairs.json"
VALIDATION = slice(1200, 1500)  # of the rows before the held-out ones; DPO's cpu size trains on the first 512


def write_split(data: Path, pairs: int, split: str) -> None:
    rows = hh_pairs()
    train = rows[:-HELD_OUT]
    if VALIDATION.stop > len(train):
        raise SystemExit(f"{HH_PAIRS} has {len(rows)} rows: the validation split needs {VALIDATION.stop + HELD_OUT}")
    if pairs > VALIDATION.start:
        raise SystemExit(f"--pairs {pairs}: at most {VALIDATION.start}, or training would reach the validation rows")
    write_train_test(data, train[:pairs], train[VALIDATION] if split == "validation" else rows[-HELD_OUT:])


def run_one(split: str, pairs: int, seed: int, workdir: Path) -> dict:
    """One reward stage in this process, real_model.py's cpu-size settings but for the pairs and the test split."""
    import torch

    from benchmarks.real_model import run_stage, stage_settings
    from rlhf_lm.real_checkpoint import smollm2_135m_instruct

    torch.set_num_threads(1)
    write_split(workdir / "data", pairs, split)
    settings = stage_settings(workdir, workdir / "data", str(smollm2_135m_instruct()), SIZES["cpu"], seed=seed)
    start = time.perf_counter()
    metrics = run_stage("reward", settings["reward"])
    longer = metrics["reward/length_baseline_accuracy"]
    return {"accuracy": metrics["reward/accuracy"], "longer_wins": longer, "shorter_wins": 1.0 - longer,
            "over_length_baseline": metrics["reward/accuracy"] - max(longer, 1.0 - longer),
            "train_loss": metrics["train/loss"], "seconds": time.perf_counter() - start}


def run_in_child(split: str, pairs: int, seed: int) -> dict:
    """A fresh process per run: one run's memory or threads never carry into the next."""
    with tempfile.TemporaryDirectory(prefix="reward_pairs_") as workdir:
        code = ("import json, sys; from pathlib import Path; from benchmarks.reward_pairs import run_one; "
                "print('RESULT' + json.dumps(run_one(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))))")
        done = subprocess.run([sys.executable, "-c", code, split, str(pairs), str(seed), workdir], cwd=ROOT,
                              capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    if done.returncode or not lines:
        raise SystemExit(f"{split} pairs={pairs} seed={seed} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT"):])


def summarize(per_seed: dict) -> dict:
    from benchmarks.quality import aggregate

    metrics = {"over_length_baseline": True, "accuracy": True, "train_loss": False, "seconds": False}
    return aggregate({int(seed): values for seed, values in per_seed.items()}, metrics)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=("validation", "held_out"), default="validation")
    parser.add_argument("--pairs", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=1, help="Runs at a time (each needs about 7 GB of memory).")
    args = parser.parse_args(argv)
    if not HH_PAIRS.is_file():
        raise SystemExit(f"needs the shared HH-RLHF pairs at {HH_PAIRS}")
    runs = [(pairs, seed) for pairs in args.pairs for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda run: run_in_child(args.split, *run), runs))
    report = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"benchmark": "reward_pairs", "entries": {}}
    for (pairs, seed), result in zip(runs, results, strict=True):
        entry = report["entries"].setdefault(f"{args.split}/{pairs}", {"per_seed": {}})
        entry["per_seed"][str(seed)] = {**result, "jobs_at_once": args.jobs}
    for name, entry in report["entries"].items():
        entry["stats"] = summarize(entry["per_seed"])
        stat = entry["stats"]["over_length_baseline"]
        print(f"{name:<16} over length baseline {stat['mean']:+.3f} +- {stat['std']:.3f}  worst {stat['worst']:+.3f}"
              f"  (n={stat['n']})")
    report["machine"] = machine()
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[reward_pairs] wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
