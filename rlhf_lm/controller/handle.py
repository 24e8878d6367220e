"""TrainerHandle: the one place the controller reaches into a trainer.

Everything the controller changes or runs inside a trainer goes through here: the learning rate (one writer, for
the decisions, the probes and the snapshot restores alike), beta / the KL coefficient, which LoRA layer groups
train, snapshots of adapter + optimizer + schedule, and the training steps and validation losses of a probe. It
works with TRL's trainers (DPO, reward, GRPO, RLOO: transformers' ``Trainer``) and with our PPO trainer, which
exposes the same attributes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from typing import Any

import torch

from rlhf_lm.controller.actions import set_trainable_group, trainable_parameters
from rlhf_lm.controller.snapshot import Snapshot

logger = logging.getLogger(__name__)


def _unwrap_scheduler(scheduler: Any) -> Any:
    return getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps the real one


class TrainerHandle:
    """A trainer as the controller sees it. Build it when training begins (the optimizer and scheduler exist then):
    the parameters trainable at that moment are the ones the controller snapshots and splits into layer groups."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.params = trainable_parameters(trainer.model)
        self._frozen: list[torch.nn.Parameter] = []

    # ------------------------------------------------------------------------------------------- callbacks
    @staticmethod
    def register_first(trainer: Any, callback: Any) -> None:
        """Add ``callback`` ahead of the trainer's other callbacks, once, before training.

        The controller writes its ``controller/*`` values into the log dict in ``on_log``; reporters (wandb,
        tensorboard, the progress bar) send that dict in their own ``on_log``, so they must come after it.
        ``Trainer.add_callback`` appends, hence the explicit position.
        """
        callbacks = trainer.callback_handler.callbacks
        if not any(cb is callback for cb in callbacks):
            callbacks.insert(0, callback)

    @staticmethod
    def find_callback(trainer: Any, kind: type) -> Any:
        """The first callback of class ``kind`` attached to ``trainer``, or None."""
        return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, kind)), None)

    # --------------------------------------------------------------------------------------- learning rate
    @property
    def _optimizer(self) -> torch.optim.Optimizer:
        return self.trainer.optimizer

    @property
    def _scheduler(self) -> Any:
        return _unwrap_scheduler(self.trainer.lr_scheduler)

    def learning_rates(self) -> list[float]:
        return [float(group["lr"]) for group in self._optimizer.param_groups]

    def set_learning_rate(self, factor: float = 1.0, *, lasting: bool = False) -> list[float]:
        """The one writer of the learning rate: the optimizer's LR becomes the schedule's current LR x ``factor``.

        ``lasting=True`` (a decision) rescales the schedule itself by ``factor``: an LR written only into the param
        groups is overwritten by the next ``scheduler.step()`` (LambdaLR recomputes ``base_lr * lambda(step)``), so
        ``base_lrs`` change too and warmup / decay keep their shape, scaled. ``base_lrs`` is in the scheduler's
        state dict, so the change survives a resume. ``lasting=False`` is a trial (a probe's candidate): the next
        scheduler step or snapshot restore undoes it. ``factor=1`` puts the optimizer back on the schedule.
        Returns the new LRs.
        """
        scheduler, groups = self._scheduler, self._optimizer.param_groups
        if lasting:
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
            if getattr(scheduler, "_last_lr", None) is not None:
                scheduler._last_lr = [lr * factor for lr in scheduler._last_lr]
            for group in groups:
                if "initial_lr" in group:  # what a scheduler rebuilt from this optimizer would start from
                    group["initial_lr"] = group["initial_lr"] * factor
        scheduled = getattr(scheduler, "_last_lr", None)
        if scheduled is None:  # no schedule to follow (none, or ReduceLROnPlateau before its first step)
            for group in groups:
                group["lr"] = group["lr"] * factor
            return self.learning_rates()
        trial = 1.0 if lasting else factor  # a lasting factor is inside the schedule by now
        for group, lr in zip(groups, scheduled, strict=True):
            group["lr"] = lr * trial
        return self.learning_rates()

    # --------------------------------------------------------------------------------- beta / KL coefficient
    def kl_coefficient(self) -> float | None:
        """The live KL coefficient: PPO's ``kl_ctl.value``, else ``trainer.beta`` (DPO, GRPO, RLOO); None if absent."""
        kl_ctl = getattr(self.trainer, "kl_ctl", None)
        if kl_ctl is not None and hasattr(kl_ctl, "value"):
            return float(kl_ctl.value)
        beta = getattr(self.trainer, "beta", None)
        return float(beta) if isinstance(beta, (int, float)) else None

    def set_kl_coefficient(self, value: float) -> None:
        """Set the value the trainer reads at its next loss (TRL 1.16 DPO/GRPO/RLOO read ``self.beta``, not args)."""
        kl_ctl = getattr(self.trainer, "kl_ctl", None)
        if kl_ctl is not None and hasattr(kl_ctl, "value"):
            kl_ctl.value = float(value)
        elif isinstance(getattr(self.trainer, "beta", None), (int, float)):
            if self.trainer.beta == 0.0:  # GRPO/RLOO without a reference model: there is no KL term to scale
                return
            self.trainer.beta = float(value)

    # ------------------------------------------------------------------------------------------ layer groups
    def train_layer_group(self, group: str) -> None:
        """Train only the adapters of ``group`` ('upper', 'upper+middle', 'all', ...); heads always train."""
        flags = set_trainable_group(self.params, group)
        self._frozen = [self.params[name] for name, trains in flags.items() if not trains]

    def drop_frozen_grads(self) -> None:
        """Keep frozen groups frozen: PEFT's adapter toggling (DPO's reference pass runs with the adapter disabled)
        sets requires_grad back to True on every active adapter, so grads are dropped before each optimizer step
        (AdamW skips a parameter whose grad is None) and requires_grad is cleared again."""
        for p in self._frozen:
            p.grad = None
            p.requires_grad_(False)

    def trainable_fraction(self) -> float:
        total = sum(p.numel() for p in self.params.values())
        return sum(p.numel() for p in self.params.values() if p.requires_grad) / total if total else 1.0

    # -------------------------------------------------------------------------------------------- snapshots
    def snapshot(self) -> Snapshot:
        return Snapshot.capture(self.params, self._optimizer, self.trainer.lr_scheduler,
                                step=self.trainer.state.global_step)

    def restore(self, snapshot: Snapshot, *, schedule: bool = True) -> None:
        """Weights and optimizer moments exactly as captured, and the schedule too unless ``schedule=False`` (a
        rollback keeps the schedule's position). The LR is then the schedule's again: the optimizer state of a
        snapshot taken during a probe's trial, or before a rollback, holds an LR of another moment."""
        snapshot.restore(self.params, self._optimizer, self.trainer.lr_scheduler if schedule else None)
        self.set_learning_rate(1.0)

    def relative_update(self, snapshot: Snapshot) -> float:
        """|theta - theta_snapshot| / |theta_snapshot| over the trainable weights (0 when either is zero)."""
        num = sum(float((p.detach() - snapshot.params[n]).float().norm() ** 2) for n, p in self.params.items())
        den = sum(float(t.float().norm() ** 2) for t in snapshot.params.values())
        return math.sqrt(num / den) if num > 0 and den > 0 else 0.0

    # --------------------------------------------------------------------------- steps and held-out losses
    def batches(self, dataset: Any, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
        """Shuffled batches of ``dataset`` collated exactly as the trainer's own loaders collate them."""
        trainer = self.trainer
        if hasattr(trainer, "_remove_unused_columns") and hasattr(dataset, "column_names"):
            dataset = trainer._remove_unused_columns(dataset, description="controller")
        generator = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True,
                                           generator=generator, collate_fn=trainer.data_collator, drop_last=True)

    def validation_batch(self, size: int, seed: int) -> dict:
        """A fixed batch of ``size`` rows of the first eval split (of the training rows when there is none)."""
        dataset = self.trainer.eval_dataset
        if isinstance(dataset, dict):
            dataset = next(iter(dataset.values()))
        if dataset is None:
            dataset = self.trainer.train_dataset
            logger.warning("controller: no eval_dataset; scoring on a fixed batch of training rows")
        return next(iter(self.batches(dataset, size, seed)))

    def training_batches(self, seed: int) -> torch.utils.data.DataLoader:
        return self.batches(self.trainer.train_dataset, self.trainer.args.per_device_train_batch_size, seed)

    def micro_batches_per_step(self) -> int:
        return max(int(self.trainer.args.gradient_accumulation_steps), 1)

    def examples_per_step(self) -> int:
        args = self.trainer.args
        return args.per_device_train_batch_size * args.gradient_accumulation_steps

    @contextlib.contextmanager
    def metrics_kept(self):
        """TRL trainers average every loss they compute into ``_metrics`` for the next log line; the controller's
        own losses and probe steps must not show up there."""
        saved = copy.deepcopy(getattr(self.trainer, "_metrics", None))
        try:
            yield
        finally:
            if saved is not None:
                self.trainer._metrics = saved

    def train_step(self, micro_batches: list[dict]) -> None:
        """One optimizer step on ``micro_batches``, as the trainer takes one (loss scaling, clipping, frozen groups)."""
        trainer, args = self.trainer, self.trainer.args
        model = getattr(trainer, "model_wrapped", None) or trainer.model
        saved_accumulation = getattr(trainer, "current_gradient_accumulation_steps", None)
        trainer.current_gradient_accumulation_steps = len(micro_batches)  # training_step divides the loss by it
        for micro in micro_batches:
            trainer.training_step(model, micro)
        if saved_accumulation is not None:
            trainer.current_gradient_accumulation_steps = saved_accumulation
        self.drop_frozen_grads()
        if args.max_grad_norm:
            trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), args.max_grad_norm)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)

    def loss(self, batch: dict) -> float:
        """The trainer's own loss on ``batch`` in eval mode, averaged over ranks."""
        trainer = self.trainer
        model = trainer.model
        was_training = model.training
        model.eval()
        with self.metrics_kept(), torch.no_grad():
            loss = trainer.compute_loss(model, trainer._prepare_inputs(batch))
        model.train(was_training)
        loss = loss.detach().float()
        if trainer.accelerator.num_processes > 1:
            loss = trainer.accelerator.reduce(loss, reduction="mean")
        return float(loss)

    # ---------------------------------------------------------------------------------------- distributed
    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value for every rank (policies and probe scores can differ by float noise across ranks)."""
        accelerator = getattr(self.trainer, "accelerator", None)
        if accelerator is None or accelerator.num_processes <= 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj if accelerator.is_main_process else None]
        broadcast_object_list(box, from_process=0)
        return box[0]
