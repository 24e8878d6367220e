"""A small custom stage for the pipeline tests: a real stage module written against the public stage contract.

It reads the task's base-policy tokenizer and preference pairs (artifacts the pipeline hands on) and reports the
pairs' mean gold reward; ``fail: true`` makes it crash half-way through writing its output, like a killed run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_lm.artifacts import staged_output
from rlhf_lm.builtin_task.task import gold_reward
from rlhf_lm.configs import DataArguments
from rlhf_lm.data import load_preference_data
from rlhf_lm.modeling import load_tokenizer
from rlhf_lm.stages.common import config_record, write_stage_metrics

PROVIDES = ("policy",)


@dataclass
class ScoreStageConfig(DataArguments):
    output_dir: str = field(default="runs/score", metadata={"help": "Where to write metrics.json."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Model whose tokenizer is loaded."})
    gold: bool = field(default=False, metadata={"help": "Score the pairs with the task's gold reward."})
    fail: bool = field(default=False, metadata={"help": "Crash after writing part of the output."})
    tag: str = field(default="", metadata={"help": "Free text copied into metrics.json."})
    token: str | None = field(default=None, metadata={"help": "A credential (never written: see rlhf_lm.redaction)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a finished output."})


CONFIG = ScoreStageConfig


def live_models() -> int:
    """Models still in memory, garbage in reference cycles included (gc.get_objects does not collect)."""
    import gc

    from transformers import PreTrainedModel

    return sum(isinstance(o, PreTrainedModel) for o in gc.get_objects())


def run(cfg: ScoreStageConfig, callbacks: list | None = None) -> dict[str, float]:
    models_at_start = live_models()
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    train, eval_ds, _ = load_preference_data(cfg)
    with staged_output(cfg.output_dir, stage="score", overwrite=cfg.overwrite_output_dir) as out:
        (out / "partial.txt").write_text("started")
        if cfg.fail:
            raise RuntimeError("simulated crash in the middle of the score stage")
        metrics = {"score/rows": float(len(train)), "score/eval_rows": float(len(eval_ds or [])),
                   "score/vocab": float(len(tokenizer)), "score/tag": cfg.tag,
                   "score/models_at_start": float(models_at_start)}
        if cfg.gold:
            metrics["score/gold_chosen"] = sum(gold_reward(r["prompt"], r["chosen"]) for r in train) / len(train)
        write_stage_metrics(out, "score", metrics, config_record(cfg))  # the one metrics.json schema
    return metrics
