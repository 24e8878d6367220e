"""Trained reward models as ``RewardModel`` objects, reward wrappers, and the metrics a reward model is judged by.

* :class:`ClassifierReward` scores text with a one-label sequence classifier: a ``rlhf-lm reward`` artifact (base +
  LoRA adapter, or a full model) or any Hugging Face classifier directory. It carries its own tokenizer and chat
  template and re-tokenises the text it is given, so it works whatever tokenizer the policy uses.
* :class:`NormalizedReward` and :class:`EnsembleReward` put rewards on a common scale and combine them.
* :func:`preference_metrics` and the pure functions beside it (accuracy, margin, calibration, length bias).

The text a classifier sees is built exactly as TRL's RewardTrainer builds it in training: ``prompt + completion +
eos`` for plain text, the chat template over ``prompt + [assistant reply]`` for conversations. Scoring at inference
with any other layout would silently shift the rewards.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf_lm.artifacts import METRICS_FILE
from rlhf_lm.errors import ArtifactError, DataError, RewardError
from rlhf_lm.fsdp import is_sharded
from rlhf_lm.rewards import RewardModel, check_rewards

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


# ------------------------------------------------------------------------------------------------ pure metrics
def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Fraction of pairs where the chosen response scores higher (a tie counts as half right)."""
    diff = r_chosen - r_rejected
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()


def expected_calibration_error(p_chosen: torch.Tensor, n_bins: int = 10) -> float:
    """ECE of the Bradley-Terry probability ``p = sigmoid(r_chosen - r_rejected)`` that the chosen response wins.

    Each pair is a binary prediction with confidence ``max(p, 1 - p)`` that is correct when ``p > 0.5``. Pairs are
    binned by confidence on [0.5, 1] into ``n_bins`` equal-width bins; ECE = sum over bins of (bin share) x
    |accuracy - mean confidence|. 0 means the probabilities can be taken at face value.
    """
    confidence = torch.maximum(p_chosen, 1 - p_chosen)
    correct = (p_chosen > 0.5).float()
    # confidence lies in [0.5, 1]; map it to a bin index, with confidence == 1 in the last bin.
    bins = ((confidence - 0.5) * 2 * n_bins).long().clamp(max=n_bins - 1)
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            gap = (correct[in_bin].mean() - confidence[in_bin].mean()).abs().double()
            ece += in_bin.double().mean() * gap
    return ece.item()


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation; 0.0 when either side is constant (no linear relation can be measured)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = x.norm() * y.norm()
    return (x @ y / denom).item() if denom > 0 else 0.0


def preference_metrics(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    len_chosen: torch.Tensor | None = None,
    len_rejected: torch.Tensor | None = None,
    gold_chosen: torch.Tensor | None = None,
    gold_rejected: torch.Tensor | None = None,
    n_bins: int = 10,
) -> dict[str, float]:
    """Everything we report about a reward model on labelled pairs, as flat ``reward/...`` metrics.

    ``len_*`` (response lengths, e.g. in tokens) add the length-bias metrics: how often "the longer answer wins" would
    be right on these labels (``reward/length_baseline_accuracy``; ties count half), how often the model prefers the
    longer answer, and the correlation of reward with length. ``gold_*`` (noise-free scores, only for evaluation)
    add accuracy against the gold preference, pairs with a gold tie excluded.
    """
    r_chosen, r_rejected = r_chosen.float(), r_rejected.float()
    diff = r_chosen - r_rejected
    metrics = {
        "reward/accuracy": pairwise_accuracy(r_chosen, r_rejected),
        "reward/margin": diff.mean().item(),
        "reward/ece": expected_calibration_error(torch.sigmoid(diff), n_bins),
        "reward/chosen_mean": r_chosen.mean().item(),
        "reward/rejected_mean": r_rejected.mean().item(),
        "reward/num_pairs": float(len(diff)),
    }
    if len_chosen is not None and len_rejected is not None:
        len_chosen, len_rejected = len_chosen.float(), len_rejected.float()
        longer = torch.sign(len_chosen - len_rejected)  # +1: chosen is longer, -1: rejected is longer, 0: tie
        metrics["reward/length_baseline_accuracy"] = ((longer > 0).float() + 0.5 * (longer == 0).float()).mean().item()
        prefers_longer = torch.sign(diff) == longer
        metrics["reward/prefers_longer"] = prefers_longer[longer != 0].float().mean().item() if (longer != 0).any() \
            else float("nan")
        metrics["reward/length_corr"] = pearson(torch.cat([r_chosen, r_rejected]),
                                                torch.cat([len_chosen, len_rejected]))
    if gold_chosen is not None and gold_rejected is not None:
        gold_diff = gold_chosen.float() - gold_rejected.float()
        decided = gold_diff != 0
        metrics["reward/gold_accuracy"] = (torch.sign(diff[decided]) == torch.sign(gold_diff[decided])).float().mean() \
            .item() if decided.any() else float("nan")
        metrics["reward/label_gold_agreement"] = (gold_diff[decided] > 0).float().mean().item() if decided.any() \
            else float("nan")
    return metrics


