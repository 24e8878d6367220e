"""Real use on a real checkpoint: SmolLM2-135M-Instruct on the shared HH-RLHF harmless pairs, as chat, through the
stages a user runs, with the last 300 pairs held out and never trained on.

  (a) a LoRA reward model, 1 epoch: held-out accuracy next to the "shorter wins" and "longer wins" baselines;
  (b) LoRA DPO from the instruct model: held-out implicit-reward accuracy, and its win-rate against the reference
      (the adapters off) judged by (a), with KL;
  (c) LoRA PPO on the HH prompts against (a): score and KL per iteration, then the same held-out judgement;
  (d) tokens/s and peak RSS of the reward and DPO stages, ours next to plain TRL at the same settings, each in a
      fresh process (peak RSS is per process), the two sides alternating.

    python -m benchmarks.real_model --size cpu      # fits about an hour on 2 CPU cores
    python -m benchmarks.real_model --size smoke    # every code path in a few minutes
    python -m benchmarks.real_model --size gpu      # all pairs, 1 epoch per stage (a GPU)

Writes ``benchmarks/results/real_model_<size>.json`` and ``docs/real_model_samples.md`` (a few held-out prompts
with the reference's, DPO's and PPO's answers).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH_PAIRS = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"
HELD_OUT = 300
STAGE_DIRS = ("reward", "dpo", "ppo")  # what one run writes into its workdir, one directory per stage


@dataclass(frozen=True)
class Size:
    train_pairs: int | None  # None = every pair before the held-out ones
    max_length: int
    batch: int
    eval_prompts: int
    max_new_tokens: int
    ppo_steps: int | None  # PPO iterations; None: one pass over the training prompts (1 epoch, as the other stages)
    rollout: int
    speed_steps: int  # optimizer steps timed in (d)
    bf16: bool | None = None  # None: the stages' default (on with a bf16 GPU)
    held_out_pairs: int = HELD_OUT  # of the held-out pairs, how many the reward and DPO stages score
    dpo_train_pairs: int | None = None  # DPO's own number of training pairs (None: train_pairs, as the other stages)


# bf16 autocast on the CPU sizes: on a CPU with AVX512-BF16 or AMX it runs the 135M model 2-4x faster than fp32
# (measured here), and plain TRL uses it by default on CPU too, so (d) compares at the same precision.
SIZES = {
    "smoke": Size(train_pairs=32, max_length=128, batch=4, eval_prompts=8, max_new_tokens=16, ppo_steps=2, rollout=8,
                  speed_steps=2, bf16=True, held_out_pairs=16),
    "cpu": Size(train_pairs=256, max_length=192, batch=8, eval_prompts=64, max_new_tokens=48, ppo_steps=12, rollout=16,
                speed_steps=4, bf16=True, dpo_train_pairs=512),
    "gpu": Size(train_pairs=None, max_length=512, batch=16, eval_prompts=300, max_new_tokens=128, ppo_steps=None,
                rollout=64, speed_steps=20),
}


def hh_pairs() -> list[dict]:
    """The shared HH-RLHF pairs, in file order (the last HELD_OUT are every stage's held-out split)."""
    return [json.loads(line) for line in gzip.open(HH_PAIRS, "rt")]


def write_train_test(data: Path, train: list[dict], test: list[dict]) -> Path:
    """train.jsonl / test.jsonl in the raw HH format, as the stages read them."""
    data.mkdir(parents=True, exist_ok=True)
    for split_name, split in (("train", train), ("test", test)):
        (data / f"{split_name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split))
    return data


def write_splits(workdir: Path, train_pairs: int | None, name: str = "data") -> Path:
    """The first `train_pairs` training pairs (all where None) and the last HELD_OUT pairs as the test split."""
    rows = hh_pairs()
    train, test = rows[:-HELD_OUT], rows[-HELD_OUT:]
    return write_train_test(workdir / name, train[:train_pairs] if train_pairs else train, test)


def common(model: str, data: Path, size: Size, out: Path, seed: int = 0) -> dict:
    values = dict(model_name_or_path=model, dataset_name=str(data), dataset_train_split="train",
                  dataset_eval_split="test", data_format="hh_rlhf", output_dir=str(out), seed=seed,
                  use_cpu=not _cuda(), report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=1,
                  lora_r=16, lora_alpha=32, max_eval_samples=size.held_out_pairs)
    if size.bf16 is not None:
        values["bf16"] = size.bf16
    return values


def run_stage(name: str, values: dict) -> dict:
    import importlib

    from rlhf_lm.configs import config_from_dict

    module = importlib.import_module(f"rlhf_lm.stages.{name}")
    start = time.perf_counter()
    metrics = module.run(config_from_dict(module.CONFIG, values))
    return {**metrics, "wall_s": time.perf_counter() - start}


def stage_settings(workdir: Path, data: Path, model: str, size: Size, dpo_data: Path | None = None,
                   seed: int = 0) -> dict[str, dict]:
    """The values each stage of (a)-(c) is configured with (tests/test_real_model_benchmark.py builds a config
    from each, so a key a stage stops reading fails there rather than half an hour into a run). DPO trains on
    `dpo_data` where given (Size.dpo_train_pairs), the other stages on `data`."""
    rm_dir = workdir / "reward"
    ppo = common(model, data, size, workdir / "ppo", seed)
    del ppo["data_format"]  # ppo reads prompts only: each pair's prompt, split from its chosen dialogue
    # LoRA with few steps (about 30 at the cpu size) needs a LoRA-sized learning rate, not a full fine-tune's.
    # Reward model: at 2e-4 its training loss stayed at 0.691 (ln 2 = 0.693) and held-out accuracy 0.028 above
    # "shorter wins"; at 1e-3, 0.054 above. DPO: at 1e-4 the policy barely moved (KL 0.0007 nats/token, held-out
    # implicit accuracy 0.514); 1e-3, the top of the range LoRA is usually trained at, with the default linear decay
    # and beta 0.1 (the DPO paper's), moved it to KL 0.08 and 0.584 (each stage alone, one seed, 2 CPU cores).
    # DPO's cpu size trains on 512 distinct pairs, not 256: on 256 its samples lost to the reference (win-rate 0.391,
    # KL 0.096); a second epoch over the same 256 won more (0.625) but memorised them (held-out DPO loss 0.861, worse
    # than the untrained 0.693); 512 pairs once: win-rate 0.609, KL 0.233, held-out DPO loss 0.656, accuracy 0.581.
    return {
        "reward": dict(common(model, data, size, rm_dir, seed), learning_rate=1e-3, num_train_epochs=1,
                       per_device_train_batch_size=size.batch, max_length=size.max_length),
        "dpo": dict(common(model, dpo_data or data, size, workdir / "dpo", seed), learning_rate=1e-3, beta=0.1,
                    num_train_epochs=1, per_device_train_batch_size=size.batch, max_length=size.max_length,
                    reward_model=str(rm_dir),
                    eval_num_prompts=size.eval_prompts, eval_max_new_tokens=size.max_new_tokens),
        "ppo": dict(ppo, reward_model=str(rm_dir), learning_rate=1e-4, num_train_epochs=1,
                    **({"max_steps": size.ppo_steps} if size.ppo_steps else {}),
                    rollout_batch_size=size.rollout, per_device_train_batch_size=size.rollout // 2,
                    max_new_tokens=size.max_new_tokens, max_prompt_length=256, kl_coef=0.05, target_kl=0.03,
                    missing_eos_penalty=1.0, normalize_scores=True),
    }


def quality(workdir: Path, model: str, size: Size, seed: int = 0, save=lambda results: None) -> dict:
    """(a) reward model, (b) DPO, (c) PPO, all judged on the held-out pairs / prompts. The seed moves LoRA's
    initialisation, the batch order and every sample; the training and held-out pairs stay the same. ``save`` gets
    the results after each stage, so a run stopped at a time limit (a device lease) keeps the stages it finished."""
    data = write_splits(workdir, size.train_pairs)
    dpo_data = write_splits(workdir, size.dpo_train_pairs, "data_dpo") if size.dpo_train_pairs else None
    settings = stage_settings(workdir, data, model, size, dpo_data, seed)
    results = {}
    reward = run_stage("reward", settings["reward"])
    longer = reward.get("reward/length_baseline_accuracy")
    reward["reward/shorter_wins_accuracy"] = 1.0 - longer if longer is not None else None
    results["reward"] = reward
    save(results)
    results["dpo"] = run_stage("dpo", settings["dpo"])
    save(results)
    results["ppo"] = run_stage("ppo", settings["ppo"])
    history = json.loads((workdir / "ppo" / "metrics.json").read_text())["log_history"]
    results["ppo"]["per_iteration"] = [{k: h[k] for k in ("step", "objective/scores", "objective/kl") if k in h}
                                       for h in history if "objective/kl" in h]
    save(results)
    results["ppo_eval"] = evaluate_ppo(workdir, size, seed)
    return results


def evaluate_ppo(workdir: Path, size: Size, seed: int = 0) -> dict:
    """(c)'s judgement: the PPO policy against its reference on the held-out prompts (the test split), by (a)."""
    import shutil

    shutil.rmtree(workdir / "ppo_eval", ignore_errors=True)
    # The policy and its reference in the dtype PPO trained them in: with bf16 the stage's frozen LoRA base is bf16
    # weights, so that is the model it trained and took its KL against (float32 would judge a slightly different
    # base), and on this CPU (AVX512-BF16) the forward runs ~3x faster (measured: the base model, 8 x 300 tokens,
    # 4.2 s vs 12.5 s, medians of 3). The judge stays float32 with its adapter merged (ClassifierReward's default),
    # as in DPO: merged into bf16 weights it ranks 9% of held-out pairs the other way round (64 pairs measured).
    return run_stage("evaluate", dict(
        policy_path=str(workdir / "ppo"), output_dir=str(workdir / "ppo_eval"), reward_model=str(workdir / "reward"),
        prompts=str(workdir / "data"), prompts_split="test", num_prompts=size.eval_prompts,
        max_new_tokens=size.max_new_tokens, dtype="bfloat16" if size.bf16 else "float32", seed=seed))


# ------------------------------------------------------------------------------------------ (d) speed and memory
SPEED_CHILD = r"""
import json, sys, time
import torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(1)
from benchmarks.real_model import speed_trainer
trainer, tokens = speed_trainer(**spec)
start = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - start
# This process's own high-water mark: ru_maxrss would carry the driver's over from before the exec
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "tokens": tokens(trainer), "steps": trainer.state.global_step,
                  "peak_rss_gb": peak / 2**20}))
"""


def speed_trainer(side: str, stage: str, model: str, data: str, out: str, steps: int, batch: int, max_length: int,
                  bf16: bool | None = None):
    """A trainer for ``steps`` optimizer steps: ``side="trl"`` is plain TRL (its defaults, the model as a path),
    ``side="ours"`` our stage's config, trainer class and model loading, ``"ours_memory"`` the same in our memory
    mode (activation checkpointing). Returns (trainer, tokens_seen)."""
    from peft import LoraConfig

    from rlhf_lm.data import load_rows, normalize_preferences
    from rlhf_lm.modeling import load_tokenizer
    from rlhf_lm.rewards import reward_input_ids

    tokenizer = load_tokenizer(model)
    pairs, _ = normalize_preferences(load_rows(data), "hh_rlhf", hh_messages=True)

    def longest(row: dict) -> int:
        return max(len(reward_input_ids(row["prompt"], row[answer][0]["content"], tokenizer))
                   for answer in ("chosen", "rejected"))

    # Pairs that fit max_length whole, so neither side drops or truncates any and both train on the same tokens
    # (TRL's RewardTrainer would drop longer ones silently, down to an empty dataset).
    fits = [i for i, row in enumerate(pairs) if longest(row) <= max_length]
    pairs = pairs.select(fits[:steps * batch])
    shape = dict(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, max_length=max_length,
                 report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                 include_num_input_tokens_seen="non_padding", use_cpu=not _cuda(),
                 **({"bf16": bf16} if bf16 is not None else {}))
    task = "SEQ_CLS" if stage == "reward" else "CAUSAL_LM"
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type=task,
                      **({"modules_to_save": ["score"]} if stage == "reward" else {}))
    if side == "trl":
        from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

        config_cls, trainer_cls = (RewardConfig, RewardTrainer) if stage == "reward" else (DPOConfig, DPOTrainer)
        trainer = trainer_cls(model=model, args=config_cls(**shape), train_dataset=pairs, processing_class=tokenizer,
                              peft_config=lora)
    else:
        from rlhf_lm.configs import config_from_dict

        if side == "ours_memory":
            shape["activation_checkpointing"] = True
        if stage == "reward":
            from rlhf_lm.modeling import load_sequence_classifier
            from rlhf_lm.stages.reward import CONFIG
            from rlhf_lm.trainers import RewardTrainer

            cfg = config_from_dict(CONFIG, dict(shape, model_name_or_path=model, lora_r=16, lora_alpha=32))
            trainer = RewardTrainer(model=load_sequence_classifier(model, dtype=cfg.dtype), args=cfg,
                                    train_dataset=pairs, processing_class=tokenizer, peft_config=lora)
        else:
            from rlhf_lm.modeling import load_policy_and_reference
            from rlhf_lm.stages.dpo import CONFIG
            from rlhf_lm.trainers import DPOTrainer

            cfg = config_from_dict(CONFIG, dict(shape, model_name_or_path=model, lora_r=16, lora_alpha=32))
            policy, ref, peft_config = load_policy_and_reference(cfg)
            trainer = DPOTrainer(model=policy, ref_model=ref, args=cfg, train_dataset=pairs,
                                 processing_class=tokenizer, peft_config=peft_config)
    return trainer, lambda t: int(t.state.num_input_tokens_seen)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def speed(workdir: Path, model: str, size: Size, rounds: int = 2) -> dict:
    """Each side in its own process, alternating (ours, ours_memory, trl, then reversed); medians of tokens/s and
    peak RSS (the process's own VmHWM)."""
    import statistics

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    out: dict = {}
    for stage in ("reward", "dpo"):
        sides = ("ours", "ours_memory", "trl")
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                spec = dict(side=side, stage=stage, model=model, data=str(HH_PAIRS), out=str(workdir / "speed"),
                            steps=size.speed_steps, batch=size.batch, max_length=size.max_length, bf16=size.bf16)
                done = subprocess.run([sys.executable, "-c", SPEED_CHILD, json.dumps(spec)], env=env, cwd=ROOT,
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{stage} {side} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                result["tokens_per_s"] = result["tokens"] / result["seconds"]
                runs[side].append(result)
                print(f"[real_model] {stage} {side}: {result}", flush=True)
        med = {side: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "peak_rss_gb", "seconds")}
               for side, rs in runs.items()}
        out[stage] = {"runs": runs, "median": med,
                      **{f"{side}_over_trl": {k: med[side][k] / med["trl"][k] for k in ("tokens_per_s", "peak_rss_gb")}
                         for side in sides[:2]}}
    return out


