"""Our DPO stage vs plain TRL DPOTrainer: preprocessing throughput and train-step time, in one process, alternating.

    OMP_NUM_THREADS=1 python benchmarks/dpo_vs_trl.py [--task_dir DIR] [--rounds 5] [--steps 20]

Both sides get the same tiny model (the built-in task's base policy), the same normalised preference pairs, the same
LoRA config and the same seed. Each round runs A then B (then B then A on the next round, so drift in machine load
hits both equally), and the medians are compared:

* ``preprocess_speedup``: pairs/s of our preprocessing (``rlhf_lm.preference_pairs.prepare_pairs``: batched tokenization
  plus the counted length limit) over pairs/s of TRL's ``DPOTrainer._prepare_dataset`` (EOS pass, per-row
  tokenization, length filter), each on a fresh in-memory copy of the data, our token cache off: a cold first run.
  ``preprocess_speedup_cached_rerun`` is the same for a rerun on the same data with the cache on (our default).
* ``step_time_ratio``: median train-step CPU time of the trainer our stage builds (``build_trainer``) over that of
  plain ``trl.DPOTrainer`` given the same arguments (``step_time_ratio_wall``: the same in wall time, which other
  jobs on a shared machine disturb far more). ``step_time_ratio_vs_trl_defaults`` compares against TRL with
  its own defaults instead (DPOConfig turns gradient checkpointing on; our stage turns it off for models that fit).

Writes ``benchmarks/results/dpo_vs_trl.json``. Timings on a shared CPU are noisy: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "dpo_vs_trl.json"


class StepTimer(TrainerCallback):
    """Wall and CPU time of each optimizer step (data, forward, backward, optimizer) as the Trainer sees it.

    CPU time (``time.process_time``) counts only this process's own work, so it is far less disturbed than wall
    time by other jobs on a shared machine; with one torch thread the two agree on an idle one.
    """

    def __init__(self):
        self.times: list[tuple[float, float]] = []
        self._start = (0.0, 0.0)

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append((time.perf_counter() - self._start[0], time.process_time() - self._start[1]))


def stage_config(task_dir: Path, out: str, steps: int, batch_size: int, max_length: int):
    from rlhf_lm.configs import config_from_dict
    from rlhf_lm.stages.dpo import DPOStageConfig

    return config_from_dict(DPOStageConfig, dict(
        model_name_or_path=str(task_dir / "base_policy"), dataset_name=str(task_dir / "data" / "pairs_train.jsonl"),
        eval_fraction=0.0, output_dir=out, use_cpu=True, max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=5e-3, max_length=max_length, save_strategy="no", logging_steps=10_000, disable_tqdm=True,
        eval_prompts=None, seed=0, dataset_num_proc=None, cache_tokenized=False,
        # Identical batches on both sides, so the step times compare our trainer's overhead alone. What length-grouped
        # batches (the stage default) save is measured apart, in benchmarks/cpu_defaults.py.
        train_sampling_strategy="random",
    ), "the benchmark")


def trl_args(cfg, **overrides):
    """TRL's own DPOConfig with the training fields of our stage config (or TRL's defaults where overridden)."""
    import dataclasses

    import trl

    names = {f.name for f in dataclasses.fields(trl.DPOConfig) if f.init}
    values = {k: v for k, v in vars(cfg).items() if k in names}
    values.update(overrides)
    return trl.DPOConfig(**values)


def time_preprocessing(cfg, pairs, tokenizer, rounds: int) -> dict[str, float]:
    import trl
    from datasets import Dataset

    from rlhf_lm.data import DataReport
    from rlhf_lm.preference_pairs import prepare_pairs

    rows = pairs.to_list()
    args = trl_args(cfg)
    # _prepare_dataset only reads the tokenizer from the trainer, so a bare instance of TRL's class is enough.
    plain = trl.DPOTrainer.__new__(trl.DPOTrainer)
    plain._tokenizer = tokenizer

    def ours(cache_dir=None):
        prepare_pairs(Dataset.from_list(rows), tokenizer, cfg, DataReport("bench", rows_in=len(rows)), "train",
                      cache_dir)

    def theirs():
        plain._prepare_dataset(Dataset.from_list(rows), tokenizer, args, "train")

    timings = {"ours": [], "trl": []}
    for r in range(rounds):
        for name, fn in (("ours", ours), ("trl", theirs)) if r % 2 == 0 else (("trl", theirs), ("ours", ours)):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    # A rerun on the same data with the token cache on (the stage's default): reads the cached result back.
    with tempfile.TemporaryDirectory() as cache_dir:
        ours(cache_dir)  # fills the cache
        for _ in range(rounds):
            start = time.perf_counter()
            ours(cache_dir)
            timings.setdefault("ours_cached", []).append(time.perf_counter() - start)
    n = len(rows)
    ours_s, trl_s = statistics.median(timings["ours"]), statistics.median(timings["trl"])
    cached_s = statistics.median(timings["ours_cached"])
    return {"num_pairs": n, "ours_pairs_per_s": n / ours_s, "trl_pairs_per_s": n / trl_s,
            "preprocess_speedup": trl_s / ours_s, "preprocess_speedup_cached_rerun": trl_s / cached_s,
            "ours_s": timings["ours"], "trl_s": timings["trl"], "ours_cached_s": timings["ours_cached"]}


def time_training(cfg, task_dir: Path, pairs, tokenizer, rounds: int, warmup: int) -> dict[str, float]:
    import trl

    from rlhf_lm.modeling import load_causal_lm, lora_config_from_args
    from rlhf_lm.stages.dpo import build_trainer

    def ours():
        timer = StepTimer()
        trainer, _, _ = build_trainer(cfg, callbacks=[timer])
        trainer.train()
        return timer.times[warmup:]

    def plain(**overrides):
        def fn():
            timer = StepTimer()
            model = load_causal_lm(str(task_dir / "base_policy"), dtype=cfg.dtype)
            trainer = trl.DPOTrainer(model=model, args=trl_args(cfg, **overrides), train_dataset=pairs,
                                     processing_class=tokenizer, peft_config=lora_config_from_args(cfg),
                                     callbacks=[timer])
            trainer.train()
            return timer.times[warmup:]
        return fn

    # DPOConfig's default, which our stage config turns off (transformers 5 spells it both ways; set both)
    trl_defaults = {"gradient_checkpointing": True, "activation_checkpointing": True}
    runs = {"ours": ours, "trl_same_args": plain(), "trl_defaults": plain(**trl_defaults)}
    steps = {name: [] for name in runs}
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            steps[name] += runs[name]()
    wall = {name: statistics.median(t[0] for t in v) for name, v in steps.items()}
    cpu = {name: statistics.median(t[1] for t in v) for name, v in steps.items()}
    return {"step_time_ratio": cpu["ours"] / cpu["trl_same_args"],
            "step_time_ratio_vs_trl_defaults": cpu["ours"] / cpu["trl_defaults"],
            "step_time_ratio_wall": wall["ours"] / wall["trl_same_args"],
            "step_time_ratio_wall_vs_trl_defaults": wall["ours"] / wall["trl_defaults"],
            "cpu_step_s": cpu, "wall_step_s": wall, "steps_timed_per_side": len(steps["ours"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task_dir", help="An existing `rlhf-lm task` dir (default: build the default task).")
    parser.add_argument("--rounds", type=int, default=5, help="Alternating A/B rounds.")
    parser.add_argument("--steps", type=int, default=20, help="Train steps per run.")
    parser.add_argument("--warmup", type=int, default=3, help="Steps per run not timed.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--output", default=str(RESULT))
    a = parser.parse_args()
    torch.set_num_threads(1)

    from rlhf_lm.builtin_task.task import TaskConfig, build_task
    from rlhf_lm.data import load_preference_data
    from rlhf_lm.modeling import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        task_dir = Path(a.task_dir) if a.task_dir else build_task(Path(tmp) / "task", TaskConfig(seed=0))
        cfg = stage_config(task_dir, str(Path(tmp) / "out"), a.steps, a.batch_size, a.max_length)
        pairs, _, _ = load_preference_data(cfg, seed=0)
        tokenizer = load_tokenizer(cfg.model_name_or_path)
        pre = time_preprocessing(cfg, pairs, tokenizer, a.rounds)
        print(f"preprocess: ours {pre['ours_pairs_per_s']:.0f} pairs/s, TRL {pre['trl_pairs_per_s']:.0f} pairs/s, "
              f"speedup {pre['preprocess_speedup']:.2f}x cold, {pre['preprocess_speedup_cached_rerun']:.1f}x on a "
              "cached rerun", flush=True)
        train = time_training(cfg, task_dir, pairs, tokenizer, a.rounds, a.warmup)
        cpu = train["cpu_step_s"]
        print(f"train step (CPU time): ours {cpu['ours'] * 1e3:.1f} ms, TRL same args {cpu['trl_same_args'] * 1e3:.1f} "
              f"ms (ratio {train['step_time_ratio']:.3f}), TRL defaults {cpu['trl_defaults'] * 1e3:.1f} ms (ratio "
              f"{train['step_time_ratio_vs_trl_defaults']:.3f}); wall-time ratio {train['step_time_ratio_wall']:.3f}",
              flush=True)

    import transformers
    import trl

    result = {
        "preprocess_speedup": pre["preprocess_speedup"], "step_time_ratio": train["step_time_ratio"],
        "targets": {"preprocess_speedup": ">= 3", "step_time_ratio": "<= 1.03"},
        "preprocess": pre, "train": train,
        "setup": {"rounds": a.rounds, "steps_per_run": a.steps, "warmup_steps": a.warmup, "batch_size": a.batch_size,
                  "max_length": a.max_length, "model": "built-in task base policy (tiny Llama)",
                  "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
                  "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                  "note": "shared CPU; medians of alternating A/B runs"},
    }
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
