"""Tiny DPO runs on the built-in task, for the controller's tests, benchmark and learned-policy training.

Every run is a real TRL ``DPOTrainer`` with LoRA on the task's base policy. Tokenization is the slow part of
building a trainer on 2 CPU cores, so :class:`DpoTask` tokenizes once and hands the tokenized datasets to every
trainer (``DPOTrainer`` skips datasets that are already tokenized).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback

from rlhf_lm.modeling import load_causal_lm, load_tokenizer


def _read_pairs(path: Path, limit: int | None) -> Dataset:
    ds = Dataset.from_json(str(path))
    return ds.select(range(min(limit, len(ds)))) if limit else ds


@dataclass
class DpoTask:
    """A task directory (``rlhf_lm.task.build_task``) ready for many short DPO runs."""

    task_dir: Path
    num_train: int | None = None
    num_eval: int = 128
    max_length: int = 96
    lora_r: int = 8
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.task_dir = Path(self.task_dir)
        self.tokenizer = load_tokenizer(str(self.task_dir / "base_policy"))

    def trainer(self, learning_rate: float, max_steps: int, seed: int = 0, beta: float = 0.1,
                batch_size: int = 16, lr_scheduler_type: str = "constant", warmup_steps: int = 0,
                callbacks: list[TrainerCallback] | None = None, output_dir: str | None = None, **overrides):
        """A DPOTrainer with a fresh LoRA adapter on the base policy; ``seed`` picks the adapter init and data order."""
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer

        torch.manual_seed(seed)
        settings = dict(
            output_dir=output_dir or tempfile.mkdtemp(prefix="ctl-dpo-"), learning_rate=learning_rate,
            max_steps=max_steps, per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
            lr_scheduler_type=lr_scheduler_type, warmup_steps=warmup_steps, beta=beta, max_length=self.max_length,
            seed=seed, data_seed=seed, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
            logging_steps=1, disable_tqdm=True, dataset_num_proc=None, weight_decay=0.0,
            gradient_checkpointing=False,
        )
        args = DPOConfig(**{**settings, **overrides})
        model = load_causal_lm(str(self.task_dir / "base_policy"), dtype="float32")
        lora = LoraConfig(task_type="CAUSAL_LM", r=self.lora_r, lora_alpha=2 * self.lora_r, lora_dropout=0.0,
                          target_modules="all-linear")
        train, evaluation = self._datasets()
        trainer = DPOTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                             processing_class=self.tokenizer, peft_config=lora, callbacks=callbacks)
        if "tokenized" not in self._cache:  # reuse the tokenized datasets for every later trainer
            self._cache["tokenized"] = (trainer.train_dataset, trainer.eval_dataset)
        return trainer

    def _datasets(self) -> tuple[Dataset, Dataset]:
        if "tokenized" in self._cache:
            return self._cache["tokenized"]
        train = _read_pairs(self.task_dir / "data" / "pairs_train.jsonl", self.num_train)
        evaluation = _read_pairs(self.task_dir / "data" / "pairs_eval.jsonl", self.num_eval)
        return train, evaluation


@torch.no_grad()
def heldout_loss(trainer) -> float:
    """The DPO loss on the whole held-out pair set (the quantity the benchmark compares)."""
    metrics = trainer.evaluate()
    return float(metrics["eval_loss"])
