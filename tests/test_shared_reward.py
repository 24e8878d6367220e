"""A reward-stage LoRA reward model on the policy's own base (rlhf_lm.shared_reward): the same scores as the separate
model, the same PPO / GRPO runs, a reward adapter that never changes and is never saved as trained, resume, the
stage outputs and model card, and every fallback to a separate model with its reason in the log.

"Separate" in the exactness checks is the reward model loaded unmerged (``merge=False``): the same arithmetic as the
shared adapter, so runs must agree bit for bit. The default separate loader merges the adapter into its base, which
moves scores by float rounding only (checked here at 1e-5; measured in benchmarks/shared_reward.py).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, set_seed

from rlhf_lm.ppo import PPOConfig, PPOTrainer
from rlhf_lm.rewards import ClassifierReward
from rlhf_lm.shared_reward import SharedBaseReward, last_non_pad_index, load_reward_for_policy


def read_prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reward_dir(tiny_task_dir, tmp_path_factory) -> Path:
    """The natural case: the task's reward stage trained a LoRA reward model on the task's base policy."""
    from rlhf_lm.configs import config_from_dict
    from rlhf_lm.stages import reward as reward_stage

    out = tmp_path_factory.mktemp("shared_rm") / "reward"
    reward_stage.run(config_from_dict(reward_stage.RewardStageConfig, dict(
        model_name_or_path=str(tiny_task_dir / "base_policy"), dataset_name=str(tiny_task_dir / "data"),
        dataset_train_split="pairs_train", dataset_eval_split="pairs_eval", output_dir=str(out), learning_rate=3e-3,
        num_train_epochs=1, per_device_train_batch_size=16, logging_steps=1000, save_strategy="no",
        disable_tqdm=True, use_cpu=True, seed=0, report_to="none"), "test"))
    return out


def policy_and_tokenizer(base: Path, targets: list[str] | None = None):
    from peft import get_peft_model

    from rlhf_lm.configs import ModelArguments
    from rlhf_lm.modeling import load_causal_lm, load_tokenizer, lora_config_from_args

    set_seed(0)
    tokenizer = load_tokenizer(str(base), padding_side="left")
    args = ModelArguments(lora_r=8, lora_alpha=16, lora_target_modules=targets or ["all-linear"])
    return get_peft_model(load_causal_lm(str(base), dtype="float32"), lora_config_from_args(args)), tokenizer


def snapshot(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


# --------------------------------------------------------------------------------------------------- scores
def test_shared_scores_are_the_separate_models_and_scoring_leaves_the_policy_as_it_was(reward_dir, tiny_task_dir):
    policy, tokenizer = policy_and_tokenizer(tiny_task_dir / "base_policy")
    with torch.no_grad():  # a policy adapter that acts, and one LoRA group frozen the way the controller freezes
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    frozen = next(p for n, p in policy.named_parameters() if "layers.0" in n and "lora_A" in n)
    frozen.requires_grad_(False)
    rng = torch.get_rng_state()
    reward, layout = load_reward_for_policy(str(reward_dir), policy, tokenizer)
    assert isinstance(reward, SharedBaseReward) and layout["shared_base"] and layout["adapter_name"] == "reward"
    assert torch.equal(torch.get_rng_state(), rng)  # loading it drew nothing from the run's random stream
    assert list(reward.model.parameters()) == list(reward.model.score.parameters())  # no second base to move

    prompts = read_prompts(tiny_task_dir / "data" / "prompts_eval.jsonl")[:24]
    completions = ["the cat is happy .", "a cold rain .", "", "the dog is kind . the cat is happy ."] * 6
    chats = [[{"role": "system", "content": "be kind"}, {"role": "user", "content": p}] for p in prompts]
    flags = {n: p.requires_grad for n, p in policy.named_parameters()}
    policy.train()
    shared = torch.cat([reward(prompts, completions), reward(chats, completions)])
    assert policy.training and all(m.training for m in policy.modules())
    assert {n: p.requires_grad for n, p in policy.named_parameters()} == flags
    assert policy.active_adapter == "default" and not any(p.requires_grad for p in reward.adapter_parameters().values())

    unmerged = ClassifierReward.from_pretrained(reward_dir, merge=False, device="cpu")
    merged = ClassifierReward.from_pretrained(reward_dir, device="cpu")
    separate = torch.cat([unmerged(prompts, completions), unmerged(chats, completions)])
    assert torch.equal(shared, separate)
    torch.testing.assert_close(shared, torch.cat([merged(prompts, completions), merged(chats, completions)]),
                               rtol=0, atol=1e-5)
    assert shared.std() > 0

    # The policy itself is untouched by the adapter beside it: the same logits as without it.
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        with_reward = policy(input_ids=ids).logits
        policy.delete_adapter("reward")
        assert torch.equal(with_reward, policy(input_ids=ids).logits)


def test_last_non_pad_index_is_where_the_classifier_reads():
    ids = torch.tensor([[4, 5, 6, 0, 0], [4, 0, 5, 6, 7], [0, 0, 0, 0, 0]])
    assert last_non_pad_index(ids, 0).tolist() == [2, 4, 0]


# ------------------------------------------------------------------------------------------------------ PPO
class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == self.step
        return control


def ppo_trainer(task: Path, out: Path, reward_dir: Path, shared: bool, callbacks=None, **overrides) -> PPOTrainer:
    """PPO on the task's base; the policy adapter targets q/v only, so the reward adapter (all linear layers) also
    wraps modules the policy does not touch."""
    policy, tokenizer = policy_and_tokenizer(task / "base_policy", targets=["q_proj", "v_proj"])
    if shared:
        reward, _ = load_reward_for_policy(str(reward_dir), policy, tokenizer)
        assert isinstance(reward, SharedBaseReward)
    else:
        reward = ClassifierReward.from_pretrained(reward_dir, merge=False, device="cpu")
    settings = dict(output_dir=str(out), max_steps=4, rollout_batch_size=16, per_device_train_batch_size=8,
                    max_new_tokens=16, learning_rate=3e-3, logging_steps=1, use_cpu=True, disable_tqdm=True,
                    report_to="none", save_strategy="steps", save_steps=2, normalize_scores=True, seed=0,
                    num_ppo_epochs=2)
    settings.update(overrides)
    return PPOTrainer(policy, PPOConfig(**settings), tokenizer, reward,
                      read_prompts(task / "data" / "prompts_train.jsonl"), callbacks=callbacks)


def trainable(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}


def test_ppo_with_the_shared_reward_is_the_run_with_a_separate_one(reward_dir, tiny_task_dir, tmp_path):
    """Same seed: identical logs (scores, losses, KL, ...) and identical trained weights, shared vs separate. The
    reward adapter is in no optimizer, never gets a gradient, comes out bit-identical, and is saved nowhere."""
    shared = ppo_trainer(tiny_task_dir, tmp_path / "shared", reward_dir, shared=True)
    adapter_before = snapshot(shared.reward_model.adapter_parameters())
    in_optimizer = {id(p) for group in shared.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in in_optimizer for p in shared.reward_model.adapter_parameters().values())
    shared.train()
    separate = ppo_trainer(tiny_task_dir, tmp_path / "separate", reward_dir, shared=False)
    separate.train()

    assert shared.state.log_history == separate.state.log_history
    a, b = trainable(shared), trainable(separate)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    after = shared.reward_model.adapter_parameters()
    assert all(torch.equal(adapter_before[n], after[n]) for n in adapter_before)
    assert all(p.grad is None for p in after.values())

    # checkpoints and the saved model hold the policy adapter (and value head) only
    shared.save_model(tmp_path / "final")
    for folder in (tmp_path / "shared" / "checkpoint-2", tmp_path / "final"):
        assert not (folder / "reward").exists(), sorted(p.name for p in folder.iterdir())
        saved = load_file(folder / "adapter_model.safetensors")
        assert not any("score" in k for k in saved) and {k.split(".")[-3] for k in saved if "lora_" in k} == {
            "q_proj", "v_proj"}
        assert json.loads((folder / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"

    # resume from checkpoint-2 with the shared layout: the uninterrupted run again
    resumed = ppo_trainer(tiny_task_dir, tmp_path / "resumed", reward_dir, shared=True)
    resumed.train(resume_from_checkpoint=str(tmp_path / "shared" / "checkpoint-2"))
    c = trainable(resumed)
    assert all(torch.equal(a[n], c[n]) for n in a)
    assert resumed.state.log_history == shared.state.log_history


# ---------------------------------------------------------------------------------------------- fallbacks
def copy_base(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", ["opt_out", "weights", "config", "chat_template", "not_an_adapter", "not_lora"])
def test_a_reward_model_that_cannot_share_is_loaded_separately_and_the_log_says_why(
        case, reward_dir, tiny_task_dir, tmp_path, caplog):
    from rlhf_lm.modeling import build_tiny_model, load_causal_lm

    base = tiny_task_dir / "base_policy"
    spec, share = str(reward_dir), True
    if case == "weights":  # the same config and tokenizer, one tensor changed: only the weights digest tells
        base = copy_base(base, tmp_path / "base")
        weights = load_file(base / "model.safetensors")
        weights["model.norm.weight"] = weights["model.norm.weight"] * 1.01
        save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    elif case == "config":
        from rlhf_lm.modeling import load_tokenizer

        base = build_tiny_model(tmp_path / "base", [], tokenizer=load_tokenizer(str(base)), hidden_size=32)
    elif case == "chat_template":
        base = copy_base(base, tmp_path / "base")
        (base / "chat_template.jinja").write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    policy, tokenizer = policy_and_tokenizer(base)
    if case == "opt_out":
        share = False
    elif case == "not_an_adapter":
        spec = "gold"
    elif case == "not_lora":
        policy = load_causal_lm(str(base), dtype="float32")
    with caplog.at_level(logging.INFO, logger="rlhf_lm.shared_reward"):
        reward, layout = load_reward_for_policy(spec, policy, tokenizer, share=share)
    assert not isinstance(reward, SharedBaseReward) and layout["shared_base"] is False
    expected = {"opt_out": "share_reward_base: false", "weights": "base weights differ", "config": "hidden_size",
                "chat_template": "chat templates differ", "not_an_adapter": "not a reward-stage LoRA adapter",
                "not_lora": "not a LoRA"}[case]
    assert expected in layout["reason"]
    if case != "not_an_adapter":
        assert expected in caplog.text and "separate model" in caplog.text
    assert "reward" not in getattr(policy, "peft_config", {})  # nothing was attached


def test_a_reward_adapter_without_its_base_fails_before_the_policy_loads(reward_dir, tmp_path):
    from rlhf_lm.errors import ArtifactError
    from rlhf_lm.shared_reward import resolve_reward

    moved = Path(shutil.copytree(reward_dir, tmp_path / "reward"))
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/nowhere/base"}))
    metrics = json.loads((moved / "metrics.json").read_text())
    (moved / "metrics.json").write_text(json.dumps({**metrics, "run": {**metrics["run"], "base_model_relative": None}}))
    with pytest.raises(ArtifactError, match="Cannot find the base model"):
        resolve_reward(str(moved))


# ------------------------------------------------------------------------------------------ stages, card
def test_ppo_stage_records_the_layout_and_the_model_card_says_it_was_shared(reward_dir, tiny_task_dir, tmp_path):
    from rlhf_lm.hub import files_to_push, model_card
    from rlhf_lm.stages import ppo

    common = ["--model_name_or_path", str(tiny_task_dir / "base_policy"), "--reward_model", str(reward_dir),
              "--dataset_name", str(tiny_task_dir / "data" / "prompts_train.jsonl"), "--max_steps", "1",
              "--rollout_batch_size", "8", "--per_device_train_batch_size", "8", "--max_new_tokens", "8",
              "--use_cpu", "true", "--disable_tqdm", "true", "--lora_r", "4"]
    ppo.main([*common, "--output_dir", str(tmp_path / "shared")])
    ppo.main([*common, "--output_dir", str(tmp_path / "separate"), "--share_reward_base", "false"])
    layouts = {name: json.loads((tmp_path / name / "metrics.json").read_text())["run"]["reward_layout"]
               for name in ("shared", "separate")}
    assert layouts["shared"]["shared_base"] and len(layouts["shared"]["base_sha256"]) == 64
    assert layouts["separate"] == {"shared_base": False, "reason": "share_reward_base: false"}
    assert str(tmp_path) not in json.dumps(layouts)

    out = tmp_path / "shared"
    assert {rel for _, rel in files_to_push(out)} >= {"adapter_model.safetensors", "value_head.safetensors"}
    assert not any(rel.startswith("reward/") for _, rel in files_to_push(out))
    card = model_card(out, "me/ppo-run")
    assert "**Reward model of this run:** shared" in card and layouts["shared"]["base_sha256"][:16] in card
    assert "a separate model (share_reward_base: false)" in model_card(tmp_path / "separate", "me/ppo-run")


UNMERGED = """from rlhf_lm.rewards import ClassifierReward


