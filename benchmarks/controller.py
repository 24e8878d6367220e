"""Does one controlled run get as close to the best learning rate as a grid search? (CPU, ~10 min on 2 cores)

DPO with LoRA on the built-in gold-reward task, started from learning rates spanning 1e-5 ... 3e-2. Compared on
the same evaluation seed(s), in one process, runs interleaved per starting LR (so machine load hits all alike):

* grid      - constant LR, 8 points: the best point is the reference every ratio divides by (an oracle: it is
              chosen on the very test loss it is scored with), and the median shows the cost of a blind guess;
* cosine    - cosine decay from each starting LR;
* pbt       - Population Based Training, population 8 (one member per starting LR), Ray Tune's defaults: every
              `ready` steps the bottom quantile 0.25 copies a top-quantile member (adapter + optimizer + schedule)
              and explores: LR x0.8 / x1.2, or resampled log-uniformly with probability 0.25. Written here on
              in-process trainers because Ray is not installed (no network) and 8 tiny in-process members are
              far cheaper than Ray actors; compute 8x;
* rules     - reduce-on-plateau on the validation objective;
* online    - probe-and-commit (<= 1.5x compute);
* learned   - the shipped learned policy (1.0x compute).

The held-out pairs are split: the controllers and PBT see only the validation part; every number here is the DPO
loss on the test part (and, per method, gold reward - beta * KL of samples on held-out prompts). Evaluation seeds
(LoRA init, data order) are disjoint from the seeds the controllers were tuned and trained on.

    python benchmarks/controller.py                # writes benchmarks/results/controller.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

import datasets  # noqa: E402
import transformers  # noqa: E402

if __package__ in (None, ""):  # run as a file: make `benchmarks.controller_harness` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.controller_harness import DpoTask, SteppedRun  # noqa: E402
from rlhf_lm.builtin_task.task import TaskConfig, build_task  # noqa: E402
from rlhf_lm.controller import build_callback  # noqa: E402
from rlhf_lm.controller.handle import TrainerHandle  # noqa: E402

LRS = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
ONLINE = {"policy": "online", "interval": 8, "candidates": [0.1, 1.0, 10.0], "probe_steps": 3,
          "compute_budget": 1.5, "val_batch_size": 32}
RULES = {"policy": "rules", "interval": 8, "val_batch_size": 32}
LEARNED = {"policy": "learned", "interval": 8, "val_batch_size": 32}
TASK = TaskConfig(seed=3, num_pretrain_texts=1500, num_train_pairs=600, num_eval_pairs=320)


def quiet() -> None:
    transformers.logging.set_verbosity_error()
    datasets.utils.logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore")


def run_one(task: DpoTask, lr: float, seed: int, steps: int, beta: float, scheduler: str = "constant",
            controller: dict | None = None, gold: bool = True) -> dict:
    callback = build_callback(controller, stage="dpo") if controller else None
    start = time.perf_counter()
    trainer = task.trainer(lr, steps, seed=seed, beta=beta, lr_scheduler_type=scheduler,
                           callbacks=[callback] if callback else None, logging_steps=2)
    trainer.train()
    wall = time.perf_counter() - start
    out = {"lr": lr, "test_loss": task.test_loss(trainer), "wall_s": wall, "crashed": False}
    if not math.isfinite(out["test_loss"]):
        out["crashed"] = True
    if callback is not None:
        out.update(lr_multiplier=callback.lr_multiplier, rollbacks=callback.rollbacks, probes=callback.probes,
                   compute_steps=(steps + (callback.planner.spent if callback.planner else 0.0)) / steps,
                   final_lr=lr * callback.lr_multiplier)
    if gold:
        out.update(task.gold_objective(trainer, num_prompts=32, seed=seed))
    return out


def run_pbt(task: DpoTask, seed: int, steps: int, beta: float, ready: int, quantile: float = 0.25,
            resample_probability: float = 0.25, gold: bool = True) -> dict:
    """PBT (Jaderberg et al. 2017) with Ray Tune's default exploit / explore, members stepped in lockstep."""
    rng = random.Random(seed)
    start = time.perf_counter()
    members = [SteppedRun(task.trainer(lr, steps, seed=seed, beta=beta)) for lr in LRS]
    lrs = list(LRS)
    events = []
    for round_end in range(ready, steps + 1, ready):
        for m in members:
            while m.steps < round_end:
                m.step()
        if round_end == steps:
            break
        scores = [m.val_loss() for m in members]
        order = sorted(range(len(members)), key=lambda i: scores[i] if math.isfinite(scores[i]) else math.inf)
        n = max(1, int(len(members) * quantile))
        top, bottom = order[:n], order[-n:]
        for loser in bottom:
            winner = rng.choice(top)
            src, dst = TrainerHandle(members[winner].trainer), TrainerHandle(members[loser].trainer)
            dst.restore(src.snapshot())  # the winner's weights, optimizer moments and schedule
            if rng.random() < resample_probability:
                new_lr = math.exp(rng.uniform(math.log(LRS[0]), math.log(LRS[-1])))
            else:
                new_lr = lrs[winner] * rng.choice([0.8, 1.2])
            dst.set_learning_rate(new_lr / lrs[winner], lasting=True)
            lrs[loser] = new_lr
            events.append({"step": round_end, "from": winner, "to": loser, "lr": new_lr})
    final = [m.val_loss() for m in members]
    best = min(range(len(members)), key=lambda i: final[i] if math.isfinite(final[i]) else math.inf)
    wall = time.perf_counter() - start
    out = {"test_loss": task.test_loss(members[best].trainer), "best_member_lr": lrs[best], "wall_s": wall,
           "events": events, "crashed": not math.isfinite(final[best])}
    if gold:
        out.update(task.gold_objective(members[best].trainer, num_prompts=32, seed=seed))
    return out


