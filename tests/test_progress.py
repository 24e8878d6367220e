"""Progress a person can read: each stage shows its key metrics (a bar on a terminal, a few lines elsewhere), never
transformers' raw dict logs, and a pipeline prints one line per finished stage."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from rlhf_lm.configs import config_from_dict
from rlhf_lm.progress import (
    LINES_PER_STAGE,
    StageProgress,
    format_metrics,
    format_value,
    key_metrics,
    short_names,
    shown_metrics,
    stage_summary,
)
from rlhf_lm.stages import STAGES


def test_numbers_read_at_four_significant_digits():
    assert format_value(0.693147) == "0.6931"
    assert format_value(1.23456e-5) == "1.235e-05"
    assert format_value(1076.0) == "1076"  # counts logged as floats
    assert format_value(7) == "7" and format_value(float("nan")) == "nan" and format_value("x") == "x"
    assert format_metrics({"loss": 0.5, "rewards/accuracies": 0.75}) == "loss=0.5  rewards/accuracies=0.75"


def test_only_the_stages_key_metrics_are_shown_and_evaluations_keep_their_prefix():
    names = key_metrics("dpo")
    assert names == STAGES["dpo"].curves
    train = {"loss": 0.6, "grad_norm": 0.3, "rewards/accuracies": 0.7, "rewards/margins": 0.2, "logps/chosen": -30.0}
    assert shown_metrics(train, names) == {"loss": 0.6, "rewards/accuracies": 0.7, "rewards/margins": 0.2}
    evaluation = {"eval_loss": 0.55, "eval_rewards/accuracies": 0.71, "eval_runtime": 1.2}
    assert shown_metrics(evaluation, names) == {"eval_loss": 0.55, "eval_rewards/accuracies": 0.71}
    assert shown_metrics({"loss": 1.0}, names, limit=0) == {}
    assert key_metrics("task") == ("loss",)  # no curves worth a plot, but its loss is worth watching
    assert key_metrics("mypkg.score") == ("loss", "reward", "kl")  # a custom stage: the default curves


def test_a_bar_shows_the_last_part_of_each_name_where_that_stays_unambiguous():
    ppo = {"objective/rlhf_reward": 0.2, "objective/scores": 0.5, "objective/kl": 1.7, "policy/clipfrac": 0.01}
    assert list(short_names(ppo)) == ["rlhf_reward", "scores", "kl", "clipfrac"]
    assert list(short_names({"eval_rewards/margins": 0.5, "eval_loss": 0.6})) == ["eval_margins", "eval_loss"]
    assert list(short_names({"policy/entropy": 1.0, "objective/entropy": 2.0})) == ["policy/entropy",
                                                                                      "objective/entropy"]


def test_a_finished_stage_reads_as_one_line_with_its_summary_metrics():
    metrics = {"reward/accuracy": 0.7525, "reward/gold_accuracy": 0.88889, "reward/ece": 0.05, "train/loss": 0.5}
    line = stage_summary("reward", "reward", metrics, "done in 33 s")
    assert line == "reward     done in 33 s      held-out accuracy 0.7525, gold accuracy 0.8889"
    assert stage_summary("score", "mypkg.score", {"a": 1.5, "b": "text"}) == "score      done              a 1.5"


def _state(step: int, max_steps: int = 100) -> SimpleNamespace:
    return SimpleNamespace(is_world_process_zero=True, global_step=step, max_steps=max_steps)


def test_without_a_terminal_a_stage_prints_about_ten_lines_and_every_evaluation(capsys):
    args = SimpleNamespace(disable_tqdm=False)
    progress = StageProgress("dpo", key_metrics("dpo"), bar=False)
    progress.on_train_begin(args, _state(0), None)
    for step in range(1, 101):
        progress.on_log(args, _state(step), None, logs={"loss": 1 / step, "grad_norm": 0.1, "epoch": step / 100})
    progress.on_log(args, _state(100), None, logs={"eval_loss": 0.25, "eval_runtime": 3.0})
    progress.on_log(args, _state(100), None, logs={"train_runtime": 9.0, "train_loss": 0.3})  # the closing log
    progress.on_train_end(args, _state(100), None)
    lines = capsys.readouterr().out.splitlines()
    assert LINES_PER_STAGE <= len(lines) <= LINES_PER_STAGE + 2
    assert lines[0] == "dpo        step   1/100  loss=1"
    assert lines[-2] == "dpo        step 100/100  loss=0.01"
    assert lines[-1] == "dpo        step 100/100  eval_loss=0.25"
    assert not any("grad_norm" in line or "train_runtime" in line for line in lines)


def test_on_a_terminal_one_bar_carries_the_key_metrics(capsys):
    args = SimpleNamespace(disable_tqdm=False)
    progress = StageProgress("reward", key_metrics("reward"), bar=True)
    progress.on_train_begin(args, _state(0, max_steps=4), None)
    for step in range(1, 5):
        progress.on_step_end(args, _state(step, max_steps=4), None)
        progress.on_log(args, _state(step, max_steps=4), None, logs={"loss": 0.5, "accuracy": 0.75, "num_tokens": 9.0})
    for _ in range(3):  # an evaluation's batches: a second bar while it runs, gone when it ends
        progress.on_prediction_step(args, _state(4, max_steps=4), None, eval_dataloader=[0, 1, 2])
    assert progress.eval_bar.n == 3
    progress.on_evaluate(args, _state(4, max_steps=4), None)
    assert progress.eval_bar is None
    progress.on_train_end(args, _state(4, max_steps=4), None)
    captured = capsys.readouterr()
    assert captured.out == ""  # the bar is on stderr, as tqdm's are; nothing lands between a program's output lines
    final = captured.err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("reward: 100%") and "4/4" in final and "loss=0.5  accuracy=0.75" in final
    assert "num_tokens" not in captured.err


def test_other_ranks_show_nothing(capsys):
    args = SimpleNamespace(disable_tqdm=True)
    progress = StageProgress("ppo", key_metrics("ppo"))
    other = SimpleNamespace(is_world_process_zero=False, global_step=1, max_steps=2)
    progress.on_train_begin(args, other, None)
    progress.on_log(args, other, None, logs={"objective/scores": 0.5})
    assert capsys.readouterr().out == ""


def test_a_stage_run_prints_its_key_metrics_and_no_raw_dict_logs(tiny_task_dir: Path, tmp_path, capsys):
    from rlhf_lm.stages import reward as reward_stage

    values = dict(model_name_or_path=str(tiny_task_dir / "base_policy"), dataset_name=str(tiny_task_dir / "data"),
                  dataset_train_split="pairs_train", dataset_eval_split="pairs_eval", output_dir=str(tmp_path / "rm"),
                  max_steps=2, logging_steps=1, per_device_train_batch_size=8, save_strategy="no", use_cpu=True,
                  seed=0, disable_tqdm=False)  # transformers' default: its ProgressCallback would print dicts
    reward_stage.run(config_from_dict(reward_stage.RewardStageConfig, values, "test"))
    out = capsys.readouterr().out
    assert "{'loss'" not in out and "'grad_norm'" not in out and "train_runtime" not in out
    lines = [line for line in out.splitlines() if line.startswith("reward ")]
    assert lines and all("loss=" in line and "accuracy=" in line and "margin=" in line for line in lines), out