def machine() -> dict:
    """CPU model, cores and library versions (the benchmark's numbers mean little without them)."""
    from benchmarks.quality import machine as quality_machine

    return quality_machine()


# The harmless split is red-team prompts, and the page is read by everyone: samples in which any text contains one of
# these slurs are left out of it (they stay in the stages' samples.jsonl).
LEFT_OUT_OF_DOCS = ("nigger", "faggot", "retard", "kike", "chink", "spic", "tranny")


def write_samples(workdir: Path, path: Path, n: int = 4) -> None:
    """A few held-out prompts with the reference's, DPO's and PPO's answers (from the stages' samples.jsonl)."""
    dpo = [json.loads(line) for line in (workdir / "dpo" / "samples.jsonl").read_text().splitlines()]
    ppo = [json.loads(line) for line in (workdir / "ppo_eval" / "samples.jsonl").read_text().splitlines()]
    lines = ["# Samples on held-out HH-RLHF prompts (SmolLM2-135M-Instruct, `benchmarks/real_model.py`)", "",
             "The prompts are the harmless split's red-team conversations, shown turn by turn; the answers are the "
             "last assistant turn. The reference is the instruct model itself (adapters off). Scores in brackets are "
             "the trained reward model's. Samples containing a slur are left out of this page.", ""]
    shown = 0
    for d, p in zip(dpo, ppo, strict=False):
        texts = [turn["content"] for turn in d["prompt"]] + [d["reference"], d["policy"], p["policy"]]
        if shown == n or any(word in text.lower() for text in texts for word in LEFT_OUT_OF_DOCS):
            continue
        shown += 1
        lines += [f"**{turn['role']}:** {turn['content'].strip()}  " for turn in d["prompt"]]
        lines += ["", f"- reference ({d['scores']['reward_reference']:.2f}): {d['reference'].strip()}",
                  f"- DPO ({d['scores']['reward_policy']:.2f}): {d['policy'].strip()}",
                  f"- PPO ({p['scores']['reward_policy']:.2f}): {p['policy'].strip()}", "", "---", ""]
    path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------ quality over seeds
