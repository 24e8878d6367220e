"""Stage ``task``: write the built-in gold-reward task (data + a briefly pre-trained tiny base policy).

    rlhf-lm task --output_dir runs/task [--seed 0] [--arch llama]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_lm.artifacts import staged_output
from rlhf_lm.builtin_task.task import TaskConfig, build_task
from rlhf_lm.configs import overwrite_output_dir_field, parse_config
from rlhf_lm.json_files import read_json
from rlhf_lm.stages.common import config_record, log_history_recorder, write_stage_metrics


@dataclass
class TaskStageConfig(TaskConfig):
    output_dir: str = field(default="runs/task", metadata={"help": "Where to write the task."})
    arch: str = field(default="llama", metadata={"help": "Tiny base-policy family: llama or qwen2."})
    pretrain_epochs: int = field(default=12, metadata={"help": "Epochs of causal-LM pre-training of the base policy."})
    hidden_size: int = field(default=64, metadata={"help": "Width of the tiny base policy."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Depth of the tiny base policy."})
    overwrite_output_dir: bool = overwrite_output_dir_field()


CONFIG = TaskStageConfig


def run(cfg: TaskStageConfig, callbacks: list | None = None) -> dict[str, float]:
    """Build the task (``callbacks`` see the base policy's pre-training); metrics.json, written last, marks it done."""
    task_fields = {k: getattr(cfg, k) for k in TaskConfig.__dataclass_fields__}
    history: list = []  # the base policy's pre-training curves
    with staged_output(cfg.output_dir, stage="task", overwrite=cfg.overwrite_output_dir) as out:
        build_task(out, TaskConfig(**task_fields), arch=cfg.arch, pretrain_epochs=cfg.pretrain_epochs,
                   hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.hidden_size,
                   num_hidden_layers=cfg.num_hidden_layers, callbacks=[*(callbacks or []), log_history_recorder(history)])
        meta = read_json(out / "task.json")
        metrics = {"task/label_agreement": meta["label_agreement"],
                   "task/num_train_prompts": float(meta["num_train_prompts"]),
                   "task/num_eval_prompts": float(meta["num_eval_prompts"])}
        write_stage_metrics(out, "task", metrics, config_record(cfg), log_history=history)
    return metrics


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TaskStageConfig, argv)
    run(cfg)
    print(f"Wrote the built-in task to {cfg.output_dir}")
    return 0
