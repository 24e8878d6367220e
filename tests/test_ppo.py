"""Our PPO trainer end to end on tiny models: learning, the one-base layout, resume, bad input, the stage."""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback, set_seed

from rlhf_lm.errors import ConfigError, DataError, RewardError
from rlhf_lm.ppo import PPOConfig, PPOTrainer
from rlhf_lm.ppo.trainer import tokenize_prompts
from rlhf_lm.rewards import FunctionReward, GoldReward


def read_prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines()]


def make_trainer(task: Path, tmp_path: Path, reward=None, callbacks=None, prompts=None, lora_dropout=0.05,
                 **overrides) -> PPOTrainer:
    from peft import get_peft_model

    from rlhf_lm.configs import ModelArguments
    from rlhf_lm.modeling import load_causal_lm, load_tokenizer, lora_config_from_args

    set_seed(0)  # LoRA's random init must not depend on what ran before
    tokenizer = load_tokenizer(str(task / "base_policy"), padding_side="left")
    model = load_causal_lm(str(task / "base_policy"), dtype="float32")
    model = get_peft_model(model, lora_config_from_args(ModelArguments(lora_r=8, lora_alpha=16,
                                                                       lora_dropout=lora_dropout)))
    settings = dict(output_dir=str(tmp_path / "run"), max_steps=2, rollout_batch_size=16,
                    per_device_train_batch_size=8, max_new_tokens=24, learning_rate=3e-3, logging_steps=1,
                    use_cpu=True, disable_tqdm=True, report_to="none", save_strategy="no", seed=0)
    settings.update(overrides)
    prompts = prompts if prompts is not None else read_prompts(task / "data" / "prompts_train.jsonl")
    return PPOTrainer(model, PPOConfig(**settings), tokenizer, reward or GoldReward(), prompts, callbacks=callbacks)


def trainable_state(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}


def base_state(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if not p.requires_grad}


# ------------------------------------------------------------------------------------------- learning + layout
def test_ppo_learns_changes_only_adapter_and_keeps_one_frozen_base(task_dir, tmp_path):
    # A dense, quickly learnable reward (shorter is better) keeps this default test short; the gold-task quality
    # run against a trained reward model is test_ppo_beats_the_reference_judged_by_gold (slow).
    brevity = FunctionReward(lambda prompt, completion: -len(completion.split()) / 10, name="brevity")
    trainer = make_trainer(task_dir, tmp_path, reward=brevity, max_steps=12, rollout_batch_size=32,
                           per_device_train_batch_size=16, max_new_tokens=40, normalize_scores=True,
                           lr_scheduler_type="constant", vf_coef=0.5, logging_steps=4)
    before_trainable, before_base = trainable_state(trainer), base_state(trainer)
    trainer.train()
    history = [h for h in trainer.state.log_history if "objective/scores" in h]
    first, last = history[0], history[-1]
    assert last["objective/scores"] > first["objective/scores"] + 0.2, history
    for key in ("objective/kl", "objective/rlhf_reward", "objective/entropy", "policy/clipfrac", "policy/approxkl",
                "policy/entropy", "val/vpred", "val/clipfrac", "val/error", "objective/kl_coef"):
        assert all(math.isfinite(h[key]) for h in history), key

    after = dict(trainer.unwrapped.named_parameters())
    changed = [n for n, p in before_trainable.items() if not torch.equal(p, after[n])]
    assert set(changed) == set(before_trainable), f"unchanged trainable params: {set(before_trainable) - set(changed)}"
    assert any("lora_" in n for n in changed) and any("value_head" in n for n in changed)
    assert all(torch.equal(p, after[n]) for n, p in before_base.items()), "the frozen base changed"
    del before_base

    # One copy of the base weights: no live tensor other than the model's own holds any base weight.
    gc.collect()
    base = {n: p for n, p in trainer.unwrapped.named_parameters() if not p.requires_grad}
    own_ptrs = {p.data_ptr() for p in base.values()}
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for obj in gc.get_objects():
        if torch.is_tensor(obj) and obj.dtype == torch.float32 and obj.data_ptr() not in own_ptrs:
            by_shape.setdefault(tuple(obj.shape), []).append(obj)
    copies = [n for n, p in base.items() for other in by_shape.get(tuple(p.shape), []) if torch.equal(other, p)]
    assert not copies, f"found a second copy of base weights: {copies[:5]}"