# (section, metric, higher is better, the `cpu` size's target or None), for each seed's quality run
SEED_METRICS = {
    "reward/over_length_baseline": ("reward", "reward/over_length_baseline", True, 0.03),
    "reward/accuracy": ("reward", "reward/accuracy", True, None),
    "dpo/implicit_accuracy": ("dpo", "eval/implicit_accuracy", True, 0.55),
    "dpo/win_rate": ("dpo", "eval/win_rate", True, 0.55),
    "dpo/kl": ("dpo", "eval/kl", False, 0.5),
    "ppo/win_rate": ("ppo_eval", "eval/win_rate", True, 0.60),
    "ppo/kl": ("ppo_eval", "eval/kl", False, 1.0),
    "ppo/answer_tokens": ("ppo_eval", "eval/length/policy", True, None),
    # At equal answer lengths (rlhf_lm.evaluation.length_controlled_win_rate), from each stage's samples.jsonl
    "dpo/lc_win_rate": ("dpo", "lc_win_rate", True, None),
    "ppo/lc_win_rate": ("ppo_eval", "lc_win_rate", True, None),
    "quality_seconds": (None, "quality_seconds", False, None),
}


def result_path(size: str, seed: int) -> Path:
    """Seed 0 is the full run (quality and speed); other seeds only repeat the quality part."""
    return ROOT / "benchmarks" / "results" / (f"real_model_{size}.json" if seed == 0 else
                                              f"real_model_{size}_seed{seed}.json")


