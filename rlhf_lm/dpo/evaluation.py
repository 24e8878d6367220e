"""The DPO stage's closing evaluation: the trained policy against its reference on held-out prompts.

In the order the stage takes these steps: :func:`load_judge` resolves the reward model that judges the win-rate and
calls it once before training (a broken judge fails in a second, not after an hour of training);
:func:`evaluate_against_reference` samples policy and reference after training (win-rate, reward, KL, gold, and
``samples.jsonl``); :func:`reference_kind` says in ``metrics.json`` which reference that was; and
:func:`evaluate_command` is the ``rlhf-lm evaluate`` command that re-runs only this evaluation when it failed.

The reference is never a second copy of the model when LoRA is on: the adapters switched off (the base), or TRL's
frozen ``"ref"`` copy of an SFT adapter. A full fine-tune gets its reference model back for the evaluation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rlhf_lm.builtin_task.task import task_eval_prompts, task_root
from rlhf_lm.data.loading import hh_as_messages
from rlhf_lm.fsdp import is_sharded
from rlhf_lm.modeling import load_causal_lm, load_tokenizer
from rlhf_lm.preference_pairs import load_pairs
from rlhf_lm.stages.common import closing_eval_prompts, require_model

logger = logging.getLogger(__name__)

MODEL_HELP = "the policy to fine-tune (a causal LM directory or Hub id)"  # what model_name_or_path is, in DPO


def load_judge(cfg) -> tuple[Any, list[Any] | None]:
    """(reward model, held-out prompts): the reward model that judges the win-rate, resolved and called once on the
    held-out prompts before training; (None, None) without one (the prompts are then loaded for the evaluation)."""
    if not cfg.reward_model:
        return None, None
    from rlhf_lm.rewards import load_reward, probe_reward

    reward = load_reward(cfg.reward_model)
    require_model(cfg, MODEL_HELP)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, padding_side="right",
                               trust_remote_code=cfg.trust_remote_code, require_eos=True)  # decides hh_format: auto
    prompts = load_eval_prompts(cfg, tokenizer)
    if not prompts:
        logger.warning("reward_model %s is set, but there are no held-out prompts to judge the policy on (set "
                       "eval_prompts): it will not be used.", cfg.reward_model)
        return None, prompts
    probe_reward(reward, prompts, name=cfg.reward_model)
    return reward, prompts


def load_eval_prompts(cfg, tokenizer=None) -> list[Any]:
    """Held-out prompts for the generation eval: ``eval_prompts``, else the built-in task's, else the prompts of the
    held-out pairs that no training pair has."""
    from rlhf_lm.data.loading import unseen_prompts

    def unseen_held_out_prompts() -> list[Any]:
        train, held_out, _, _ = load_pairs(cfg, tokenizer)
        return unseen_prompts(held_out, train)

    return closing_eval_prompts(cfg.eval_prompts, "train", cfg.prompt_column, hh_as_messages(cfg, tokenizer),
                                cfg.dataset_name, unseen_held_out_prompts, cfg.eval_num_prompts)[0]


def evaluate_against_reference(cfg, trainer, tokenizer, stage: Path, prompts: list[Any] | None = None,
                               reward=None) -> dict[str, float]:
    """Sample the policy and its reference on held-out prompts (win-rate, reward, KL, gold) into samples.jsonl."""
    from rlhf_lm.evaluation import evaluate_policy

    prompts = load_eval_prompts(cfg, tokenizer) if prompts is None else prompts
    if not prompts:
        return {}
    policy = trainer.accelerator.unwrap_model(trainer.model)
    reference = None
    if not cfg.use_peft:  # a full fine-tune needs its reference model back (it may have been freed or never loaded)
        reference = trainer.ref_model or load_causal_lm(cfg.ref_model_name_or_path or cfg.model_name_or_path,
                                                         dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                                                         allow_pickle_weights=cfg.allow_pickle_weights)
        reference = trainer.accelerator.unwrap_model(reference)
        if not is_sharded(reference):  # TRL shards a reference it keeps under FSDP: it stays where it is
            reference = reference.to(trainer.args.device)
    gold = cfg.eval_gold if cfg.eval_gold is not None else task_root(cfg.dataset_name) is not None
    metrics = evaluate_policy(policy, tokenizer, prompts, reward, reference=reference, gold=gold,
                              samples_path=stage / "samples.jsonl" if trainer.accelerator.is_main_process else None,
                              max_new_tokens=cfg.eval_max_new_tokens,
                              temperature=cfg.eval_temperature, seed=cfg.seed,
                              batch_size=max(cfg.per_device_eval_batch_size, 64))
    logger.info("DPO policy vs reference: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


def reference_kind(cfg) -> str:
    """Which policy the DPO policy was trained and judged against, as metrics.json records it."""
    return "sft_adapter" if cfg.sft_adapter_path else "base (adapters off)" if cfg.use_peft else "ref_model"


def evaluate_command(cfg) -> str:
    """The `rlhf-lm evaluate` command that re-runs this stage's closing evaluation on its saved output."""
    parts = ["rlhf-lm evaluate", f"--policy_path {cfg.output_dir}", f"--output_dir {cfg.output_dir}-eval"]
    prompts = cfg.eval_prompts or task_eval_prompts(cfg.dataset_name)
    if prompts:
        parts.append(f"--prompts {prompts}")
    if cfg.reward_model:
        parts.append(f"--reward_model {cfg.reward_model}")
    if cfg.eval_dataset_name:
        parts.append(f"--pairs {cfg.eval_dataset_name} --beta {cfg.beta}")
    if cfg.eval_num_prompts:
        parts.append(f"--num_prompts {cfg.eval_num_prompts}")
    if cfg.eval_gold is not None:
        parts.append(f"--gold {str(cfg.eval_gold).lower()}")
    parts.append(f"--max_new_tokens {cfg.eval_max_new_tokens} --temperature {cfg.eval_temperature} --seed {cfg.seed}")
    return " ".join(parts)