# ------------------------------------------------------------------------------------------- classifier reward
def reward_text(prompt: Any, completion: Any, tokenizer) -> str:
    """The text a reward classifier scores, laid out exactly as TRL's RewardTrainer lays out training pairs."""
    if isinstance(prompt, list):  # conversational: chat template over the prompt turns + the reply
        reply = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        return tokenizer.apply_chat_template(prompt + reply, tokenize=False)
    text = prompt + completion
    eos = tokenizer.eos_token
    return text if text.endswith(eos) else text + eos


def reward_input_ids(prompt: Any, completion: Any, tokenizer) -> list[int]:
    """Token ids of :func:`reward_text`, with special tokens added as TRL adds them (plain text only: a chat template
    already writes its own)."""
    text = reward_text(prompt, completion, tokenizer)
    return tokenizer(text, add_special_tokens=not isinstance(prompt, list))["input_ids"]


def fit_pairs_to_length(ds, tokenizer, max_length: int, report, mode: str = "truncate_prompt"):
    """Make every pair fit ``max_length`` tokens as the reward model is trained on it (:func:`reward_input_ids`);
    every pair that is cut or dropped is counted in ``report`` (TRL's RewardTrainer drops longer pairs silently).

    ``mode="truncate_prompt"`` drops a conversation's earliest turns (a system message stays) or cuts a text prompt
    from the left until the longer of its two sides fits, so the last turns - what the responses answer - are kept;
    only pairs whose response does not fit even after the last user turn are dropped. ``mode="drop"`` drops every
    pair over ``max_length``.
    """
    def length(prompt, completion) -> int:
        return len(reward_input_ids(prompt, completion, tokenizer))

    def fits(prompt, row) -> bool:
        return max(length(prompt, row["chosen"]), length(prompt, row["rejected"])) <= max_length

    kept, cut = [], 0
    for row in ds:
        prompt = row["prompt"]
        if not fits(prompt, row):
            prompt = _shorter_prompt(prompt, row, fits, tokenizer) if mode == "truncate_prompt" else None
            if prompt is None:
                report.drop(f"pair over max_length={max_length}" if mode == "drop"
                            else f"response does not fit max_length={max_length} even after the last user turn")
                continue
            cut += 1
        kept.append({**row, "prompt": prompt})
    if cut:
        report.truncated[f"prompt cut from the left to fit max_length={max_length}"] += cut
    report.rows_out = len(kept)
    if not kept:
        raise DataError(f"No pair of {report.source} fits max_length={max_length} ({report.summary()}). Raise "
                        "max_length or shorten the data.")
    from datasets import Dataset

    return Dataset.from_list(kept)