def seed_workdir(workdir: str | Path, size: str, seed: int) -> Path:
    return Path(workdir) / (size if seed == 0 else f"{size}_seed{seed}")


def lc_win_rate_from_samples(samples: Path, tokenizer) -> float:
    """The length-controlled win-rate of a finished run, from its samples.jsonl: the answers re-tokenized for their
    lengths (the run's own ``eval/lc_win_rate`` counts the generated tokens, which also hold the EOS; runs made before
    that metric existed only have their samples)."""
    import torch

    from rlhf_lm.evaluation import length_controlled_win_rate

    rows = [json.loads(line) for line in samples.read_text().splitlines()]

    def column(side: str) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = [len(tokenizer(row[side], add_special_tokens=False)["input_ids"]) for row in rows]
        return torch.tensor([row["scores"][f"reward_{side}"] for row in rows]), torch.tensor(lengths)

    (policy, policy_lengths), (reference, reference_lengths) = column("policy"), column("reference")
    return length_controlled_win_rate(policy, reference, policy_lengths, reference_lengths)


def seed_metrics(report: dict, workdir: Path | None = None, tokenizer=None) -> dict:
    """The summary's metrics of one seed's result file; the length-controlled win-rates where the seed's run
    directory still holds its samples (``workdir``)."""
    quality = {section: dict(values) for section, values in report["quality"].items()}
    reward = quality["reward"]
    baseline = max(reward["reward/length_baseline_accuracy"], reward["reward/shorter_wins_accuracy"])
    reward["reward/over_length_baseline"] = reward["reward/accuracy"] - baseline
    for section in ("dpo", "ppo_eval"):  # each is also the name of the run directory that holds its samples
        samples = workdir / section / "samples.jsonl" if workdir is not None else None
        if samples is not None and samples.is_file():
            quality[section]["lc_win_rate"] = lc_win_rate_from_samples(samples, tokenizer)
    sections = {**quality, None: report}
    return {name: sections[section][key] for name, (section, key, _, _) in SEED_METRICS.items()
            if key in sections[section]}


