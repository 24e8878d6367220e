"""Stage ``evaluate``: a saved policy against its reference on held-out prompts (and, optionally, held-out pairs).

    rlhf-lm evaluate --policy_path runs/dpo --reward_model runs/reward --output_dir runs/eval
    rlhf-lm evaluate --policy_path runs/dpo --reference_path runs/sft --prompts data/prompts_eval.jsonl

The policy is a stage's output: a LoRA adapter directory (its base read from ``adapter_config.json`` unless
``model_name_or_path`` is given) or a full model. The reference is, in order: ``reference_path`` - a LoRA adapter on
the same base (loaded beside the policy's, no second copy of the base) or a full model; else, for an adapter policy,
the adapter-free base; for a full model, ``model_name_or_path`` or else the model its training run started from
(read from its ``metrics.json``).

Writes ``metrics.json`` (win-rate, rewards, KL, gold on the built-in task; implicit-reward accuracy when ``pairs``
is given) and ``samples.jsonl`` to ``output_dir``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_lm.artifacts import check_output_dir, staged_output
from rlhf_lm.configs import check_batch_sizes, overwrite_output_dir_field, parse_config
from rlhf_lm.errors import ArtifactError, ConfigError
from rlhf_lm.saved_policy import load_models, prompts_held_out_in_training, trained_or_auto, training_config

logger = logging.getLogger(__name__)


@dataclass
class EvaluateStageConfig:
    """What to compare, on which prompts, judged by what."""

    policy_path: str | None = field(default=None, metadata={"help": "The policy: a stage's output dir (adapter or "
                                                                      "full model)."})
    output_dir: str = field(default="runs/evaluate", metadata={"help": "Where metrics.json and samples.jsonl go."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model of an adapter policy. Default: the adapter's own base."})
    reference_path: str | None = field(
        default=None,
        metadata={"help": "Reference: a LoRA adapter on the same base (e.g. the SFT adapter) or a full model. "
                          "Default: the adapter-free base of an adapter policy."},
    )
    prompts: str | None = field(
        default=None,
        metadata={"help": "Held-out prompts (a file, directory or Hub dataset). Default: the built-in task's "
                          "prompts_eval.jsonl when the policy was trained on task data, else the prompts its training "
                          "run held out (its dataset_eval_split or eval_fraction share), none of them a training "
                          "prompt."},
    )
    prompts_split: str = field(
        default="train",
        metadata={"help": "Split of `prompts` to read: a Hub dataset's held-out split (e.g. test), or a file's name "
                          "in a directory (e.g. prompts_eval in a task's data dir). A single file is one 'train' split."},
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt."})
    reward_model: str | None = field(
        default=None, metadata={"help": "Judge of the win-rate: 'gold', a reward-stage dir, 'pkg.mod:Name' or "
                                        "'file.py:Name'."})
    gold: bool | None = field(
        default=None, metadata={"help": "Report the built-in task's gold reward. Default: on for task prompts."})
    pairs: str | None = field(
        default=None, metadata={"help": "Held-out preference pairs for DPO's implicit-reward accuracy and margin."})
    pairs_split: str = field(default="train", metadata={"help": "Split of `pairs` to read (as prompts_split)."})
    beta: float = field(default=0.1, metadata={"help": "beta of the implicit reward (use the DPO run's)."})
    max_length: int | None = field(default=1024, metadata={"help": "Pairs longer than this are dropped (counted)."})
    num_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens sampled per completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0 = greedy)."})
    batch_size: int = field(default=64, metadata={"help": "Prompts per generation / scoring batch."})
    seed: int = field(default=0, metadata={"help": "Sampling seed (the same for policy and reference)."})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto, float32, bfloat16, float16."})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ... Default: cuda when available."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models that ship their own code."})
    allow_pickle_weights: bool = field(default=False, metadata={"help": "Allow loading pickle (.bin) weights."})
    overwrite_output_dir: bool = overwrite_output_dir_field()

    def __post_init__(self) -> None:
        check_batch_sizes(self, ("batch_size",))
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}.")
        if self.num_prompts is not None and self.num_prompts <= 0:
            raise ConfigError(f"num_prompts must be positive, got {self.num_prompts}.")
        if self.max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be positive, got {self.max_new_tokens}.")


CONFIG = EvaluateStageConfig


def run(cfg: EvaluateStageConfig, callbacks: list | None = None) -> dict[str, float]:  # trains nothing: no events
    from rlhf_lm.builtin_task.task import task_root
    from rlhf_lm.data.loading import hh_as_messages
    from rlhf_lm.evaluation import evaluate_policy
    from rlhf_lm.stages.common import closing_eval_prompts, config_record, write_stage_metrics

    if not cfg.policy_path:
        raise ConfigError("Set policy_path: the output dir of a dpo / ppo / grpo stage (or any model dir).")
    if not Path(cfg.policy_path).is_dir():
        raise ArtifactError(f"policy_path {cfg.policy_path} does not exist.")
    check_output_dir(cfg.output_dir, overwrite=cfg.overwrite_output_dir)
    policy, reference, tokenizer = load_models(cfg)
    trained = training_config(cfg.policy_path)
    prompts, prompts_source = closing_eval_prompts(
        cfg.prompts, cfg.prompts_split, cfg.prompt_column, hh_as_messages(trained_or_auto(trained), tokenizer),
        trained.get("dataset_name"), lambda: prompts_held_out_in_training(cfg, trained, tokenizer), cfg.num_prompts)
    reward = None
    if cfg.reward_model:
        from rlhf_lm.rewards import load_reward, probe_reward

        reward = load_reward(cfg.reward_model)
        probe_reward(reward, prompts, name=cfg.reward_model)  # fails now, not after sampling every prompt
    gold = cfg.gold if cfg.gold is not None else task_root(prompts_source) is not None

    with staged_output(cfg.output_dir, stage="evaluate", overwrite=cfg.overwrite_output_dir) as out:
        metrics = evaluate_policy(policy, tokenizer, prompts, reward, reference=reference, gold=gold,
                                  samples_path=out / "samples.jsonl", max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, seed=cfg.seed, batch_size=cfg.batch_size)
        data = {}
        if cfg.pairs:
            pair_metrics, data["pairs"] = _pair_metrics(cfg, policy, reference, tokenizer)
            metrics.update(pair_metrics)
        write_stage_metrics(out, "evaluate", metrics, config_record(cfg), data=data)
    logger.info("Evaluation: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


def _pair_metrics(cfg: EvaluateStageConfig, policy, reference, tokenizer):
    """DPO's implicit-reward accuracy and margin on the held-out ``pairs``, and the report of the pairs used."""
    from rlhf_lm.data.formats import normalize_preferences
    from rlhf_lm.data.readers import load_rows
    from rlhf_lm.evaluation import implicit_reward_accuracy
    from rlhf_lm.preference_pairs import apply_length_limit, tokenize_pairs

    pairs, report = normalize_preferences(load_rows(cfg.pairs, cfg.pairs_split))
    tokenized = apply_length_limit(tokenize_pairs(pairs, tokenizer), cfg.max_length, "drop", report)
    return implicit_reward_accuracy(policy, tokenizer, tokenized, cfg.beta, reference=reference,
                                    batch_size=cfg.batch_size), report


def main(argv: list[str] | None = None) -> int:
    from rlhf_lm.progress import stage_summary  # it imports transformers: this module stays light until it runs

    cfg = parse_config(EvaluateStageConfig, argv)
    metrics = run(cfg)
    print(stage_summary("evaluate", "evaluate", metrics, f"written to {cfg.output_dir}"))  # all: metrics.json
    return 0
