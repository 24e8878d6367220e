"""What two stage defaults are worth, measured without a GPU: length-grouped batches (DPO and reward stages) and
precomputed reference log-probs (DPO, when training passes over the data more than once).

    OMP_NUM_THREADS=1 python -m benchmarks.cpu_defaults [--pairs 1024] [--rounds 2] [--task_dir DIR]

Each variant is our stage (``build_trainer`` / the reward stage's trainer) with one default switched off, run in one
process, variants alternating within a round (reversed on the next) so machine load hits them all alike:

* DPO, 2 epochs: ``random`` (random batches, reference forward at every step: what TRL does by default),
  ``grouped`` (length-grouped batches, reference every step), ``default`` (grouped + reference log-probs computed
  once before training: the stage as it ships for 2 epochs).
* Reward model, 1 epoch: ``random`` vs ``default`` (grouped).

Data: the real HH-RLHF harmless pairs (``../shared/data``, lengths as people wrote them; a byte-level BPE trained on
the pairs stands in for a model tokenizer, and a random-init tiny Llama for the model) and the built-in task (short
sentences of similar length, its pre-trained tiny base policy). Reported per variant: seconds from building the
trainer (the precompute pass runs there) to the end of training, its CPU time, padded positions per real token in
the training batches, the final training loss and held-out implicit-reward accuracy (so a speed-up that hurt
learning would show). Writes ``benchmarks/results/cpu_defaults.json``.

On a GPU the same padding is thrown away, but step time does not scale with tokens as tightly as on 2 CPU cores:
``gpu_bench.py`` is where GPU numbers come from.
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
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "cpu_defaults.json"
HH_PAIRS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"

DPO_VARIANTS = {
    "random": {"train_sampling_strategy": "random", "precompute_ref_log_probs": False},
    "grouped": {"train_sampling_strategy": "group_by_length", "precompute_ref_log_probs": False},
    "default": {},
}
REWARD_VARIANTS = {"random": {"train_sampling_strategy": "random"}, "default": {}}


def padded_positions_per_token(trainer) -> float:
    """Batch positions computed per real token over one pass of the training dataloader (1.0 = no padding)."""
    real = positions = 0
    for batch in trainer.get_train_dataloader():
        mask = batch["attention_mask"] if "attention_mask" in batch else batch["chosen_attention_mask"]
        real += int(mask.sum())
        positions += mask.numel()
    return positions / real


def hh_dataset(workdir: Path, num_pairs: int) -> tuple[Path, Path]:
    """The first ``num_pairs`` raw HH-RLHF dialogues as a jsonl the stages read (format ``hh_rlhf``), and a tiny
    random-init Llama whose tokenizer is a BPE trained on them."""
    import gzip

    from rlhf_lm.modeling import build_tiny_model

    with gzip.open(HH_PAIRS, "rt") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(num_pairs))]
    data = workdir / "hh_pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    texts = (t for row in rows for t in (row["chosen"], row["rejected"]))
    model = build_tiny_model(workdir / "hh_model", texts, vocab_size=8000)  # 512 positions
    return data, model


def dpo_fields(model: Path, data: Path, out: Path, max_length: int, batch_size: int) -> dict:
    return dict(model_name_or_path=str(model), dataset_name=str(data), eval_fraction=0.1, output_dir=str(out),
                use_cpu=True, num_train_epochs=2, per_device_train_batch_size=batch_size,
                per_device_eval_batch_size=32, learning_rate=5e-3, max_length=max_length, save_strategy="no",
                logging_steps=10_000, disable_tqdm=True, eval_prompts=None, seed=0,
                cache_tokenized=False)  # every run pays for its own work (see main: no datasets cache either)


def run_dpo(fields: dict, changes: dict) -> dict:
    from rlhf_lm.configs import config_from_dict
    from rlhf_lm.evaluation import implicit_reward_metrics
    from rlhf_lm.stages.dpo import DPOStageConfig, build_trainer

    cfg = config_from_dict(DPOStageConfig, {**fields, **changes}, "the benchmark")
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    trainer, _, _ = build_trainer(cfg)
    result = trainer.train()
    seconds, cpu_seconds = time.perf_counter() - start_wall, time.process_time() - start_cpu
    metrics = implicit_reward_metrics(trainer.evaluate())
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "train_loss": result.training_loss,
            "eval_implicit_accuracy": metrics.get("eval/implicit_accuracy", float("nan")),
            "positions_per_token": padded_positions_per_token(trainer),
            "precomputed_reference": bool(cfg.precompute_ref_log_probs), "steps": trainer.state.global_step}


def run_reward(fields: dict, changes: dict) -> dict:
    """The reward stage's trainer on the stage's data, as ``rlhf_lm.stages.reward.run`` builds it (without the
    post-training scoring and saving, which the variants share)."""
    from rlhf_lm.configs import config_from_dict
    from rlhf_lm.data import load_preference_data
    from rlhf_lm.modeling import load_reward_tokenizer, load_sequence_classifier, lora_config_from_args
    from rlhf_lm.stages.reward import RewardStageConfig
    from rlhf_lm.trainers import RewardTrainer

    values = {**{k: v for k, v in fields.items() if k != "eval_prompts"}, "num_train_epochs": 1, **changes}
    values.pop("cache_tokenized")
    cfg = config_from_dict(RewardStageConfig, values, "the benchmark")
    train, eval_ds, _ = load_preference_data(cfg, seed=cfg.seed)
    tokenizer = load_reward_tokenizer(cfg)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(0)
    model = load_sequence_classifier(cfg.model_name_or_path, dtype=cfg.dtype)
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=train, eval_dataset=eval_ds,
                            processing_class=tokenizer, peft_config=lora_config_from_args(cfg, "SEQ_CLS", ["score"]))
    result = trainer.train()
    seconds, cpu_seconds = time.perf_counter() - start_wall, time.process_time() - start_cpu
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "train_loss": result.training_loss,
            "eval_accuracy": trainer.evaluate().get("eval_accuracy", float("nan")),
            "positions_per_token": padded_positions_per_token(trainer), "steps": trainer.state.global_step}


def alternate(variants: dict, run, fields: dict, rounds: int) -> dict:
    """Run every variant ``rounds`` times, alternating the order; median of each numeric field per variant."""
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(rounds):
        for name in variants if r % 2 == 0 else reversed(list(variants)):
            runs[name].append(run(fields, variants[name]))
            print(f"  {name}: {runs[name][-1]}", flush=True)
    return {name: {key: statistics.median(x[key] for x in rs) if not isinstance(rs[0][key], bool) else rs[0][key]
                   for key in rs[0]} for name, rs in runs.items()}


def speedups(by_variant: dict, pairs: list[tuple[str, str]]) -> dict:
    return {f"{slow}_over_{fast}": by_variant[slow]["seconds"] / by_variant[fast]["seconds"] for slow, fast in pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=1024, help="HH-RLHF pairs to use (of 1,800).")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds per variant.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--task_dir", help="An existing `rlhf-lm task` dir (default: build the default task).")
    parser.add_argument("--output", default=str(RESULT))
    a = parser.parse_args()
    torch.set_num_threads(1)
    import datasets

    # TRL caches precomputed reference log-probs by dataset and model fingerprint: a later run of the same variant
    # would read them back and skip the pass it is meant to pay for.
    datasets.disable_caching()

    from rlhf_lm.builtin_task.task import TaskConfig, build_task

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        datasets = {}
        if HH_PAIRS.is_file():
            data, model = hh_dataset(tmp, a.pairs)
            datasets["hh_rlhf"] = dpo_fields(model, data, tmp / "out", a.max_length, a.batch_size)
        else:
            print(f"HH-RLHF pairs not found at {HH_PAIRS}: measuring the built-in task only")
        task_dir = Path(a.task_dir) if a.task_dir else build_task(tmp / "task", TaskConfig(seed=0))
        datasets["builtin_task"] = dict(dpo_fields(task_dir / "base_policy", task_dir / "data" / "pairs_train.jsonl",
                                                   tmp / "out", 128, 32), learning_rate=1e-2)
        for name, fields in datasets.items():
            print(f"{name}: DPO", flush=True)
            dpo = alternate(DPO_VARIANTS, run_dpo, fields, a.rounds)
            print(f"{name}: reward model", flush=True)
            reward = alternate(REWARD_VARIANTS, run_reward, fields, a.rounds)
            results[name] = {
                "dpo": dpo, "reward": reward,
                "dpo_speedup": speedups(dpo, [("random", "grouped"), ("grouped", "default"), ("random", "default")]),
                "reward_speedup": speedups(reward, [("random", "default")]),
                "setup": {k: fields[k] for k in ("max_length", "per_device_train_batch_size", "learning_rate")},
            }
            print(json.dumps({k: results[name][k] for k in ("dpo_speedup", "reward_speedup")}), flush=True)

    import transformers
    import trl

    out = {"benchmark": "cpu_defaults", **results,
           "setup": {"rounds": a.rounds, "hh_pairs": a.pairs, "threads": torch.get_num_threads(),
                     "cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "trl": trl.__version__,
                     "note": "shared 2-core CPU; medians of alternating runs; read the ratios, not the seconds"}}
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