def summarize_seeds(size: str, workdir: str | Path | None = None) -> dict:
    """Every seed's quality run of ``size`` side by side: per seed, mean +- std, the worst seed, and each target
    checked on the worst seed (a target met only on average is not met). ``workdir``: where the runs' directories
    are, for the length-controlled win-rates (seeds whose directory is gone go without)."""
    from benchmarks.quality import aggregate

    results = result_path(size, 0).parent
    seeds = [0] + sorted(int(m.group(1)) for path in results.iterdir()
                         if (m := re.fullmatch(rf"real_model_{size}_seed(\d+)\.json", path.name)))
    reports = [json.loads(result_path(size, seed).read_text()) for seed in seeds]
    tokenizer = None
    if workdir is not None:
        from rlhf_lm.modeling import load_tokenizer
        from rlhf_lm.real_checkpoint import smollm2_135m_instruct

        tokenizer = load_tokenizer(str(smollm2_135m_instruct()))
    per_seed = {}
    for report in reports:
        seed = report.get("seed", 0)
        if "quality" in report:
            run_dir = seed_workdir(workdir, size, seed) if workdir is not None else None
            per_seed[seed] = seed_metrics(report, run_dir, tokenizer)
    stats = aggregate(per_seed, {name: spec[2] for name, spec in SEED_METRICS.items()})
    targets = {name: {"target": target, "worst": stats[name]["worst"],
                      "met": stats[name]["worst"] >= target if higher else stats[name]["worst"] <= target}
               for name, (_, _, higher, target) in SEED_METRICS.items() if target is not None and size == "cpu"}
    return {"benchmark": "real_model seeds", "size": size, "seeds": sorted(per_seed), "per_seed": per_seed,
            "stats": stats, "targets_on_worst_seed": targets,
            "machine_per_seed": {report.get("seed", 0): report["machine"] for report in reports}}


