"""`rlhf-lm evaluate` on a saved DPO policy: it reproduces the stage's own end-of-training evaluation."""

from __future__ import annotations

import json

import pytest
from test_dpo import tiny_cfg  # tests/ is on sys.path (no package)

from rlhf_lm.cli import main as cli_main
from rlhf_lm.configs import config_from_dict
from rlhf_lm.errors import ConfigError
from rlhf_lm.stages.dpo import run as run_dpo
from rlhf_lm.stages.evaluate import EvaluateStageConfig
from rlhf_lm.stages.evaluate import run as run_evaluate


@pytest.fixture(scope="module")
def dpo_run(tiny_task_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "policy"
    metrics = run_dpo(tiny_cfg(tiny_task_dir, out, max_steps=6, beta=0.2))
    return out, metrics


def test_evaluate_stage_reproduces_the_dpo_stage_evaluation(dpo_run, tiny_task_dir, tmp_path):
    policy_dir, trained = dpo_run
    cfg = config_from_dict(EvaluateStageConfig, dict(
        policy_path=str(policy_dir), output_dir=str(tmp_path / "eval"), num_prompts=8, max_new_tokens=12,
        pairs=str(tiny_task_dir / "data" / "pairs_eval.jsonl"), beta=0.2, max_length=96, reward_model="gold"))
    metrics = run_evaluate(cfg)
    # Same prompts, seed and models: the same samples, so the same win-rate, gold reward and KL.
    for key in ("eval/gold_win_rate", "eval/gold_reward/policy", "eval/gold_reward/reference", "eval/kl"):
        assert metrics[key] == pytest.approx(trained[key], abs=1e-5), key
    assert metrics["eval/win_rate"] == metrics["eval/gold_win_rate"]  # judged by "gold" too
    # Our trainer-free implicit reward agrees with TRL's DPOTrainer.evaluate() on the same held-out pairs.
    assert metrics["eval/implicit_accuracy"] == pytest.approx(trained["eval/implicit_accuracy"], abs=1e-6)
    assert metrics["eval/implicit_margin"] == pytest.approx(trained["eval/implicit_margin"], abs=1e-4)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["data"]["pairs"]["rows_out"] == 32
    assert len((tmp_path / "eval" / "samples.jsonl").read_text().splitlines()) == 8


def test_evaluate_cli_with_an_adapter_reference(dpo_run, tmp_path):
    """Policy vs itself loaded as the reference adapter: identical samples, zero KL, win-rate one half."""
    policy_dir, _ = dpo_run
    with pytest.raises(SystemExit) as exit_:
        cli_main(["evaluate", "--policy_path", str(policy_dir), "--reference_path", str(policy_dir),
                  "--output_dir", str(tmp_path / "eval"), "--num_prompts", "6", "--max_new_tokens", "10"])
    assert exit_.value.code == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["eval/gold_win_rate"] == 0.5 and metrics["eval/kl"] == pytest.approx(0.0, abs=1e-6)


def test_evaluate_needs_a_policy(tmp_path):
    with pytest.raises(ConfigError, match="policy_path"):
        run_evaluate(EvaluateStageConfig(output_dir=str(tmp_path / "eval")))
    with pytest.raises(ConfigError, match="beta"):
        EvaluateStageConfig(beta=0)


def test_evaluate_a_full_finetune_against_the_model_it_started_from(tiny_task_dir, tmp_path):
    trained = run_dpo(tiny_cfg(tiny_task_dir, tmp_path / "full", use_peft=False, max_steps=2, learning_rate=1e-4))
    assert not (tmp_path / "full" / "adapter_config.json").exists()
    metrics = run_evaluate(config_from_dict(EvaluateStageConfig, dict(
        policy_path=str(tmp_path / "full"), output_dir=str(tmp_path / "eval"), num_prompts=8, max_new_tokens=12)))
    for key in ("eval/gold_win_rate", "eval/kl", "eval/gold_reward/reference"):
        assert metrics[key] == pytest.approx(trained[key], abs=1e-5), key


def test_evaluate_reads_the_named_split_of_a_dataset_dir(dpo_run, tiny_task_dir, tmp_path):
    """prompts_split / pairs_split pick a split of a dataset (a Hub dataset's test split, a file in a dir): the
    task's data dir with its eval splits gives what the files themselves give; a missing split is a clear error."""
    policy_dir, _ = dpo_run
    common = dict(policy_path=str(policy_dir), num_prompts=6, max_new_tokens=8, beta=0.2, max_length=96)
    by_file = run_evaluate(config_from_dict(EvaluateStageConfig, dict(
        common, output_dir=str(tmp_path / "file"), prompts=str(tiny_task_dir / "data" / "prompts_eval.jsonl"),
        pairs=str(tiny_task_dir / "data" / "pairs_eval.jsonl"))))
    by_split = run_evaluate(config_from_dict(EvaluateStageConfig, dict(
        common, output_dir=str(tmp_path / "split"), prompts=str(tiny_task_dir / "data"),
        prompts_split="prompts_eval", pairs=str(tiny_task_dir / "data"), pairs_split="pairs_eval")))
    assert by_split == pytest.approx(by_file)
    with pytest.raises(Exception, match="prompts_test"):
        run_evaluate(config_from_dict(EvaluateStageConfig, dict(
            common, output_dir=str(tmp_path / "bad"), prompts=str(tiny_task_dir / "data"),
            prompts_split="prompts_test")))
    assert not (tmp_path / "bad").exists()