def summarise(runs: list[dict], best: float) -> dict:
    ratios = [r["test_loss"] / best if math.isfinite(r["test_loss"]) else math.inf for r in runs]
    out = {"mean_ratio": statistics.fmean(ratios), "worst_ratio": max(ratios),
           "test_loss_mean": statistics.fmean(r["test_loss"] for r in runs)}
    if "gold_objective" in runs[0]:
        out["gold_objective"] = statistics.fmean(r["gold_objective"] for r in runs)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="evaluation seeds (tuning used 0)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--methods", nargs="+", default=["grid", "cosine", "rules", "online", "learned", "pbt"])
    parser.add_argument("--lrs", type=float, nargs="+", default=LRS)
    parser.add_argument("--task_dir", default=None, help="reuse a built task (default: build one in a temp dir)")
    parser.add_argument("--no_gold", action="store_true")
    parser.add_argument("--online", default=None, help="JSON overrides of the online controller's settings")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "controller.json"))
    args = parser.parse_args(argv)
    quiet()
    t0 = time.perf_counter()
    task_dir = args.task_dir or build_task(Path(tempfile.mkdtemp(prefix="ctl-bench-")) / "task", TASK,
                                           pretrain_epochs=2)
    task = DpoTask(task_dir)
    if args.online:
        ONLINE.update(json.loads(args.online))
    controllers = {"rules": RULES, "online": ONLINE, "learned": LEARNED}
    per_seed = {}
    for seed in args.seeds:
        runs: dict[str, list[dict]] = {m: [] for m in args.methods if m != "pbt"}
        interleaved = [m for m in runs if m != "learned"]
        for lr in args.lrs:  # interleaved: every method from this LR before the next LR
            for method in interleaved:
                runs[method].append(run_method(task, method, lr, seed, args, controllers))
        if "pbt" in args.methods:
            runs["pbt"] = [run_pbt(task, seed, args.steps, args.beta, ready=max(args.steps // 5, 1),
                                   gold=not args.no_gold)]
            print(f"seed {seed} pbt test {runs['pbt'][0]['test_loss']:.4f} wall {runs['pbt'][0]['wall_s']:.1f}s")
        for lr in args.lrs if "learned" in runs else []:  # last: its weights come from a separate script
            runs["learned"].append(run_method(task, "learned", lr, seed, args, controllers))
        per_seed[seed] = runs

    result = summarise_all(per_seed, args)
    result["wall_s_total"] = time.perf_counter() - t0
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2, default=float))
    return 0