class Unmerged(ClassifierReward):
    def __init__(self):
        self.__dict__.update(vars(ClassifierReward.from_pretrained({path!r}, merge=False, device="cpu")))
"""


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_online_stages_share_the_reward_base_and_train_as_with_a_separate_one(name, reward_dir, tiny_task_dir,
                                                                              tmp_path):
    """GRPO / RLOO through their reward-function wrapper, same seed: the shared reward adapter and the separate
    (unmerged) reward model give the same logged rewards, losses and grad norms, bit for bit; checkpoints and the
    output hold the policy adapter only."""
    import importlib

    from rlhf_lm.configs import parse_config

    module = importlib.import_module(f"rlhf_lm.stages.{name}")
    spec = tmp_path / "unmerged.py"
    spec.write_text(UNMERGED.format(path=str(reward_dir)))
    args = {"model_name_or_path": tiny_task_dir / "base_policy",
            "dataset_name": tiny_task_dir / "data" / "prompts_train.jsonl", "max_steps": 2,
            "per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 12, "logging_steps": 1,
            "use_cpu": "true", "disable_tqdm": "true", "save_strategy": "steps", "save_steps": 1,
            "learning_rate": 3e-3, "lora_r": 4, "lora_alpha": 8, "seed": 0}
    runs = {}
    for layout, reward in (("shared", reward_dir), ("separate", f"{spec}:Unmerged")):
        argv = {**args, "output_dir": tmp_path / layout, "reward_model": reward}
        module.run(parse_config(module.CONFIG, [part for k, v in argv.items() for part in (f"--{k}", str(v))]))
        runs[layout] = json.loads((tmp_path / layout / "metrics.json").read_text())
    assert runs["shared"]["run"]["reward_layout"]["shared_base"] and not runs["separate"]["run"]["reward_layout"]["shared_base"]
    steps = {k: [h for h in v["log_history"] if "reward" in h] for k, v in runs.items()}
    assert len(steps["shared"]) == 2
    for a, b in zip(steps["shared"], steps["separate"], strict=True):
        for key in ("reward", "reward_std", "loss", "grad_norm", "entropy", "completions/mean_length"):
            assert a[key] == b[key], key
    assert not (tmp_path / "shared" / "reward").exists()
    checkpoint = tmp_path / "shared" / "checkpoint-1"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "reward").exists()
    final = load_file(tmp_path / "shared" / "adapter_model.safetensors")
    assert final and not any("score" in k for k in final)
    separate = load_file(tmp_path / "separate" / "adapter_model.safetensors")
    assert final.keys() == separate.keys() and all(torch.equal(final[k], separate[k]) for k in final)
