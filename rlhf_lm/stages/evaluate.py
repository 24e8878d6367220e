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

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

from rlhf_lm.artifacts import METRICS_FILE, check_output_dir, staged_output
from rlhf_lm.configs import check_batch_sizes, overwrite_output_dir_field, parse_config
from rlhf_lm.errors import ArtifactError, ConfigError
from rlhf_lm.json_files import read_json, write_json

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


def _is_adapter(path: str | None) -> bool:
    return bool(path) and (Path(path) / "adapter_config.json").is_file()


def _training_config(policy_path: str) -> dict:
    """The config the policy was trained with, from its metrics.json (empty when there is none)."""
    metrics = Path(policy_path) / METRICS_FILE
    return read_json(metrics).get("config", {}) if metrics.is_file() else {}


def trained_or_auto(trained: dict) -> SimpleNamespace:
    """The training run's hh_format (auto when it did not record one), for hh_as_messages."""
    return SimpleNamespace(hh_format=trained.get("hh_format", "auto"))


def _prompts_held_out_in_training(cfg: EvaluateStageConfig, trained: dict, tokenizer) -> list:
    """The policy's own held-out prompts (its dataset's eval split or eval_fraction share), none a training prompt."""
    from rlhf_lm.configs import DataArguments
    from rlhf_lm.data.loading import held_out_prompts

    if not trained.get("dataset_name"):
        raise ConfigError(f"Set prompts: {cfg.policy_path} records no training dataset to take held-out prompts "
                          "from.")
    fields = {f.name: trained[f.name] for f in dataclasses.fields(DataArguments) if f.name in trained}
    # A prompt stage (ppo, grpo, rloo) records no data_format (it has no such key); older runs recorded prompt_only.
    fields.setdefault("data_format", "prompt_only")
    prompts = held_out_prompts(SimpleNamespace(**{**asdict(DataArguments()), **fields}), trained.get("seed", 0),
                               tokenizer)
    if not prompts:
        raise ConfigError(f"{cfg.policy_path} was trained without held-out data (no dataset_eval_split, "
                          "eval_fraction 0): set prompts to the held-out prompts to judge it on.")
    return prompts


def load_models(cfg: EvaluateStageConfig):
    """(policy, reference or None, tokenizer). An adapter reference is loaded as the policy's "ref" adapter."""
    import torch

    from rlhf_lm.evaluation import REF_ADAPTER
    from rlhf_lm.modeling import load_causal_lm, load_tokenizer

    if not cfg.policy_path:
        raise ConfigError("Set policy_path: the output dir of a dpo / ppo / grpo stage (or any model dir).")
    if not Path(cfg.policy_path).is_dir():
        raise ArtifactError(f"policy_path {cfg.policy_path} does not exist.")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = dict(dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                  allow_pickle_weights=cfg.allow_pickle_weights)
    tokenizer = load_tokenizer(cfg.policy_path, trust_remote_code=cfg.trust_remote_code)
    if _is_adapter(cfg.policy_path):
        from peft import PeftModel

        base = cfg.model_name_or_path or json.loads((Path(cfg.policy_path) / "adapter_config.json").read_text()).get(
            "base_model_name_or_path")
        if not base:
            raise ConfigError(f"{cfg.policy_path} is an adapter with no recorded base model; set model_name_or_path.")
        policy = PeftModel.from_pretrained(load_causal_lm(base, **kwargs), cfg.policy_path)
        if _is_adapter(cfg.reference_path):
            policy.load_adapter(cfg.reference_path, adapter_name=REF_ADAPTER)
            policy.set_adapter("default")
            return policy.to(device).eval(), None, tokenizer
    else:
        policy = load_causal_lm(cfg.policy_path, **kwargs)
    reference_path = cfg.reference_path
    if reference_path is None and not _is_adapter(cfg.policy_path):
        trained = _training_config(cfg.policy_path)  # a full fine-tune's reference is the model it started from
        reference_path = (cfg.model_name_or_path or trained.get("ref_model_name_or_path")
                          or trained.get("model_name_or_path"))
        if reference_path is None:
            raise ConfigError(f"{cfg.policy_path} is a full model: set reference_path (or model_name_or_path) to the "
                              "model it was fine-tuned from.")
    if reference_path is not None and _is_adapter(reference_path):
        raise ConfigError("An adapter reference_path needs an adapter policy on the same base.")
    reference = load_causal_lm(reference_path, **kwargs).to(device).eval() if reference_path else None
    return policy.to(device).eval(), reference, tokenizer


def run(cfg: EvaluateStageConfig, callbacks: list | None = None) -> dict[str, float]:  # trains nothing: no events
    from rlhf_lm.builtin_task.task import task_root
    from rlhf_lm.data.loading import hh_as_messages
    from rlhf_lm.evaluation import evaluate_policy
    from rlhf_lm.stages.common import closing_eval_prompts

    if not cfg.policy_path:
        raise ConfigError("Set policy_path: the output dir of a dpo / ppo / grpo stage (or any model dir).")
    if not Path(cfg.policy_path).is_dir():
        raise ArtifactError(f"policy_path {cfg.policy_path} does not exist.")
    check_output_dir(cfg.output_dir, overwrite=cfg.overwrite_output_dir)
    policy, reference, tokenizer = load_models(cfg)
    trained = _training_config(cfg.policy_path)
    prompts, prompts_source = closing_eval_prompts(
        cfg.prompts, cfg.prompts_split, cfg.prompt_column, hh_as_messages(trained_or_auto(trained), tokenizer),
        trained.get("dataset_name"), lambda: _prompts_held_out_in_training(cfg, trained, tokenizer), cfg.num_prompts)
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
            metrics.update(_pair_metrics(cfg, policy, reference, tokenizer, data))
        write_json(out / METRICS_FILE, {"metrics": metrics, "data": data, "config": asdict(cfg)})
    logger.info("Evaluation: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


def _pair_metrics(cfg: EvaluateStageConfig, policy, reference, tokenizer, data: dict) -> dict[str, float]:
    from rlhf_lm.data.formats import normalize_preferences
    from rlhf_lm.data.readers import load_rows
    from rlhf_lm.evaluation import implicit_reward_accuracy
    from rlhf_lm.preference_pairs import apply_length_limit, tokenize_pairs

    pairs, report = normalize_preferences(load_rows(cfg.pairs, cfg.pairs_split))
    tokenized = apply_length_limit(tokenize_pairs(pairs, tokenizer), cfg.max_length, "drop", report)
    data["pairs"] = report.as_dict()
    return implicit_reward_accuracy(policy, tokenizer, tokenized, cfg.beta, reference=reference,
                                    batch_size=cfg.batch_size)


def main(argv: list[str] | None = None) -> int:
    from rlhf_lm.progress import stage_summary  # it imports transformers: this module stays light until it runs

    cfg = parse_config(EvaluateStageConfig, argv)
    metrics = run(cfg)
    print(stage_summary("evaluate", "evaluate", metrics, f"written to {cfg.output_dir}"))  # all: metrics.json
    return 0
