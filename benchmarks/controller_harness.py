"""Tiny DPO runs on the built-in task, for the controller's tests, benchmark (``benchmarks/controller.py``) and
learned-policy training (``benchmarks/train_learned_controller.py``).

Every run is a real TRL ``DPOTrainer`` with LoRA on the task's base policy. Tokenization is the slow part of
building a trainer on 2 CPU cores, so :class:`DpoTask` tokenizes once and hands the tokenized datasets to every
later trainer (``DPOTrainer`` skips datasets that are already tokenized).

The held-out pairs are split in two: a *validation* part (the trainer's ``eval_dataset``: what the controller and
PBT may look at while training) and a *test* part that only the final score sees.
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


def _read_pairs(path: Path, start: int = 0, stop: int | None = None) -> Dataset:
    ds = Dataset.from_json(str(path))
    stop = len(ds) if stop is None else min(stop, len(ds))
    return ds.select(range(min(start, stop), stop))


@dataclass
class DpoTask:
    """A task directory (``rlhf_lm.builtin_task.task.build_task``) ready for many short DPO runs."""

    task_dir: Path
    num_train: int | None = None
    num_eval: int = 64  # validation pairs (the trainer's eval_dataset)
    num_test: int = 128  # test pairs after those, scored only at the end
    max_length: int = 96
    lora_r: int = 8
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.task_dir = Path(self.task_dir)
        self.tokenizer = load_tokenizer(str(self.task_dir / "base_policy"))

    def trainer(self, learning_rate: float, max_steps: int, seed: int = 0, beta: float = 0.1,
                batch_size: int = 16, lr_scheduler_type: str = "constant", warmup_steps: int = 0,
                callbacks: list[TrainerCallback] | None = None, output_dir: str | None = None, **overrides):
        """A DPOTrainer with a fresh LoRA adapter on the base policy; ``seed`` picks the adapter init and data order.

        A controller among ``callbacks`` is attached once the trainer is built, as the stages attach theirs (it needs
        the trainer, which TrainerCallback events do not carry)."""
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer

        from rlhf_lm.controller.callback import ControllerCallback

        settings = dict(
            output_dir=output_dir or tempfile.mkdtemp(prefix="ctl-dpo-"), learning_rate=learning_rate,
            max_steps=max_steps, per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
            lr_scheduler_type=lr_scheduler_type, warmup_steps=warmup_steps, beta=beta, max_length=self.max_length,
            seed=seed, data_seed=seed, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
            logging_steps=1, disable_tqdm=True, dataset_num_proc=None, weight_decay=0.0,
            activation_checkpointing=False,
        )
        args = DPOConfig(**{**settings, **overrides})
        torch.manual_seed(seed)
        model = load_causal_lm(str(self.task_dir / "base_policy"), dtype="float32")
        lora = LoraConfig(task_type="CAUSAL_LM", r=self.lora_r, lora_alpha=2 * self.lora_r, lora_dropout=0.0,
                          target_modules="all-linear")
        train, validation, test = self._datasets()
        controllers = [cb for cb in callbacks or [] if isinstance(cb, ControllerCallback)]
        others = [cb for cb in callbacks or [] if not isinstance(cb, ControllerCallback)]
        trainer = DPOTrainer(model=model, args=args, train_dataset=train, eval_dataset={"val": validation,
                                                                                        "test": test},
                             processing_class=self.tokenizer, peft_config=lora, callbacks=others or None)
        for controller in controllers:
            controller.attach(trainer)
        trainer.eval_dataset, self._test = trainer.eval_dataset["val"], trainer.eval_dataset["test"]
        if "tokenized" not in self._cache:  # reuse the tokenized datasets for every later trainer
            self._cache["tokenized"] = (trainer.train_dataset, trainer.eval_dataset, self._test)
        return trainer

    def _datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        if "tokenized" in self._cache:
            return self._cache["tokenized"]
        pairs = self.task_dir / "data"
        train = _read_pairs(pairs / "pairs_train.jsonl", 0, self.num_train)
        validation = _read_pairs(pairs / "pairs_eval.jsonl", 0, self.num_eval)
        test = _read_pairs(pairs / "pairs_eval.jsonl", self.num_eval, self.num_eval + self.num_test)
        return train, validation, test

    @torch.no_grad()
    def test_loss(self, trainer) -> float:
        """The DPO loss on the test pairs (never seen by the controller): the number the benchmark compares."""
        return float(trainer.evaluate(eval_dataset=self._cache["tokenized"][2], metric_key_prefix="test")["test_loss"])

    def gold_objective(self, trainer, num_prompts: int = 48, max_new_tokens: int = 32, seed: int = 0
                       ) -> dict[str, float]:
        """Gold reward - beta * KL of the trained policy's samples on held-out prompts (the task's true goal)."""
        import json

        from rlhf_lm.evaluation import evaluate_policy

        lines = (self.task_dir / "data" / "prompts_eval.jsonl").read_text().splitlines()[:num_prompts]
        prompts = [json.loads(line)["prompt"] for line in lines]
        trainer.model.eval()
        m = evaluate_policy(trainer.model, self.tokenizer, prompts, gold=True, max_new_tokens=max_new_tokens,
                            seed=seed)
        beta = trainer.args.beta
        return {"gold_reward": m["eval/gold_reward/policy"], "kl": m["eval/kl"],
                "gold_objective": m["eval/gold_reward/policy"] - beta * m["eval/kl"]}


class SteppedRun:
    """A DPOTrainer driven one optimizer step at a time (for PBT, whose members train in lockstep rounds).

    Same loss, optimizer, scheduler and batches as ``trainer.train()``; only the loop is ours, because Trainer's
    loop cannot pause between rounds.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        trainer.create_optimizer_and_scheduler(num_training_steps=trainer.args.max_steps)
        self.loader = trainer.get_train_dataloader()
        self._iter = iter(self.loader)
        self.steps = 0

    def step(self) -> float:
        trainer = self.trainer
        try:
            batch = next(self._iter)
        except StopIteration:
            self._iter = iter(self.loader)
            batch = next(self._iter)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        loss = trainer.training_step(trainer.model, batch)
        if trainer.args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer._metrics["train"].clear()
        self.steps += 1
        return float(loss)

    @torch.no_grad()
    def val_loss(self) -> float:
        trainer = self.trainer
        metrics = trainer.evaluate()
        return float(metrics["eval_loss"])
