"""The reward adapter on the policy's base (``share_reward_base``) vs a separate reward model, on a real checkpoint.

    python -m benchmarks.shared_reward                     # SmolLM2-135M-Instruct, ~10 minutes on 2 CPU cores
    python -m benchmarks.shared_reward --repeats 5 --steps 4 --work_dir /tmp/bench_shared

A reward stage trains a LoRA reward model on SmolLM2-135M-Instruct (the real-model fixture,
:mod:`rlhf_lm.real_checkpoint`) for a few steps on handmade chat pairs; PPO (and GRPO) then fine-tune a LoRA policy
on the same checkpoint with that reward model either shared (a second adapter on the policy's base,
:mod:`rlhf_lm.shared_reward`) or separate (``ClassifierReward.from_pretrained``: the default loader, adapter merged
into its own copy of the base; "unmerged" = the same without merging, the shared layout's exact arithmetic).

Measured, all in this one process:

* **scores**: max |shared - separate| over chat (prompt, reply) pairs, against the merged and the unmerged loader;
* **curves**: PPO for ``--steps`` iterations, shared vs unmerged-separate (must be identical: every logged number and
  the trained weights) and vs merged-separate (max difference of each logged number); the same for the GRPO stage
  (``share_reward_base`` true / false) through TRL's GRPOTrainer;
* **weight memory**: bytes of every tensor a PPO run holds for its models - the policy model with its adapters and
  value head, the optimizer state, and the reward model - each storage counted once (tied embeddings once), after
  training; shared / separate;
* **step time**: median seconds per PPO iteration (the first iteration of each run not counted), shared and separate
  (merged) runs alternating, ``--repeats`` each; the ratio of the medians and its spread over repeats.

Writes ``benchmarks/results/shared_reward.json`` with the machine, library versions and targets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "shared_reward.json"
TARGETS = {"score_max_abs_diff": 1e-5, "memory_ratio": 0.55, "step_time_ratio": 1.05}
LORA = dict(lora_r=16, lora_alpha=32)  # the stage defaults, on every linear layer (policy and reward alike)
PPO = dict(rollout_batch_size=8, per_device_train_batch_size=8, per_device_eval_batch_size=8, num_ppo_epochs=2,
           max_new_tokens=24, learning_rate=1e-3, kl_coef=0.05, normalize_scores=True, logging_steps=1, seed=0,
           use_cpu=True, disable_tqdm=True, report_to="none", save_strategy="no")

NAMES = ["Ann", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana"]
FRUITS = ["apples", "pears", "plums", "figs", "limes", "dates", "kiwis", "cherries"]


def questions(n: int, offset: int = 0) -> list[str]:
    return [f"{NAMES[(i + offset) % 8]} has {i % 7 + 2} {FRUITS[(i * 3 + offset) % 8]} and eats one. How many are "
            "left?" for i in range(n)]


def pair_rows(n: int, offset: int = 0) -> list[dict]:
    """Chat preference pairs: a polite correct answer over a rude non-answer (enough for a few reward steps)."""
    rows = []
    for i, q in enumerate(questions(n, offset)):
        left = i % 7 + 1
        rows.append({"prompt": [{"role": "user", "content": q}],
                     "chosen": [{"role": "assistant", "content": f"There are {left} left."}],
                     "rejected": [{"role": "assistant", "content": "Count them yourself."}]})
    return rows


def write_data(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("pairs_train", pair_rows(48)), ("pairs_eval", pair_rows(16, offset=3)),
                       ("prompts_train", [{"prompt": r["prompt"]} for r in pair_rows(32, offset=5)])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def train_reward(base: Path, data: Path, out: Path) -> Path:
    from rlhf_lm.configs import config_from_dict
    from rlhf_lm.stages import reward as reward_stage

    if not (out / "metrics.json").is_file():
        reward_stage.run(config_from_dict(reward_stage.RewardStageConfig, dict(
            model_name_or_path=str(base), dataset_name=str(data), dataset_train_split="pairs_train",
            dataset_eval_split="pairs_eval", output_dir=str(out), max_steps=6, per_device_train_batch_size=8,
            learning_rate=1e-3, max_length=128, save_strategy="no", logging_steps=1, use_cpu=True,
            disable_tqdm=True, report_to="none", seed=0, **LORA), "benchmark"))
    return out


def policy(base: Path):
    from peft import get_peft_model
    from transformers import set_seed

    from rlhf_lm.configs import ModelArguments
    from rlhf_lm.modeling import load_causal_lm, load_tokenizer, lora_config_from_args

    set_seed(0)
    tokenizer = load_tokenizer(str(base), padding_side="left")
    model = get_peft_model(load_causal_lm(str(base), dtype="float32"), lora_config_from_args(ModelArguments(**LORA)))
    return model, tokenizer


def reward_for(layout: str, model, tokenizer, reward_dir: Path):
    from rlhf_lm.rewards import ClassifierReward
    from rlhf_lm.shared_reward import load_reward_for_policy

    if layout == "shared":
        reward, info = load_reward_for_policy(str(reward_dir), model, tokenizer)
        assert info["shared_base"], info
        return reward
    return ClassifierReward.from_pretrained(reward_dir, device="cpu", merge=layout == "separate")


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def weight_memory(trainer, reward, layout: str) -> dict[str, float]:
    """MB of the run's model tensors: policy model (base + adapters + value head), optimizer state, reward model."""
    model = [*trainer.unwrapped.parameters(), *trainer.unwrapped.buffers()]
    optimizer = [v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    # shared: the reward's LoRA factors are already on the policy model; its own tensors are the score head only
    scorer = [*reward.model.parameters(), *reward.model.buffers()]
    mb = 2**20
    return {"policy_model_mb": storage_bytes(model) / mb, "optimizer_mb": storage_bytes(optimizer) / mb,
            "reward_model_mb": storage_bytes(scorer) / mb, "total_mb": storage_bytes(model + optimizer + scorer) / mb}


class StepTimer:
    """Wall and CPU seconds of each PPO iteration. CPU time (this process, one thread) is what other jobs on a shared
    machine inflate least; wall time is what a user waits."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.start = (time.perf_counter(), time.process_time())

            def on_step_end(self, args, state, control, **kwargs):
                timer.wall.append(time.perf_counter() - timer.start[0])
                timer.cpu.append(time.process_time() - timer.start[1])

        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.callback = Callback()


def ppo_run(layout: str, base: Path, reward_dir: Path, prompts: list, steps: int, work: Path):
    from rlhf_lm.ppo import PPOConfig, PPOTrainer

    model, tokenizer = policy(base)
    reward = reward_for(layout, model, tokenizer, reward_dir)
    timer = StepTimer()
    trainer = PPOTrainer(model, PPOConfig(output_dir=str(work / layout), max_steps=steps, **PPO), tokenizer, reward,
                         prompts, callbacks=[timer.callback])
    trainer.train()
    return trainer, reward, timer


def scoring_time(base: Path, reward_dir: Path, prompts: list, replies: list[str], rounds: int) -> dict:
    """CPU seconds of one reward call on the same texts, shared vs separate (merged), alternating: the only work the
    layouts do differently in a PPO step."""
    model, tokenizer = policy(base)
    rewards = {"shared": reward_for("shared", model, tokenizer, reward_dir),
               "separate": reward_for("separate", None, None, reward_dir)}
    times: dict[str, list[float]] = {"shared": [], "separate": []}
    for i in range(rounds):
        for layout in (("shared", "separate") if i % 2 == 0 else ("separate", "shared")):
            start = time.process_time()
            rewards[layout](prompts, replies)
            times[layout].append(time.process_time() - start)
    medians = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {"texts": len(replies), "cpu_seconds_median": medians,
            "ratio_shared_over_separate": medians["shared"] / medians["separate"]}


def compare_logs(a: list[dict], b: list[dict]) -> dict[str, float]:
    """Max |a - b| of every logged number, over the steps."""
    diffs: dict[str, float] = {}
    for x, y in zip(a, b, strict=True):
        for key, value in x.items():
            if isinstance(value, float | int) and key in y:
                diffs[key] = max(diffs.get(key, 0.0), abs(value - y[key]))
    return diffs


UNMERGED_SPEC = """from rlhf_lm.rewards import ClassifierReward


class Unmerged(ClassifierReward):
    \"\"\"The reward model as a separate model, adapter not merged: the shared layout's arithmetic.\"\"\"

    def __init__(self):
        self.__dict__.update(vars(ClassifierReward.from_pretrained({path!r}, merge=False, device="cpu")))
"""


def grpo_curves(base: Path, data: Path, reward_dir: Path, work: Path) -> dict:
    """The GRPO stage with the reward shared, separate (the stage's own fallback: merged) and separate unmerged (a
    reward spec file), same seed."""
    from rlhf_lm.configs import config_from_dict
    from rlhf_lm.stages import grpo

    spec = work / "unmerged_reward.py"
    spec.write_text(UNMERGED_SPEC.format(path=str(reward_dir)))
    logs = {}
    for layout in ("shared", "separate", "unmerged"):
        out = work / f"grpo_{layout}"
        grpo.run(config_from_dict(grpo.CONFIG, dict(
            model_name_or_path=str(base), dataset_name=str(data), dataset_train_split="prompts_train",
            reward_model=f"{spec}:Unmerged" if layout == "unmerged" else str(reward_dir), output_dir=str(out),
            max_steps=3, per_device_train_batch_size=8, num_generations=4, max_completion_length=24,
            learning_rate=1e-3, logging_steps=1, seed=0, use_cpu=True, disable_tqdm=True, report_to="none",
            save_strategy="no", share_reward_base=layout == "shared", **LORA), "benchmark"))
        saved = json.loads((out / "metrics.json").read_text())
        assert saved["run"]["reward_layout"]["shared_base"] == (layout == "shared"), saved["run"]
        logs[layout] = [h for h in saved["log_history"] if "reward" in h]
    keys = ("reward", "reward_std", "loss", "entropy", "completions/mean_length", "grad_norm")
    diffs = {other: compare_logs(logs["shared"], logs[other]) for other in ("separate", "unmerged")}
    return {"steps": len(logs["shared"]),
            "identical_to_unmerged": all(diffs["unmerged"][k] == 0 for k in keys),
            "max_abs_diff_vs_merged": {k: diffs["separate"][k] for k in keys if k in diffs["separate"]},
            "rewards_shared": [h["reward"] for h in logs["shared"]],
            "rewards_separate_merged": [h["reward"] for h in logs["separate"]]}


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    import importlib.metadata

    from rlhf_lm.real_checkpoint import smollm2_135m_instruct

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", default="/tmp/rlhf_lm_bench_shared_reward")
    parser.add_argument("--repeats", type=int, default=3, help="Timed PPO runs per layout (alternating).")
    parser.add_argument("--steps", type=int, default=4, help="PPO iterations per run (the first is not timed).")
    parser.add_argument("--skip_grpo", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(args.work_dir)
    base = smollm2_135m_instruct()
    data = write_data(work / "data")
    reward_dir = train_reward(base, data, work / "reward")
    prompts = [[{"role": "user", "content": q}] for q in questions(64, offset=11)]
    result: dict = {"model": "SmolLM2-135M-Instruct (fp32, CPU)", "lora": LORA, "ppo": PPO, "steps": args.steps}

    # scores: the reward stage's own pairs and eval pairs, both replies
    rows = pair_rows(48) + pair_rows(16, offset=3)
    score_prompts = [r["prompt"] for r in rows] * 2
    replies = [r["chosen"][0]["content"] for r in rows] + [r["rejected"][0]["content"] for r in rows]
    model, tokenizer = policy(base)
    shared = reward_for("shared", model, tokenizer, reward_dir)(score_prompts, replies)
    separate = {kind: reward_for(kind, None, None, reward_dir)(score_prompts, replies)
                for kind in ("separate", "unmerged")}
    # Which float32 rounding is closer to the exact scores: the same reward model in float64, unmerged.
    from rlhf_lm.rewards import ClassifierReward

    exact = ClassifierReward.from_pretrained(reward_dir, device="cpu", merge=False, dtype=torch.float64)
    exact.model.double()  # the LoRA factors too (PEFT creates them in float32)
    exact_scores = exact(score_prompts, replies).double()
    result["scores"] = {"n": len(replies), "score_std": shared.std().item(),
                        "max_abs_diff_vs_separate_merged": (shared - separate["separate"]).abs().max().item(),
                        "max_abs_diff_vs_separate_unmerged": (shared - separate["unmerged"]).abs().max().item(),
                        "max_abs_error_vs_float64/shared": (shared.double() - exact_scores).abs().max().item(),
                        "max_abs_error_vs_float64/separate_merged":
                            (separate["separate"].double() - exact_scores).abs().max().item()}
    del model, shared, separate
    print(result["scores"], flush=True)

    # curves + memory: PPO shared vs separate-unmerged (exact) and separate-merged (the default loader)
    runs = {layout: ppo_run(layout, base, reward_dir, prompts, args.steps, work / "curves")
            for layout in ("shared", "unmerged", "separate")}
    logs = {k: v[0].state.log_history for k, v in runs.items()}
    weights = {k: {n: p for n, p in v[0].unwrapped.named_parameters() if p.requires_grad} for k, v in runs.items()}
    result["ppo_curves"] = {
        "identical_to_unmerged": logs["shared"] == logs["unmerged"] and all(
            torch.equal(weights["shared"][n], weights["unmerged"][n]) for n in weights["shared"]),
        "max_abs_diff_vs_merged": compare_logs(logs["shared"], logs["separate"]),
        "scores_shared": [h["objective/scores"] for h in logs["shared"] if "objective/scores" in h],
        "scores_separate_merged": [h["objective/scores"] for h in logs["separate"] if "objective/scores" in h],
    }
    memory = {k: weight_memory(v[0], v[1], k) for k, v in runs.items() if k != "unmerged"}
    memory["ratio_shared_over_separate"] = memory["shared"]["total_mb"] / memory["separate"]["total_mb"]
    result["weight_memory"] = memory
    print(result["ppo_curves"]["identical_to_unmerged"], memory, flush=True)
    del runs, weights
    import gc

    gc.collect()

    # step time: alternate the layouts; a fresh run each time (same seed, so the same samples on both sides)
    timing: dict[str, dict[str, list[float]]] = {clock: {"shared": [], "separate": []} for clock in ("wall", "cpu")}
    for repeat in range(args.repeats):
        for layout in (("shared", "separate") if repeat % 2 == 0 else ("separate", "shared")):
            trainer, reward, timer = ppo_run(layout, base, reward_dir, prompts, args.steps, work / "timing")
            for clock in ("wall", "cpu"):
                timing[clock][layout].append(statistics.median(getattr(timer, clock)[1:]))
            print(layout, repeat, [round(t, 3) for t in timer.wall], [round(t, 3) for t in timer.cpu], flush=True)
            del trainer, reward
            gc.collect()
    result["step_time"] = {}
    for clock, times in timing.items():
        medians = {k: statistics.median(v) for k, v in times.items()}
        result["step_time"][clock] = {
            "seconds_per_iteration": times, "median": medians,
            "ratio_shared_over_separate": medians["shared"] / medians["separate"],
            "ratio_per_repeat": [s / p for s, p in zip(times["shared"], times["separate"], strict=True)]}
    result["scoring_time"] = scoring_time(base, reward_dir, score_prompts, replies, args.repeats * 5)
    if not args.skip_grpo:
        result["grpo_curves"] = grpo_curves(base, data, reward_dir, work)

    result["targets"] = {
        f"scores within {TARGETS['score_max_abs_diff']:g} (vs the default merged loader)":
            result["scores"]["max_abs_diff_vs_separate_merged"] <= TARGETS["score_max_abs_diff"],
        f"weight memory <= {TARGETS['memory_ratio']}x": memory["ratio_shared_over_separate"] <= TARGETS["memory_ratio"],
        f"step time <= {TARGETS['step_time_ratio']}x (CPU time)":
            result["step_time"]["cpu"]["ratio_shared_over_separate"] <= TARGETS["step_time_ratio"],
        f"step time <= {TARGETS['step_time_ratio']}x (wall time)":
            result["step_time"]["wall"]["ratio_shared_over_separate"] <= TARGETS["step_time_ratio"],
        "PPO curves identical (vs unmerged separate)": result["ppo_curves"]["identical_to_unmerged"],
    }
    if "grpo_curves" in result:
        result["targets"]["GRPO curves identical (vs unmerged separate)"] = result["grpo_curves"][
            "identical_to_unmerged"]
    result["machine"] = {"cpu": cpu_model(), "cores": os.cpu_count(),
                         "threads": torch.get_num_threads(), "python": platform.python_version()}
    result["versions"] = {name: importlib.metadata.version(name) for name in
                          ("torch", "transformers", "trl", "peft", "accelerate")}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["targets"], indent=2))
    print(f"Wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