def run_method(task: DpoTask, method: str, lr: float, seed: int, args, controllers: dict) -> dict:
    kw = dict(seed=seed, steps=args.steps, beta=args.beta, gold=not args.no_gold)
    if method == "cosine":
        kw["scheduler"] = "cosine"
    elif method in controllers:
        kw["controller"] = controllers[method]
    r = run_one(task, lr, **kw)
    print(f"seed {seed} lr {lr:g} {method:8s} test {r['test_loss']:.4f} wall {r['wall_s']:.1f}s "
          f"x{r.get('lr_multiplier', 1.0):.3g}", flush=True)
    return r


def summarise_all(per_seed: dict, args) -> dict:
    methods: dict[str, dict] = {}
    headline: dict[str, float] = {}
    crashes = 0
    for seed, runs in per_seed.items():
        grid = runs.get("grid")
        best = min(r["test_loss"] for r in grid) if grid else math.nan
        for method, rs in runs.items():
            s = summarise(rs, best)
            crashes += sum(r["crashed"] for r in rs)
            if method == "grid":
                s["best_test_loss"] = best
                s["best_lr"] = min(rs, key=lambda r: r["test_loss"])["lr"]
                s["median_ratio"] = statistics.median(r["test_loss"] for r in rs) / best
                s["start_loss_ratio"] = math.log(2) / best
            wall_grid = statistics.fmean(r["wall_s"] for r in grid) if grid else math.nan
            if method == "pbt":
                s["compute"] = len(LRS)
                s["wall_vs_one_run"] = rs[0]["wall_s"] / wall_grid
            else:
                s["wall_vs_one_run"] = statistics.fmean(r["wall_s"] for r in rs) / wall_grid
                if "compute_steps" in rs[0]:
                    s["compute"] = statistics.fmean(r["compute_steps"] for r in rs)
            methods.setdefault(method, {})[str(seed)] = s
    for method, by_seed in methods.items():
        for key in ("mean_ratio", "worst_ratio", "compute", "wall_vs_one_run", "gold_objective", "median_ratio"):
            values = [s[key] for s in by_seed.values() if key in s]
            if values:
                agg = max(values) if key == "worst_ratio" else statistics.fmean(values)
                headline[f"{method}_{key}"] = agg
    result = {
        "online_mean_ratio": headline.get("online_mean_ratio"),
        "online_worst_ratio": headline.get("online_worst_ratio"),
        "online_compute": headline.get("online_compute"),
        "online_wall_vs_one_run": headline.get("online_wall_vs_one_run"),
        "learned_mean_ratio": headline.get("learned_mean_ratio"),
        "learned_worst_ratio": headline.get("learned_worst_ratio"),
        "pbt_mean_ratio": headline.get("pbt_mean_ratio"),
        "grid_median_ratio": headline.get("grid_median_ratio"),
        "cosine_mean_ratio": headline.get("cosine_mean_ratio"),
        "rules_mean_ratio": headline.get("rules_mean_ratio"),
        "gold_objective": {m: headline[f"{m}_gold_objective"] for m in methods if f"{m}_gold_objective" in headline},
        "crashes": crashes,
        "conditions": {"steps": args.steps, "beta": args.beta, "seeds": args.seeds, "lrs": args.lrs,
                       "task": TASK.__dict__, "online": ONLINE, "rules": RULES, "learned": LEARNED,
                       "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                       "note": "wall times on a 2-core machine shared with other jobs"},
        "methods": methods,
        "runs": {str(seed): runs for seed, runs in per_seed.items()},
    }
    return result


if __name__ == "__main__":
    sys.exit(main())
