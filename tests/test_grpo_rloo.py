"""GRPO and RLOO stages (TRL's trainers) with our reward specs and LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_lm.errors import RewardError
from rlhf_lm.rewards import GoldReward, TRLRewardFunction

STAGES = ["grpo", "rloo"]


def stage_args(task: Path, out: Path, steps: int, **extra) -> list[str]:
    args = {"model_name_or_path": task / "base_policy", "dataset_name": task / "data" / "prompts_train.jsonl",
            "reward_model": "gold", "output_dir": out, "max_steps": steps, "per_device_train_batch_size": 8,
            "num_generations": 4, "max_completion_length": 32, "logging_steps": 1, "use_cpu": "true",
            "disable_tqdm": "true", "save_strategy": "no", "learning_rate": 3e-3, "lora_r": 8, "lora_alpha": 16,
            **extra}
    return [part for key, value in args.items() for part in (f"--{key}", str(value))]


def run_stage(name: str, argv: list[str]) -> dict:
    import importlib

    from rlhf_lm.configs import parse_config

    module = importlib.import_module(f"rlhf_lm.stages.{name}")
    return module.run(parse_config(module.CONFIG, argv))


@pytest.mark.parametrize("name", STAGES)
def test_stage_trains_the_adapter_and_writes_outputs(name, tiny_task_dir, tmp_path):
    out = tmp_path / name
    metrics = run_stage(name, stage_args(tiny_task_dir, out, steps=2))
    assert {"train/loss", "reward/first", "reward/last"} <= set(metrics)
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values()), "LoRA B starts at zero; training moves it"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["run"]["num_processes"] == 1 and saved["log_history"] and saved["data"]["train"]["rows_out"] > 0
    assert (out / "tokenizer.json").is_file() and not (tmp_path / f"{name}.partial").exists()


@pytest.mark.parametrize("name", STAGES)
def test_online_stages_sample_from_the_plain_softmax(name, tiny_task_dir, tmp_path):
    """TRL fills the sampling options it leaves unset (min_p, typical_p, n-gram bans, ...) from the checkpoint's
    generation_config; our stages pin them to neutral, and the recipe's own generation_kwargs still win."""
    from transformers import GenerationConfig

    from rlhf_lm.modeling import load_causal_lm

    out = tmp_path / name
    run_stage(name, stage_args(tiny_task_dir, out, steps=1, generation_kwargs='{"min_new_tokens": 2}'))
    kwargs = json.loads((out / "metrics.json").read_text())["config"]["generation_kwargs"]
    assert kwargs["min_new_tokens"] == 2  # the recipe's
    model = load_causal_lm(str(tiny_task_dir / "base_policy"), dtype="float32")
    model.generation_config.update(min_p=0.5, typical_p=0.5, no_repeat_ngram_size=2, repetition_penalty=1.3)
    trl_side = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0)
    prepared, _ = model._prepare_generation_config(GenerationConfig(**{**trl_side, **kwargs}))  # what generate runs
    assert (prepared.min_p, prepared.typical_p, prepared.no_repeat_ngram_size, prepared.repetition_penalty) == (
        0.0, 1.0, 0, 1.0)


def test_reward_function_wraps_any_reward_model():
    fn = TRLRewardFunction(GoldReward(), "gold")
    prompt = "Describe the cat and the dog.\n"
    good, bad = fn([prompt, prompt], ["the cat is happy . the dog is kind .", "a cold rain ."])
    assert good > bad
    # conversational completions are scored on the reply's text
    chat = fn([[{"role": "user", "content": prompt}]], [[{"role": "assistant", "content": "the cat is happy ."}]])
    assert chat == [pytest.approx(GoldReward()([prompt], ["the cat is happy ."]).item())]
    # and a conversation reaches the reward model whole: system prompt and earlier turns, as messages
    seen = []
    recorder = TRLRewardFunction(lambda prompts, completions: seen.extend(zip(prompts, completions)) or
                                 torch.zeros(len(prompts)), "recorder")
    dialogue = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you?"}]
    recorder([dialogue], [[{"role": "assistant", "content": "fine, thanks"}]])
    assert seen == [(dialogue, "fine, thanks")]
    broken = TRLRewardFunction(lambda prompts, completions: torch.full((len(prompts),), float("nan")), "broken_scorer")
    with pytest.raises(RewardError, match="broken_scorer"):
        broken([prompt], ["x"])


@pytest.mark.slow
@pytest.mark.parametrize("name", STAGES)
def test_stage_improves_the_reward_on_the_task(name, task_dir, tmp_path):
    out = tmp_path / name
    run_stage(name, stage_args(task_dir, out, steps=60, per_device_train_batch_size=32, num_generations=8,
                               max_completion_length=40))
    history = [h["reward"] for h in json.loads((out / "metrics.json").read_text())["log_history"] if "reward" in h]
    first, last = torch.tensor(history[:10]).mean(), torch.tensor(history[-10:]).mean()
    print(f"{name}: gold reward, mean of the first 10 logged steps {first:.3f} -> last 10 {last:.3f}")
    assert last > first + 0.1, (first, last)