def _shorter_prompt(prompt: Any, row: dict, fits, tokenizer) -> Any:
    """The longest tail of ``prompt`` with which ``row`` fits (see :func:`fit_pairs_to_length`), or None."""
    if isinstance(prompt, list):
        head = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
        turns = prompt[len(head):]
        for start in range(1, len(turns)):
            if turns[start]["role"] == "user" and fits(head + turns[start:], row):
                return head + turns[start:]
        return None
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for keep in range(len(ids) - 1, 0, -max(1, len(ids) // 16)):  # a few re-tokenizations, not one per token
        tail = tokenizer.decode(ids[-keep:])
        if fits(tail, row):
            return tail
    return None


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
        stats = _read_stats(path)
        load = dict(dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle_weights=allow_pickle_weights)
        if has_adapter:
            from peft import PeftModel

            base = base_model or _find_base(path)
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
        """Unnormalised rewards on CPU, shape ``(n,)``. Longest texts first, so each batch pads little."""
        if len(prompts) != len(completions):
            raise RewardError(f"Reward model {self.name}: {len(prompts)} prompts but {len(completions)} completions.")
        prompts, completions = list(prompts), list(completions)  # also accepts datasets' lazy Column objects
        encoded = [reward_input_ids(p, c, self.tokenizer) for p, c in zip(prompts, completions, strict=True)]
        limit = self.max_length
        if limit:  # decoders read the score at the last token (keep the end), encoders at the first (keep the start)
            encoded = [ids[-limit:] if self._reads_last_token else ids[:limit] for ids in encoded]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        scores = torch.empty(len(encoded), dtype=torch.float32)
        was_training = self.model.training
        self.model.eval()
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
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


def _find_base(path: Path) -> str:
    """The adapter's base model: as PEFT recorded it (relative to the working directory at training time, or a Hub
    id), else where the reward stage recorded it relative to the artifact, so a moved run folder still loads."""
    recorded = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    metrics = path / METRICS_FILE
    relative = json.loads(metrics.read_text()).get("base_model_relative") if metrics.is_file() else None
    candidates = [c for c in (recorded, str(path / relative) if relative else None) if c]
    for candidate in candidates:
        if Path(candidate).is_dir():
            return candidate
    if recorded and not recorded.startswith((".", "/", "~")) and recorded.count("/") <= 1:
        return recorded  # a Hub id
    raise ArtifactError(f"Cannot find the base model of the adapter in {path}; tried {candidates}. Pass "
                        "base_model= (or load_reward(spec, base_model=...)) with its location.")


def _read_stats(path: Path) -> dict[str, float]:
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        return {}
    data = json.loads(metrics.read_text())
    return {k: data[k] for k in ("reward_mean", "reward_std") if k in data}


# ----------------------------------------------------------------------------------------------- wrappers
def reward_stats(reward: RewardModel, prompts: Sequence[Any], completions: Sequence[Any]) -> tuple[float, float]:
    """Mean and std of ``reward`` over a calibration set (e.g. responses from the training data)."""
    values = check_rewards(reward(list(prompts), list(completions)), len(prompts), _name(reward))
    return values.mean().item(), values.std(unbiased=False).item()


class NormalizedReward:
    """``(reward - mean) / std`` with fixed statistics: puts any reward model on a unit scale.

    Fixed (not per-batch) statistics keep a completion's reward independent of what it is batched with. Get them from
    a reward-stage artifact, or from :meth:`fit` on a calibration set.
    """

    def __init__(self, reward: RewardModel, mean: float, std: float, name: str | None = None):
        if not std or not math.isfinite(std) or not math.isfinite(mean):
            raise RewardError(f"NormalizedReward({_name(reward)}): std must be a positive finite number, got "
                              f"mean={mean}, std={std}. Calibrate on completions whose rewards differ.")
        self.reward, self.mean, self.std = reward, float(mean), float(std)
        self.name = name or f"normalized({_name(reward)})"

    @classmethod
    def fit(cls, reward: RewardModel, prompts: Sequence[Any], completions: Sequence[Any]) -> NormalizedReward:
        mean, std = reward_stats(reward, prompts, completions)
        return cls(reward, mean, std)

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        raw = check_rewards(self.reward(prompts, completions), len(prompts), _name(self.reward))
        return (raw - self.mean) / self.std

    def __repr__(self) -> str:
        return f"NormalizedReward({_name(self.reward)}, mean={self.mean:.4g}, std={self.std:.4g})"


class EnsembleReward:
    """A weighted sum of reward models, each first normalised to mean 0 / std 1 (so weights mean what they say).

    A member that is already normalised (a ``NormalizedReward``, or a ``ClassifierReward`` with ``normalize=True``)
    is used as is; others are normalised with statistics from ``calibration=(prompts, completions)``. Pass
    ``normalize=False`` to add raw rewards.
    """

    def __init__(
        self,
        members: Sequence[RewardModel],
        weights: Sequence[float] | None = None,
        normalize: bool = True,
        calibration: tuple[Sequence[Any], Sequence[Any]] | None = None,
    ):
        if not members:
            raise RewardError("EnsembleReward needs at least one member reward model.")
        weights = list(weights) if weights is not None else [1.0 / len(members)] * len(members)
        if len(weights) != len(members):
            raise RewardError(f"EnsembleReward: {len(members)} members but {len(weights)} weights.")
        for m in members:
            if not callable(m):
                raise RewardError(f"EnsembleReward member {m!r} is not callable; members must be reward models.")
        self.weights = [float(w) for w in weights]
        if normalize:
            members = [self._normalized(m, calibration) for m in members]
        self.members = list(members)

    @staticmethod
    def _normalized(member: RewardModel, calibration) -> RewardModel:
        if isinstance(member, NormalizedReward) or getattr(member, "normalize", False) is True:
            return member
        if calibration is None:
            raise RewardError(f"EnsembleReward: member {_name(member)} is not normalised and no calibration set was "
                              "given. Pass calibration=(prompts, completions), wrap it in NormalizedReward, or "
                              "set normalize=False.")
        return NormalizedReward.fit(member, *calibration)

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        total = torch.zeros(len(prompts))
        for w, m in zip(self.weights, self.members, strict=True):
            total += w * check_rewards(m(prompts, completions), len(prompts), _name(m))
        return total

    def __repr__(self) -> str:
        parts = ", ".join(f"{w:g}*{_name(m)}" for w, m in zip(self.weights, self.members, strict=True))
        return f"EnsembleReward({parts})"


def _name(reward: Any) -> str:
    return getattr(reward, "name", None) or type(reward).__name__
