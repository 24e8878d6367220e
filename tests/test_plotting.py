"""Training-curve extraction from a trainer's log history."""

from rlhf_lm.plotting import series


def test_series_skips_entries_without_the_key_and_the_final_summary():
    history = [
        {"loss": 0.7, "step": 5},
        {"eval_loss": 0.69, "step": 5},
        {"loss": 0.6, "step": 10},
        # TRL's closing entry: leftover metrics of the last (often tiny) batch beside the run's totals
        {"loss": 0.9, "step": 11, "train_runtime": 3.0, "train_loss": 0.65},
    ]
    assert series(history, "loss") == ([5.0, 10.0], [0.7, 0.6])
    assert series(history, "eval_loss") == ([5.0], [0.69])