def test_reference_is_the_adapter_free_base(tiny_task_dir, tmp_path):
    from rlhf_lm.modeling import load_causal_lm

    trainer = make_trainer(tiny_task_dir, tmp_path, max_steps=1)
    trainer.train()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = trainer.unwrapped.reference_logits(ids, mask, 2)
        policy, _ = trainer.unwrapped(ids, mask, 2)
        fresh = load_causal_lm(str(tiny_task_dir / "base_policy"), dtype="float32")(input_ids=ids).logits[:, 1:-1]
    assert torch.allclose(ref, fresh, atol=1e-5)
    assert not torch.allclose(policy, fresh, atol=1e-5)  # the adapter did change the policy


# ------------------------------------------------------------------------------------------------------ resume
class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_resume_reproduces_the_uninterrupted_run(tiny_task_dir, tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, adaptive_kl=True, kl_target=0.5,
                  normalize_scores=True, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    full = make_trainer(tiny_task_dir, tmp_path / "full", **common)
    full.train()

    interrupted = make_trainer(tiny_task_dir, tmp_path / "resumed", callbacks=[StopAt(2)], **common)
    interrupted.train()
    assert interrupted.state.global_step == 2
    ckpt = tmp_path / "resumed" / "run" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file()

    resumed = make_trainer(tiny_task_dir, tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 4
    a, b = trainable_state(full), trainable_state(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert resumed.kl_ctl.value == pytest.approx(full.kl_ctl.value, abs=1e-9)
    assert resumed.kl_ctl.value != 0.05  # the adaptive controller moved, and its state carried over
    assert resumed.score_moments.count == full.score_moments.count
    assert resumed.counters == full.counters


def test_activation_checkpointing_recomputes_and_gives_the_same_update(tiny_task_dir, tmp_path):
    """Memory mode: the decoder layers recompute activations in the update, and the trained adapter and value
    head come out as without it."""
    plain = make_trainer(tiny_task_dir, tmp_path / "plain", max_steps=1)
    plain.train()
    checkpointed = make_trainer(tiny_task_dir, tmp_path / "ckpt", max_steps=1, activation_checkpointing=True)
    assert checkpointed.unwrapped.policy.is_activation_checkpointing
    assert not plain.unwrapped.policy.is_activation_checkpointing
    checkpointed.train()
    a, b = trainable_state(plain), trainable_state(checkpointed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_controller_callback_steers_ppo(tiny_task_dir, tmp_path):
    """The hyperparameter controller reaches PPO's optimizer and live KL coefficient through the callback events."""
    from rlhf_lm.controller import build_callback

    callback = build_callback({"policy": "rules", "interval": 1, "control_beta": True, "kl_target": 0.01},
                              stage="ppo")
    trainer = make_trainer(tiny_task_dir, tmp_path, callbacks=[callback], max_steps=4, kl_coef=0.05, kl_estimator="k3")
    trainer.train()
    assert callback.trainer is trainer
    assert trainer.kl_ctl.value != 0.05  # steered towards its KL target
    assert any(k.startswith("controller/") for h in trainer.state.log_history for k in h)


# -------------------------------------------------------------------------------------------------- bad input
def test_long_prompts_are_dropped_and_counted(tiny_task_dir, tmp_path):
    prompts = read_prompts(tiny_task_dir / "data" / "prompts_train.jsonl")[:40]
    long = ["Describe the cat " * 50 + "\n"] * 3
    trainer = make_trainer(tiny_task_dir, tmp_path, prompts=prompts + long, max_prompt_length=32)
    assert trainer.data_report.rows_in == 43 and trainer.data_report.rows_out == 40
    assert trainer.data_report.dropped == {"prompt over max_prompt_length=32 tokens": 3}
    assert all("cat " * 50 not in p for p in trainer.prompts)


def test_no_usable_prompts_is_a_clear_error(tiny_task_dir):
    from rlhf_lm.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_task_dir / "base_policy"))
    with pytest.raises(DataError, match="No usable prompts.*max_prompt_length"):
        tokenize_prompts(["Describe the cat " * 50], tokenizer, max_prompt_length=16)


def test_nan_reward_names_the_reward(tiny_task_dir, tmp_path):
    reward = FunctionReward(lambda p, c: float("nan"), name="broken_scorer")
    trainer = make_trainer(tiny_task_dir, tmp_path, reward=reward)
    with pytest.raises(RewardError, match="broken_scorer.*NaN"):
        trainer.train()


def test_missing_eos_is_penalised_and_counted(tiny_task_dir, tmp_path):
    # Two new tokens leave most completions without EOS; a reward of 0 makes the penalty the whole score.
    trainer = make_trainer(tiny_task_dir, tmp_path, reward=FunctionReward(lambda p, c: 0.0), max_steps=1,
                           max_new_tokens=2, missing_eos_penalty=2.0, kl_coef=0.0)
    logs = trainer.train()
    assert trainer.counters["missing_eos"] > 0
    assert logs["objective/no_eos_frac"] == pytest.approx(trainer.counters["missing_eos"] / 16)
    assert logs["objective/rlhf_reward"] == pytest.approx(-2.0 * logs["objective/no_eos_frac"], abs=1e-5)


class Events(TrainerCallback):
    """Records which TrainerCallback events arrive, and the trainer they name."""

    def __init__(self):
        self.names, self.trainers = [], set()

    def on_event(self, name, kwargs):
        self.names.append(name)
        self.trainers.add(id(kwargs.get("trainer")))

    def on_train_begin(self, args, state, control, **kwargs):
        self.on_event("train_begin", kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.on_event("log", kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        self.on_event("train_end", kwargs)


def test_callbacks_given_to_the_stage_or_added_later_get_the_events_as_in_trl(tiny_task_dir, tmp_path):
    from rlhf_lm.configs import parse_config
    from rlhf_lm.stages import STAGES
    from rlhf_lm.stages.common import log_history_recorder

    # After construction, as transformers' Trainer.add_callback does it; pop_callback takes it out again.
    trainer = make_trainer(tiny_task_dir, tmp_path, max_steps=2, logging_steps=1)
    added, removed = Events(), Events()
    trainer.add_callback(added)
    trainer.add_callback(removed)
    assert trainer.pop_callback(removed) is removed
    trainer.train()
    assert added.names == ["train_begin", "log", "log", "train_end"] and added.trainers == {id(trainer)}
    assert removed.names == []

    # Through the stage contract, as the pipeline runs it: its log-history recorder sees what metrics.json keeps.
    history, events = [], Events()
    cfg = parse_config(STAGES["ppo"].config_class, [
        "--model_name_or_path", str(tiny_task_dir / "base_policy"), "--reward_model", "gold",
        "--dataset_name", str(tiny_task_dir / "data" / "prompts_train.jsonl"), "--output_dir", str(tmp_path / "ppo"),
        "--max_steps", "2", "--logging_steps", "1", "--rollout_batch_size", "8", "--per_device_train_batch_size",
        "8", "--max_new_tokens", "8", "--use_cpu", "true", "--disable_tqdm", "true", "--lora_r", "4"])
    STAGES["ppo"].run(cfg, callbacks=[log_history_recorder(history), events])
    saved = json.loads((tmp_path / "ppo" / "metrics.json").read_text())["log_history"]
    assert len(history) == 2 and history == saved
    assert events.names == ["train_begin", "log", "log", "train_end"]


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="kl_estimator"):
        PPOConfig(output_dir="x", kl_estimator="k2", use_cpu=True)
    with pytest.raises(ConfigError, match="multiple of"):
        PPOConfig(output_dir="x", rollout_batch_size=10, per_device_train_batch_size=4, use_cpu=True)


# ------------------------------------------------------------------------------------------------------ stage
def test_ppo_stage_writes_adapter_value_head_and_metrics(tiny_task_dir, tmp_path):
    from rlhf_lm.stages import ppo

    out = tmp_path / "ppo"
    ppo.main(["--model_name_or_path", str(tiny_task_dir / "base_policy"),
              "--dataset_name", str(tiny_task_dir / "data" / "prompts_train.jsonl"), "--reward_model", "gold",
              "--output_dir", str(out), "--max_steps", "2", "--rollout_batch_size", "8",
              "--per_device_train_batch_size", "8", "--max_new_tokens", "16", "--use_cpu", "true",
              "--disable_tqdm", "true", "--lora_r", "4"])
    for name in ("adapter_model.safetensors", "adapter_config.json", "value_head.safetensors", "tokenizer.json",
                 "metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["num_processes"] == 1 and metrics["run"]["episodes"] == 16
    assert "objective/kl" in metrics["metrics"] and metrics["log_history"]
    assert metrics["data"]["train"]["rows_out"] > 0
    assert not (tmp_path / "ppo.partial").exists()
    assert str(tmp_path) not in json.dumps({k: v for k, v in metrics.items() if k != "config"})


def test_ppo_stage_rejects_full_finetuning_and_missing_reward(tiny_task_dir, tmp_path):
    from rlhf_lm.configs import parse_config
    from rlhf_lm.stages import ppo

    with pytest.raises(ConfigError, match="use_peft"):
        parse_config(ppo.PPOStageConfig, ["--use_peft", "false", "--output_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="reward_model"):
        ppo.main(["--model_name_or_path", str(tiny_task_dir / "base_policy"), "--output_dir", str(tmp_path / "o"),
                  "--dataset_name", str(tiny_task_dir / "data" / "prompts_train.jsonl"), "--use_cpu", "true"])


# ------------------------------------------------------------------------------------------------ quality (slow)
@pytest.mark.slow
def test_ppo_beats_the_reference_judged_by_gold(task_dir, tmp_path):
    """The acceptance run: reward model trained on the noisy pairs only, PPO with the builtin recipe, then the
    policy vs its reference (adapters off) on held-out prompts, judged by the gold reward."""
    from peft import PeftModel

    from rlhf_lm.configs import parse_config
    from rlhf_lm.evaluation import evaluate_policy
    from rlhf_lm.modeling import load_causal_lm, load_tokenizer
    from rlhf_lm.rewards import load_reward
    from rlhf_lm.stages import ppo
    from rlhf_lm.stages import reward as reward_stage

    recipes = Path(__file__).resolve().parents[1] / "recipes" / "builtin"
    rm = tmp_path / "reward"
    reward_stage.run(parse_config(reward_stage.CONFIG, [
        "--config", str(recipes / "reward.yaml"), "--model_name_or_path", str(task_dir / "base_policy"),
        "--dataset_name", str(task_dir / "data"), "--output_dir", str(rm), "--use_cpu", "true"]))
    out = tmp_path / "ppo"
    metrics = ppo.run(parse_config(ppo.CONFIG, [
        "--config", str(recipes / "ppo.yaml"), "--model_name_or_path", str(task_dir / "base_policy"),
        "--dataset_name", str(task_dir / "data" / "prompts_train.jsonl"), "--reward_model", str(rm),
        "--output_dir", str(out), "--use_cpu", "true"]))
    assert math.isfinite(metrics["objective/kl"])

    tokenizer = load_tokenizer(str(task_dir / "base_policy"), padding_side="left")
    policy = PeftModel.from_pretrained(load_causal_lm(str(task_dir / "base_policy"), dtype="float32"), str(out))
    result = evaluate_policy(policy, tokenizer, read_prompts(task_dir / "data" / "prompts_eval.jsonl"),
                             load_reward(str(rm)), gold=True, seed=0, max_new_tokens=40)
    print(result)
    assert result["eval/gold_win_rate"] >= 0.65, result
    assert result["eval/gold_reward/policy"] > result["eval/gold_reward/reference"]
    assert math.isfinite(result["eval/kl"])


# ---------------------------------------------------------------------------------- what a real checkpoint shows
def test_dropout_is_off_so_every_ratio_starts_at_one(tiny_task_dir, tmp_path):
    """At learning rate 0 the update passes must reproduce the rollout's log-probs exactly; with LoRA dropout left
    on in the updates (and off in the rollouts) they did not (SmolLM2: approxkl 2e-2, 12.5% of tokens clipped)."""
    trainer = make_trainer(tiny_task_dir, tmp_path, lora_dropout=0.3, learning_rate=0.0, max_steps=1,
                           vf_coef=0.0)
    with torch.no_grad():  # LoRA B starts at 0, where dropout on the adapter's input has nothing to drop
        for name, param in trainer.unwrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    trainer.train()
    step = trainer.state.log_history[-1]
    assert step["policy/clipfrac"] == 0.0 and step["policy/approxkl"] < 1e-9, step


def test_logits_come_from_the_models_own_forward(tmp_path):
    """Gemma-2 soft-caps its final logits inside its forward: trunk + lm_head would skip that."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Gemma2Config

    from rlhf_lm.ppo.model import PolicyWithValueHead

    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    policy = get_peft_model(base, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    model = PolicyWithValueHead(policy).eval()
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    start = 8
    logits, values = model(ids, mask, start)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, start - 1:-1]
    torch.testing.assert_close(logits, expected)
    assert logits.abs().max() <= 0.5  # capped
    assert values.shape == (2, 12 - start)
    with policy.disable_adapter():
        reference = policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, start - 1:-1]
    torch.testing.assert_close(model.reference_logits(ids, mask, start), reference)
    assert not torch.allclose(reference, expected)  # the adapter does act


def test_evaluation_leaves_the_training_rng_alone_and_reports_kl_per_token(tiny_task_dir, tmp_path):
    from rlhf_lm.ppo.rollout import collect_rollout
    from rlhf_lm.sampling import seeded

    trainer = make_trainer(tiny_task_dir, tmp_path, max_steps=2)
    trainer.train()  # the policy has moved from the reference: KL > 0
    prompts = read_prompts(tiny_task_dir / "data" / "prompts_eval.jsonl")[:8]
    trainer.eval_prompts = tokenize_prompts(prompts, trainer.tokenizer, trainer.args.max_prompt_length)[:2]
    before = torch.get_rng_state()
    metrics = trainer.evaluate()
    assert torch.equal(torch.get_rng_state(), before)

    # eval/kl means what it means in rlhf_lm.evaluation: nats per completion token, averaged over samples
    with seeded(trainer.args.seed, torch.device("cpu")):
        rollout = collect_rollout(trainer.unwrapped, trainer.tokenizer, *trainer.eval_prompts, trainer.reward_model,
                                  trainer.args, trainer.args.per_device_eval_batch_size)
    mask = rollout.response_mask.float()
    per_token = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(1) / mask.sum(1)
    assert metrics["eval/kl"] == pytest.approx(per_token.mean().item(), rel=1e-5)
    assert metrics["eval/kl"] > 0


def test_the_reward_model_gets_prompts_as_the_data_has_them(tiny_task_dir, tmp_path):
    """Conversations reach the reward model as messages (a classifier then lays them out as in its training, with
    its own chat template), not as the policy's chat-templated string."""
    seen: list = []

    def record(prompts, completions):
        seen.extend(prompts)
        return torch.zeros(len(prompts))

    chats = [[{"role": "system", "content": "be kind"}, {"role": "user", "content": p}]
             for p in read_prompts(tiny_task_dir / "data" / "prompts_train.jsonl")[:16]]
    trainer = make_trainer(tiny_task_dir, tmp_path, reward=FunctionReward(record, batched=True), prompts=chats,
                           max_steps=1)
    trainer.train()
    assert len(seen) == 16 and all(p in chats for p in seen)


def test_full_kl_penalises_in_the_reward_and_the_loss(tiny_task_dir, tmp_path):
    """kl_estimator: full puts the exact per-position KL into the rewards and its direct gradient into the loss;
    objective/kl stays the sampled k1 sum, so it reads the same whatever the estimator."""
    trainer = make_trainer(tiny_task_dir, tmp_path, max_steps=2, kl_estimator="full", kl_coef=0.1)
    before = trainable_state(trainer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "objective/kl" in h]
    assert len(logs) == 2 and all(math.isfinite(h["objective/kl"]) for h in logs)
    assert logs[0]["objective/kl_exact"] == pytest.approx(0.0, abs=1e-5)  # the first rollout is the reference
    assert logs[1]["objective/kl_exact"] > 0 and logs[1]["loss/kl"] >= 0
    after = trainable_state(trainer)
    assert all(not torch.equal(before[n], after[n]) for n in before)


def test_target_kl_stops_the_update_epochs_early(tiny_task_dir, tmp_path):
    """An epoch whose mean approximate KL passes target_kl ends the iteration's updates (all ranks together)."""
    runs = {}
    for name, target in (("full", None), ("early", 1e-9)):
        trainer = make_trainer(tiny_task_dir, tmp_path / name, max_steps=2, num_ppo_epochs=3, target_kl=target)
        trainer.train()
        runs[name] = [h["ppo/epochs"] for h in trainer.state.log_history if "ppo/epochs" in h]
    assert runs == {"full": [3.0, 3.0], "early": [1.0, 1.0]}
    with pytest.raises(ConfigError, match="target_kl"):
        PPOConfig(output_dir="x", target_kl=0.0)
