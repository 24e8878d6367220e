"""The controller's final state and its decision history reach a stage's metrics.json and the model card."""

from __future__ import annotations

import json
import math

import pytest
from test_dpo import tiny_cfg

from rlhf_lm.hub import model_card
from rlhf_lm.stages.dpo import run


def test_dpo_stage_writes_the_controller_into_metrics_and_the_model_card(tiny_task_dir, tmp_path):
    out = tmp_path / "dpo"
    cfg = tiny_cfg(tiny_task_dir, out, max_steps=6, eval_prompts=None, eval_num_prompts=1, eval_gold=False,
                   controller={"policy": "online", "interval": 2, "probe_steps": 1, "val_batch_size": 16,
                               "compute_budget": 3.0, "control_beta": True})
    run(cfg)

    controller = json.loads((out / "metrics.json").read_text())["controller"]
    final, history = controller["final"], controller["history"]
    assert controller["policy"] == "online" and controller["objective"] == "loss"
    assert final["probes"] >= 1 and final["decisions"] == len(history) >= 2  # no rollbacks on this run
    assert [h["step"] for h in history] == sorted(h["step"] for h in history)
    assert final["lr_multiplier"] == pytest.approx(math.prod(h["lr_factor"] for h in history))
    assert final["lr_multiplier"] == history[-1]["lr_multiplier"]
    assert final["learning_rate"] == pytest.approx(cfg.learning_rate * final["lr_multiplier"])
    assert final["beta"] == pytest.approx(cfg.beta * final["beta_multiplier"])
    assert final["layer_group"] == "all"

    card = model_card(out, "someone/tiny-dpo")
    section = card.split("## Controller", 1)[1].split("\n## ", 1)[0]
    assert "policy `online`" in section
    assert f"final LR {final['learning_rate']:.4g}" in section
    assert f"final beta / KL coefficient {final['beta']:.4g}" in section
    assert f"{final['decisions']} decisions (probes: {final['probes']}, rollbacks: 0)" in section


def test_ppo_stage_writes_the_controller_into_metrics(tiny_task_dir, tmp_path):
    """Our PPO trainer: the objective is the logged reward and the steered coefficient is PPO's live KL coefficient."""
    from rlhf_lm.stages import ppo

    out = tmp_path / "ppo"
    ppo.main(["--model_name_or_path", str(tiny_task_dir / "base_policy"),
              "--dataset_name", str(tiny_task_dir / "data" / "prompts_train.jsonl"), "--reward_model", "gold",
              "--output_dir", str(out), "--max_steps", "3", "--rollout_batch_size", "8", "--logging_steps", "1",
              "--per_device_train_batch_size", "8", "--max_new_tokens", "8", "--use_cpu", "true", "--kl_coef", "0.05",
              "--disable_tqdm", "true", "--lora_r", "4", "--controller",
              json.dumps({"policy": "rules", "interval": 1, "control_lr": False, "control_beta": True,
                          "kl_target": 1e-4, "kl_horizon": 1.0})])
    metrics = json.loads((out / "metrics.json").read_text())
    controller, final = metrics["controller"], metrics["controller"]["final"]
    assert controller["policy"] == "rules" and controller["objective"] == "reward"
    assert final["decisions"] == len(controller["history"]) == 2  # after steps 1 and 2 of 3
    assert final["beta_multiplier"] == pytest.approx(math.prod(h["beta_factor"] for h in controller["history"]))
    assert final["beta_multiplier"] != 1.0 and final["beta"] == pytest.approx(0.05 * final["beta_multiplier"])
    assert final["lr_multiplier"] == 1.0  # control_lr: false
    assert "controller/beta" in metrics["log_history"][-1]  # logged in the trainer's own log lines too
    assert f"final beta / KL coefficient {final['beta']:.4g}" in model_card(out, "someone/tiny-ppo")


def test_reward_and_rloo_stages_write_the_controller_into_metrics(tiny_task_dir, tmp_path):
    """TRL's RewardTrainer (a held-out loss) and RLOOTrainer (the logged reward; GRPO runs the same stage code)."""
    from test_grpo_rloo import run_stage, stage_args
    from test_reward_stage import stage_config

    from rlhf_lm.stages import reward as reward_stage

    rules = {"policy": "rules", "interval": 1, "val_batch_size": 8}
    reward_stage.run(stage_config(tiny_task_dir, tmp_path / "reward", max_steps=2, controller=rules))
    run_stage("rloo", stage_args(tiny_task_dir, tmp_path / "rloo", steps=2, controller=json.dumps(rules)))
    for name, objective in (("reward", "loss"), ("rloo", "reward")):
        controller = json.loads((tmp_path / name / "metrics.json").read_text())["controller"]
        assert controller["policy"] == "rules" and controller["objective"] == objective, name
        assert controller["final"]["decisions"] == len(controller["history"]) == 1, name  # after step 1 of 2
        assert math.isfinite(controller["history"][0]["objective"]), name


def test_no_controller_section_without_a_controller(tmp_path):
    from rlhf_lm.json_files import write_json

    write_json(tmp_path / "metrics.json", {"metrics": {"train/loss": 0.5}, "config": {}})
    assert "## Controller" not in model_card(tmp_path, "someone/plain")
