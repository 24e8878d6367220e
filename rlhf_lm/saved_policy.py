"""A stage's saved policy read back for evaluation: the policy and its reference loaded from their folders, and what
its training run recorded in its metrics.json (its config: the dataset, the prompts it held out, its reference).

The reference, in order: ``reference_path`` - a LoRA adapter on the same base (loaded beside the policy's adapter as
``"ref"``, no second copy of the base) or a full model; else, for an adapter policy, the adapter-free base; for a full
model, ``model_name_or_path`` or else the model its training run started from.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

from rlhf_lm.artifacts import METRICS_FILE
from rlhf_lm.errors import ArtifactError, ConfigError
from rlhf_lm.json_files import read_json


def is_adapter(path: str | None) -> bool:
    return bool(path) and (Path(path) / "adapter_config.json").is_file()


def training_config(policy_path: str) -> dict:
    """The config the policy was trained with, from its metrics.json (empty when there is none)."""
    metrics = Path(policy_path) / METRICS_FILE
    return read_json(metrics).get("config", {}) if metrics.is_file() else {}


def trained_or_auto(trained: dict) -> SimpleNamespace:
    """The training run's hh_format (auto when it did not record one), for hh_as_messages."""
    return SimpleNamespace(hh_format=trained.get("hh_format", "auto"))


def prompts_held_out_in_training(cfg, trained: dict, tokenizer) -> list:
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


def load_models(cfg):
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
    if is_adapter(cfg.policy_path):
        from peft import PeftModel

        base = cfg.model_name_or_path or json.loads((Path(cfg.policy_path) / "adapter_config.json").read_text()).get(
            "base_model_name_or_path")
        if not base:
            raise ConfigError(f"{cfg.policy_path} is an adapter with no recorded base model; set model_name_or_path.")
        policy = PeftModel.from_pretrained(load_causal_lm(base, **kwargs), cfg.policy_path)
        if is_adapter(cfg.reference_path):
            policy.load_adapter(cfg.reference_path, adapter_name=REF_ADAPTER)
            policy.set_adapter("default")
            return policy.to(device).eval(), None, tokenizer
    else:
        policy = load_causal_lm(cfg.policy_path, **kwargs)
    reference_path = cfg.reference_path
    if reference_path is None and not is_adapter(cfg.policy_path):
        trained = training_config(cfg.policy_path)  # a full fine-tune's reference is the model it started from
        reference_path = (cfg.model_name_or_path or trained.get("ref_model_name_or_path")
                          or trained.get("model_name_or_path"))
        if reference_path is None:
            raise ConfigError(f"{cfg.policy_path} is a full model: set reference_path (or model_name_or_path) to the "
                              "model it was fine-tuned from.")
    if reference_path is not None and is_adapter(reference_path):
        raise ConfigError("An adapter reference_path needs an adapter policy on the same base.")
    reference = load_causal_lm(reference_path, **kwargs).to(device).eval() if reference_path else None
    return policy.to(device).eval(), reference, tokenizer
