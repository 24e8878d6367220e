"""What the reward stage keeps of its trained model: the saved artifact (adapter with its score head, or the merged /
full model, checked so it cannot reload with a random head), and the measurements it is saved with - held-out
metrics, and the reward mean / std over the training responses that downstream stages normalise with.

:meth:`rlhf_lm.rewards.ClassifierReward.from_pretrained` loads the artifact back, finding the base through
:func:`base_model_relative`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from rlhf_lm.builtin_task.task import task_root
from rlhf_lm.errors import ArtifactError
from rlhf_lm.evaluation import evaluate_pairs
from rlhf_lm.fsdp import full_state_dict, is_sharded
from rlhf_lm.rewards import ClassifierReward

logger = logging.getLogger(__name__)


def save_reward_model(cfg, trainer, tokenizer, head: str, stage: Path, is_peft: bool) -> None:
    """The trained reward model (adapter with its head, or the merged / full model) and tokenizer, first of all.
    Called by every rank when the model is sharded (gathering it is collective); only the main process writes."""
    model = trainer.model
    if is_sharded(model):
        state_dict = full_state_dict(model)
        if not trainer.accelerator.is_main_process:
            return
        model.save_pretrained(stage, state_dict=state_dict, safe_serialization=True)
    else:
        if is_peft and cfg.merge_adapter:
            model = model.merge_and_unload()
            trainer.model = model
        model.save_pretrained(stage, safe_serialization=True)
    tokenizer.save_pretrained(stage)
    if is_peft and not cfg.merge_adapter:
        _check_head_saved(stage, head)


def _check_head_saved(directory: Path, head: str) -> None:
    from safetensors import safe_open

    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        if not any(f".{head}." in key for key in f.keys()):
            raise ArtifactError(f"The saved adapter in {directory} lacks the `{head}` head; the reward model would "
                                "reload with a random head. Keep it in lora_modules_to_save.")


def measure(cfg, trainer, tokenizer, train, eval_ds) -> dict[str, Any]:
    """Eval metrics and the reward mean / std over the training responses (for normalising downstream)."""
    reward = ClassifierReward(trainer.model, tokenizer, batch_size=max(cfg.per_device_eval_batch_size, 32),
                              device=trainer.args.device)
    gold = cfg.gold_metrics if cfg.gold_metrics is not None else task_root(cfg.dataset_name) is not None
    train_scores = torch.cat([reward.raw_scores(train["prompt"], train["chosen"]),
                              reward.raw_scores(train["prompt"], train["rejected"])])
    n = len(train)
    metrics = {"reward/train_accuracy": (train_scores[:n] > train_scores[n:]).float().mean().item()}
    if eval_ds is not None:
        metrics.update(evaluate_pairs(reward, eval_ds, gold=gold))
    logger.info("Reward model: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return {"metrics": metrics, "reward_mean": train_scores.mean().item(),
            "reward_std": train_scores.std(unbiased=False).item()}


def base_model_relative(cfg, is_peft: bool) -> str | None:
    """Where the base is relative to the artifact, so the pair of folders can move together (see ClassifierReward);
    None for a merged or full model, or a base that is no local directory."""
    base = Path(cfg.model_name_or_path)
    return os.path.relpath(base.resolve(), Path(cfg.output_dir).resolve()) if is_peft and base.is_dir() else None