def refuse_earlier_runs(workdir: Path) -> None:
    """Stop before an hour of work if ``workdir`` holds an earlier run's stages: each stage refuses to replace a
    finished run, and the benchmark does not delete directories it cannot tell it made."""
    earlier = [name for name in STAGE_DIRS if (workdir / name).exists()]
    if earlier:
        raise SystemExit(f"{workdir} holds an earlier run ({', '.join(earlier)}): delete it, or pass another --workdir")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--workdir", default="/tmp/rlhf_lm_real_model")
    parser.add_argument("--skip-speed", action="store_true", help="Only (a)-(c).")
    parser.add_argument("--skip-quality", action="store_true", help="Only (d), into the existing result file.")
    parser.add_argument("--seed", type=int, default=0,
                        help="Training and sampling seed. Other than 0, writes real_model_<size>_seed<N>.json.")
    parser.add_argument("--summarize", action="store_true",
                        help="Only gather every seed's result file of --size into real_model_<size>_seeds.json.")
    args = parser.parse_args(argv)
    if args.summarize:
        summary = summarize_seeds(args.size, args.workdir)
        out = ROOT / "benchmarks" / "results" / f"real_model_{args.size}_seeds.json"
        out.write_text(json.dumps(summary, indent=2) + "\n")
        for name, stat in summary["stats"].items():
            print(f"{name:<30} {stat['mean']:8.3f} +- {stat['std']:.3f}  worst {stat['worst']:.3f}  (n={stat['n']})")
        print(f"[real_model] wrote {out}")
        return 0
    workdir = seed_workdir(args.workdir, args.size, args.seed)
    if not args.skip_quality:
        refuse_earlier_runs(workdir)
    if not HH_PAIRS.is_file():
        raise SystemExit(f"needs the shared HH-RLHF pairs at {HH_PAIRS}")
    from rlhf_lm.real_checkpoint import smollm2_135m_instruct

    model = str(smollm2_135m_instruct())
    size = SIZES[args.size]
    start = time.perf_counter()
    out = result_path(args.size, args.seed)
    partial = out.with_suffix(".partial.json")
    report = {"benchmark": "real_model", "size": args.size, "seed": args.seed, "settings": size.__dict__,
              "model": "SmolLM2-135M-Instruct", "held_out_pairs": HELD_OUT, "machine": machine()}
    if args.skip_quality:
        report = {**json.loads(out.read_text()), **report}
    else:
        def save(results: dict) -> None:  # beside the result file, which only a finished run replaces
            partial.write_text(json.dumps({**report, "quality": results}, indent=2, default=str) + "\n")

        report["quality"] = quality(workdir, model, size, args.seed, save)
        report["quality_seconds"] = time.perf_counter() - start
    if not args.skip_speed:
        report["speed"] = speed(workdir, model, size)
    report["total_seconds"] = time.perf_counter() - start
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    partial.unlink(missing_ok=True)
    if args.size != "smoke" and not args.skip_quality and args.seed == 0:
        write_samples(workdir, ROOT / "docs" / "real_model_samples.md")
    print(f"[real_model] wrote {out} in {report['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
