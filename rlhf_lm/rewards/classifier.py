"""A trained reward model as a ``RewardModel``: :class:`ClassifierReward` scores text with a one-label sequence
classifier - a ``rlhf-lm reward`` artifact (base + LoRA adapter, or a full model) or any Hugging Face classifier
directory. It carries its own tokenizer and chat template and re-tokenises the text it is given (in the layout of
:mod:`rlhf_lm.rewards.layout`), so it works whatever tokenizer the policy uses.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf_lm.artifacts import METRICS_FILE
from rlhf_lm.errors import ArtifactError, RewardError
from rlhf_lm.fsdp import is_sharded
from rlhf_lm.rewards.layout import reward_input_ids
from rlhf_lm.rewards.protocol import check_rewards
from rlhf_lm.sampling import length_batches

ADAPTER_CONFIG = "adapter_config.json"


class ClassifierReward:
    """A sequence classifier with one output (a reward model) behind the ``RewardModel`` protocol.

    Build it from a directory with :meth:`from_pretrained`, or wrap an in-memory model and tokenizer (what the reward
    stage does to measure the model it just trained). ``normalize=True`` maps rewards to ``(r - mean) / std`` with the
    training-set statistics saved by the reward stage, so 0 is an average training response and 1 is one std above.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        normalize: bool = False,
        mean: float | None = None,
        std: float | None = None,
        max_length: int | None = None,
        name: str = "classifier",
    ):
        if normalize and (mean is None or not std):
            raise RewardError(f"Reward model {name}: normalize=True needs the training reward mean/std (written by "
                              f"the reward stage in {METRICS_FILE}); none were found. Pass mean= and std=.")
        if tokenizer.pad_token_id is None:
            raise RewardError(f"Reward model {name}: its tokenizer has no pad token; set one (e.g. pad = eos).")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if not is_sharded(model):  # FSDP2 places its shards itself; .to() on them can fail to swap
            self.model.to(self.device)
        self.normalize, self.mean, self.std = normalize, mean, std
        # Texts longer than the model's positions are cut (the stage drops such pairs from training instead).
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", None)
        # Llama/Qwen-style classifiers put a `score` head on the last non-pad token; BERT-style pool the first.
        self._reads_last_token = hasattr(model, "score")
        self.name = name

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        base_model: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        batch_size: int = 32,
        normalize: bool = False,
        merge: bool = True,
        allow_pickle_weights: bool = False,
        trust_remote_code: bool = False,
    ) -> ClassifierReward:
        """Load a reward-stage artifact (LoRA adapter or full model) or any one-label HF classifier directory.

        For an adapter the base comes from ``base_model`` or the adapter's ``base_model_name_or_path``. The adapter is
        merged into the base for faster scoring unless ``merge=False``. ``device=None`` picks CUDA when available.
        """
        from rlhf_lm.modeling import load_sequence_classifier, load_tokenizer

        path = Path(path)
        if not path.is_dir():
            raise ArtifactError(f"Reward model directory {path} does not exist.")
        has_adapter = (path / ADAPTER_CONFIG).is_file()
        if not has_adapter and not (path / "config.json").is_file():
            raise ArtifactError(f"{path} holds neither a LoRA adapter ({ADAPTER_CONFIG}) nor a model (config.json). "
                                "Point the reward spec at the output_dir of `rlhf-lm reward` or a classifier directory.")
        stats = read_reward_stats(path)
        load = dict(dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle_weights=allow_pickle_weights)
        if has_adapter:
            from peft import PeftModel

            base = base_model or find_adapter_base(path)
            from trl.trainer.reward_trainer import suppress_seqcls_warning

            with suppress_seqcls_warning():  # the base has no score head yet: the adapter brings it
                model = load_sequence_classifier(base, **load)
            model = PeftModel.from_pretrained(model, str(path))
            model = model.merge_and_unload() if merge else model
        else:
            model = load_sequence_classifier(str(path), **load)
        if model.config.num_labels != 1:
            raise RewardError(f"{path} is a classifier with {model.config.num_labels} labels; a reward model has "
                              "one output (num_labels=1).")
        tokenizer = load_tokenizer(str(path) if (path / "tokenizer_config.json").is_file() else base,
                                   trust_remote_code=trust_remote_code)
        model.config.pad_token_id = tokenizer.pad_token_id  # the classifier reads its score at the last non-pad token
        model.eval()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(model, tokenizer, batch_size=batch_size, device=device, normalize=normalize,
                   mean=stats.get("reward_mean"), std=stats.get("reward_std"), name=str(path))

    @torch.no_grad()
    def raw_scores(self, prompts: Sequence[Any], completions: Sequence[Any]) -> torch.Tensor:
        """Unnormalised rewards on CPU, shape ``(n,)``. Texts are batched by length, so each batch pads little."""
        if len(prompts) != len(completions):
            raise RewardError(f"Reward model {self.name}: {len(prompts)} prompts but {len(completions)} completions.")
        prompts, completions = list(prompts), list(completions)  # also accepts datasets' lazy Column objects
        encoded = [reward_input_ids(p, c, self.tokenizer) for p, c in zip(prompts, completions, strict=True)]
        limit = self.max_length
        if limit:  # decoders read the score at the last token (keep the end), encoders at the first (keep the start)
            encoded = [ids[-limit:] if self._reads_last_token else ids[:limit] for ids in encoded]
        scores = torch.empty(len(encoded), dtype=torch.float32)
        was_training = self.model.training
        self.model.eval()
        pad = self.tokenizer.pad_token_id
        for idx in length_batches([len(ids) for ids in encoded], self.batch_size):
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # right padding, as in training
                ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, :len(encoded[i])] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            scores[idx] = logits.reshape(len(idx), -1)[:, 0].float().cpu()
        self.model.train(was_training)
        return scores

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        scores = self.raw_scores(prompts, completions)
        if self.normalize:
            scores = (scores - self.mean) / self.std
        return check_rewards(scores, len(prompts), self.name)

    def __repr__(self) -> str:
        return f"ClassifierReward({self.name}, normalize={self.normalize})"


def find_adapter_base(path: Path) -> str:
    """The adapter's base model: as PEFT recorded it (relative to the working directory at training time, or a Hub
    id), else where the reward stage recorded it relative to the artifact, so a moved run folder still loads."""
    recorded = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    relative = _run_record(path).get("base_model_relative")
    candidates = [c for c in (recorded, str(path / relative) if relative else None) if c]
    for candidate in candidates:
        if Path(candidate).is_dir():
            return candidate
    if recorded and not recorded.startswith((".", "/", "~")) and recorded.count("/") <= 1:
        return recorded  # a Hub id
    raise ArtifactError(f"Cannot find the base model of the adapter in {path}; tried {candidates}. Pass "
                        "base_model= (or load_reward(spec, base_model=...)) with its location.")


def read_reward_stats(path: Path) -> dict[str, float]:
    """The reward mean / std over the training responses that the reward stage recorded (none: {})."""
    run = _run_record(path)
    return {k: run[k] for k in ("reward_mean", "reward_std") if k in run}


def _run_record(path: Path) -> dict:
    """The ``run`` entry of the reward stage's metrics.json ({} without one). Reward models saved before every stage
    wrote one schema kept these facts at the top level: they still load."""
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        return {}
    data = json.loads(metrics.read_text())
    return data["run"] if isinstance(data.get("run"), dict) else data
