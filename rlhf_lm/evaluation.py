"""Evaluate a fine-tuned policy against its reference on held-out prompts.

Shared by DPO, PPO, GRPO, the pipeline and ``rlhf-lm evaluate``:

* :func:`generate_completions` - batched sampling (left padding, KV cache, stops at EOS; chat prompts go through the
  chat template),
* :func:`sequence_kl` - per-sample KL(policy || reference) per completion token,
* :func:`evaluate_policy` - policy vs reference samples on the same prompts: win-rate judged by any RewardModel,
  mean rewards, KL, the built-in task's gold reward, and a JSONL file of samples,
* :func:`preference_accuracy` - DPO's implicit-reward accuracy and margin on held-out pairs, from TRL's own
  ``DPOTrainer.evaluate()``,
* :func:`evaluate_pairs` - a reward model's metrics on labelled pairs, scored as the policy stages will score it.

The reference of a LoRA policy needs no second model: it is the same model with its adapters switched off, or, when
the policy was trained from an earlier adapter (e.g. SFT), the frozen copy of that adapter named ``"ref"`` that TRL's
DPOTrainer keeps (see :func:`reference_mode`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rlhf_lm.errors import ConfigError, DataError
from rlhf_lm.reward_metrics import preference_metrics
from rlhf_lm.rewards import ClassifierReward, GoldReward, RewardModel, check_rewards
from rlhf_lm.sampling import (
    Prompt,
    encode_prompts,
    left_pad,
    length_batches,
    pad_token_id,
    position_ids_from_mask,
    sample,
    sampling_config,
    seeded,
    stop_token_ids,
)

logger = logging.getLogger(__name__)

REF_ADAPTER = "ref"  # the name TRL's DPOTrainer gives the frozen copy of a pre-trained adapter


# ----------------------------------------------------------------------------------------------------- helpers
def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def reference_mode(policy) -> Iterator[Any]:
    """Turn a LoRA policy into its own reference for the duration of the block (no second copy of the weights).

    With a ``"ref"`` adapter (a policy trained on from an earlier adapter) that adapter is switched on; otherwise
    all adapters are switched off, leaving the base model.
    """
    if not _is_peft(policy):
        raise ConfigError("reference=None needs a LoRA (PEFT) policy, whose reference is the adapter-free model. "
                          "Pass the reference model explicitly for a fully fine-tuned policy.")
    if REF_ADAPTER in policy.peft_config:
        active = policy.active_adapter
        policy.set_adapter(REF_ADAPTER)
        try:
            yield policy
        finally:
            policy.set_adapter(active)
    else:
        with policy.disable_adapter():
            yield policy


def _as_reference(policy, reference):
    """A context manager yielding the reference model (the explicit one, or the policy in reference mode)."""
    return contextlib.nullcontext(reference) if reference is not None else reference_mode(policy)


def _device(model) -> torch.device:
    return next(model.parameters()).device


# -------------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_token_ids(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
) -> list[list[int]]:
    """Sample a completion for each tokenized prompt; returns the generated ids (up to and including EOS).

    Prompts are grouped by length (:func:`rlhf_lm.sampling.length_batches`: little padding) and left-padded; the
    KV cache is on. Tokens come from the plain softmax at ``temperature`` whatever the checkpoint's generation_config
    says, and stop at any of its EOS ids (:mod:`rlhf_lm.sampling`). Sampling is seeded in a forked RNG, so the same
    seed gives the same samples and the caller's random state is untouched.
    """
    if not prompt_ids:
        return []
    if any(len(p) == 0 for p in prompt_ids):
        raise DataError("Cannot generate from an empty prompt.")
    pad_id = pad_token_id(tokenizer)
    stop_ids = stop_token_ids(model, tokenizer)
    device = _device(model)
    config = sampling_config(max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                             temperature=temperature, top_k=top_k, top_p=top_p)
    was_training = model.training
    model.eval()
    out: list[list[int] | None] = [None] * len(prompt_ids)
    try:
        with seeded(seed, device):
            for batch in length_batches([len(p) for p in prompt_ids], batch_size):
                ids, mask = left_pad([prompt_ids[i] for i in batch], pad_id, device)
                generated = sample(model, ids, mask, config)[:, ids.shape[1]:]
                for row, i in zip(generated.tolist(), batch, strict=True):
                    out[i] = _cut_at_eos(row, set(stop_ids))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def _cut_at_eos(row: list[int], eos_ids: set[int]) -> list[int]:
    """Keep tokens up to and including the first EOS (what follows is padding)."""
    for j, t in enumerate(row):
        if t in eos_ids:
            return row[:j + 1]
    return row


def generate_completions(model, tokenizer, prompts: list[Prompt], **sampling: Any) -> list[str]:
    """Sample one completion per prompt and decode it (special tokens, EOS included, are stripped).

    ``sampling`` takes the keyword options of :func:`generate_token_ids` (``max_new_tokens``, ``temperature``,
    ``top_k``, ``top_p``, ``batch_size``, ``seed``), with its defaults: one list of options for both, so they cannot
    drift apart. ``temperature=0`` decodes greedily. Conversational prompts (lists of messages) go through the
    tokenizer's chat template with ``add_generation_prompt=True``.
    """
    ids = generate_token_ids(model, tokenizer, encode_prompts(tokenizer, prompts), **sampling)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------- KL
@torch.no_grad()
def completion_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                        batch_size: int = 64) -> list[torch.Tensor]:
    """Per-token log-probabilities (float32, on CPU) of each completion given its prompt.

    Rows are laid out ``[pad .. prompt completion .. pad]`` so every completion token sits in the last
    ``max completion length`` positions and only those logits are computed (``logits_to_keep``); position ids
    follow the attention mask, as in generation. Rows are batched by length (:func:`rlhf_lm.sampling.length_batches`).
    """
    device = _device(model)
    was_training = model.training
    model.eval()
    out: list[torch.Tensor | None] = [None] * len(prompt_ids)
    try:
        lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
        for batch in length_batches(lengths, batch_size):
            prompts = [prompt_ids[i] for i in batch]
            completions = [completion_ids[i] for i in batch]
            width_p = max(len(p) for p in prompts)
            width_c = max(max(len(c) for c in completions), 1)
            n = len(prompts)
            ids = torch.full((n, width_p + width_c), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
                ids[i, width_p - len(p):width_p + len(c)] = torch.tensor(p + c)
                mask[i, width_p - len(p):width_p + len(c)] = 1
            ids, mask = ids.to(device), mask.to(device)
            # logits at position t predict token t+1: the completion's tokens are predicted from width_p-1 onwards
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                           logits_to_keep=width_c + 1, use_cache=False).logits[:, :-1].float()
            targets = ids[:, width_p:]
            token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
            for row, (i, c) in enumerate(zip(batch, completions, strict=True)):
                out[i] = token_logps[row, :len(c)].cpu()
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def kl_per_token(policy_logps: list[torch.Tensor], reference_logps: list[torch.Tensor]) -> torch.Tensor:
    """Mean over each completion's tokens of ``log p_policy - log p_ref`` (the k1 estimator); 0 for empty ones."""
    return torch.stack([(p - r).mean() if p.numel() else torch.tensor(0.0)
                        for p, r in zip(policy_logps, reference_logps, strict=True)])


def sequence_kl(policy, reference, tokenizer, prompts: list[Prompt], completions: list[str],
                batch_size: int = 64) -> torch.Tensor:
    """Per-sample KL(policy || reference) per completion token, shape ``(n,)``.

    The estimator is k1 (Schulman's notation): ``mean_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]`` over
    the completion's tokens. It is unbiased for the KL when the completions were sampled from ``policy``, and can
    be negative on a single sample. Each completion is re-tokenized and ends with EOS, as DPO training sees it.
    ``reference=None`` uses a LoRA policy's adapter-free base (see :func:`reference_mode`).
    """
    if len(prompts) != len(completions):
        raise DataError(f"sequence_kl got {len(prompts)} prompts but {len(completions)} completions.")
    prompt_ids = encode_prompts(tokenizer, prompts)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    completion_ids = [ids + eos for ids in tokenizer(list(completions), add_special_tokens=False)["input_ids"]]
    pad_id = pad_token_id(tokenizer)
    policy_logps = completion_logprobs(policy, prompt_ids, completion_ids, pad_id, batch_size)
    with _as_reference(policy, reference) as ref:
        reference_logps = completion_logprobs(ref, prompt_ids, completion_ids, pad_id, batch_size)
    return kl_per_token(policy_logps, reference_logps)


# ---------------------------------------------------------------------------------------------------- win-rate
def win_rate(policy_scores: torch.Tensor, reference_scores: torch.Tensor) -> float:
    """Fraction of prompts where the policy's sample scores higher than the reference's; ties count half."""
    if policy_scores.numel() == 0:
        return float("nan")
    wins = (policy_scores > reference_scores).float() + 0.5 * (policy_scores == reference_scores).float()
    return wins.mean().item()


def length_controlled_win_rate(policy_scores: torch.Tensor, reference_scores: torch.Tensor,
                               policy_lengths: torch.Tensor, reference_lengths: torch.Tensor,
                               slope_prior: float = 0.1) -> float:
    """The win-rate the judge would give if both answers had the same length.

    Reward models, human labellers and LLM judges all tend to prefer one length (HH-RLHF's harmless reward models
    prefer shorter answers), and a policy can win by moving its length alone. As in AlpacaEval 2's length-controlled
    win-rate, a logistic regression ``P(win) = sigmoid(a + b * tanh(d / std(d)))`` is fitted to the per-prompt
    outcomes (ties count half), with ``d`` the policy's answer length minus the reference's; ``sigmoid(a)`` is the
    win-rate at equal lengths. ``slope_prior`` is a weak L2 penalty on ``b`` that keeps it finite when length separates
    wins from losses perfectly (the intercept is then only loosely determined; 0.1 moves the answer by about 0.005
    on 40 prompts where it is determined). Fitted by Newton's method: with two parameters the Hessian is a 2 x 2
    matrix, shorter to write than an optimizer loop and exact in a few steps.
    """
    if policy_scores.numel() == 0:
        return float("nan")
    wins = ((policy_scores > reference_scores).double() + 0.5 * (policy_scores == reference_scores).double()).cpu()
    diff = (policy_lengths.double() - reference_lengths.double()).cpu()
    scale = diff.std() if diff.numel() > 1 else diff.new_tensor(0.0)
    x = torch.tanh(diff / scale) if scale > 0 else torch.zeros_like(diff)
    design = torch.stack([torch.ones_like(x), x], dim=1)
    # 1e-6 on the intercept keeps it finite when every prompt is won (or lost); sigmoid(a) is then within 1e-3 of 1.
    prior = torch.diag(torch.tensor([1e-6, slope_prior], dtype=torch.float64))
    params = torch.zeros(2, dtype=torch.float64)
    for _ in range(100):
        p = torch.sigmoid(design @ params)
        grad = design.T @ (p - wins) + prior @ params
        hessian = design.T @ (design * (p * (1 - p)).unsqueeze(1)) + prior
        step = torch.linalg.solve(hessian, grad)
        params = params - step
        if step.abs().max() < 1e-10:
            break
    return torch.sigmoid(params[0]).item()


def evaluate_policy(
    policy,
    tokenizer,
    prompts: list[Prompt],
    reward_model: RewardModel | None = None,
    *,
    reference=None,
    gold: bool = False,
    samples_path: str | Path | None = None,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """Sample from the policy and from its reference on ``prompts`` and compare them.

    Metrics (all under ``eval/``): ``win_rate`` of policy over reference judged by ``reward_model`` (ties count
    half) and ``lc_win_rate``, the same at equal answer lengths (:func:`length_controlled_win_rate`),
    ``reward/policy`` and ``reward/reference`` (mean scores), ``kl`` (mean over prompts of the per-token k1
    KL(policy || reference) on the policy's own samples, see :func:`sequence_kl`), ``length/policy`` and
    ``length/reference`` (mean generated tokens), ``num_prompts``; with ``gold=True`` the built-in task's gold reward
    (:class:`rlhf_lm.rewards.GoldReward`) is one more judge: ``gold_reward/policy``, ``gold_reward/reference``,
    ``gold_win_rate`` and ``gold_lc_win_rate``. Both models sample with the same seed.

    ``reference=None`` with a LoRA policy uses the policy itself in :func:`reference_mode` (no second copy).
    ``samples_path`` gets one JSON line per prompt: prompt, policy and reference completions, and their scores.
    """
    if not prompts:
        raise DataError("No evaluation prompts: the held-out prompt set is empty.")
    if reward_model is None and not gold:
        logger.info("evaluate_policy: no reward model and gold=False, so only KL and lengths are reported.")
    prompt_ids = encode_prompts(tokenizer, prompts)
    gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed)
    policy_ids = generate_token_ids(policy, tokenizer, prompt_ids, **gen)
    pad_id = pad_token_id(tokenizer)
    policy_logps = completion_logprobs(policy, prompt_ids, policy_ids, pad_id, batch_size)
    with _as_reference(policy, reference) as ref:
        reference_ids = generate_token_ids(ref, tokenizer, prompt_ids, **gen)
        ref_logps_on_policy = completion_logprobs(ref, prompt_ids, policy_ids, pad_id, batch_size)
    kl = kl_per_token(policy_logps, ref_logps_on_policy)

    policy_texts = tokenizer.batch_decode(policy_ids, skip_special_tokens=True)
    reference_texts = tokenizer.batch_decode(reference_ids, skip_special_tokens=True)
    n = len(prompts)
    metrics: dict[str, float] = {
        "eval/num_prompts": float(n),
        "eval/kl": kl.mean().item(),
        "eval/length/policy": sum(map(len, policy_ids)) / n,
        "eval/length/reference": sum(map(len, reference_ids)) / n,
    }
    columns: dict[str, list[float]] = {"kl": kl.tolist()}
    lengths_pol, lengths_ref = (torch.tensor([len(ids) for ids in side]) for side in (policy_ids, reference_ids))
    # Every judge is a RewardModel, the built-in task's gold reward included; (judge, metric prefix, column prefix).
    judges = [(reward_model, "", "reward")] if reward_model is not None else []
    if gold:
        judges.append((GoldReward(), "gold_", "gold"))
    for judge, metric, column in judges:
        name = getattr(judge, "name", type(judge).__name__)
        # A judge gets the prompts as the data has them (messages stay messages), so a classifier lays the text out
        # as it did in training (rlhf_lm.rewards.layout.reward_text), with its own chat template.
        r_pol = check_rewards(judge(list(prompts), policy_texts), n, name).cpu()
        r_ref = check_rewards(judge(list(prompts), reference_texts), n, name).cpu()
        lc_win_rate = length_controlled_win_rate(r_pol, r_ref, lengths_pol, lengths_ref)
        metrics.update({f"eval/{metric}win_rate": win_rate(r_pol, r_ref), f"eval/{metric}lc_win_rate": lc_win_rate,
                        f"eval/{metric}reward/policy": r_pol.mean().item(),
                        f"eval/{metric}reward/reference": r_ref.mean().item()})
        columns.update({f"{column}_policy": r_pol.tolist(), f"{column}_reference": r_ref.tolist()})
    if samples_path is not None:
        write_samples(samples_path, prompts, policy_texts, reference_texts, columns)
    return metrics


def write_samples(path: str | Path, prompts: list[Prompt], policy: list[str], reference: list[str],
                  columns: dict[str, list[float]]) -> None:
    """One JSON line per prompt: ``prompt``, ``policy``, ``reference`` and a ``scores`` dict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, (p, a, b) in enumerate(zip(prompts, policy, reference, strict=True)):
            scores = {k: round(v[i], 6) for k, v in columns.items()}
            f.write(json.dumps({"prompt": p, "policy": a, "reference": b, "scores": scores}) + "\n")


# ------------------------------------------------------------------------------------------ implicit rewards
IMPLICIT_METRICS = {"eval_rewards/accuracies": "eval/implicit_accuracy", "eval_rewards/margins": "eval/implicit_margin",
                    "eval_loss": "eval/dpo_loss", "eval_rewards/chosen": "eval/implicit_reward/chosen",
                    "eval_rewards/rejected": "eval/implicit_reward/rejected"}


def implicit_reward_metrics(trl_metrics: dict[str, float]) -> dict[str, float]:
    """Rename the metrics of ``DPOTrainer.evaluate()`` to our ``eval/`` keys (accuracy, margin, loss, rewards)."""
    return {ours: float(trl_metrics[theirs]) for theirs, ours in IMPLICIT_METRICS.items() if theirs in trl_metrics}


@torch.no_grad()
def implicit_reward_accuracy(policy, tokenizer, pairs, beta: float, *, reference=None,
                             batch_size: int = 64) -> dict[str, float]:
    """DPO's implicit-reward accuracy and margin on tokenized pairs, without a trainer.

    ``pairs`` has ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` (``rlhf_lm.preference_pairs.tokenize_pairs``). The
    implicit reward is ``beta * (sum log pi(y|x) - sum log pi_ref(y|x))`` over the completion tokens, as in TRL's
    DPOTrainer; this is what ``rlhf-lm evaluate`` uses for a saved policy (inside a training run the stage reads the
    same numbers from ``DPOTrainer.evaluate()``; the tests check that the two agree). TRL averages per-batch means,
    so when the last eval batch is smaller than the others its numbers differ slightly from these per-pair means.
    """
    if len(pairs) == 0:
        raise DataError("implicit_reward_accuracy got no pairs.")
    pad_id = pad_token_id(tokenizer)
    prompts = list(pairs["prompt_ids"]) * 2
    completions = list(pairs["chosen_ids"]) + list(pairs["rejected_ids"])
    policy_logps = torch.stack([t.sum() for t in completion_logprobs(policy, prompts, completions, pad_id,
                                                                     batch_size)])
    with _as_reference(policy, reference) as ref:
        ref_logps = torch.stack([t.sum() for t in completion_logprobs(ref, prompts, completions, pad_id,
                                                                      batch_size)])
    rewards = beta * (policy_logps - ref_logps)
    chosen, rejected = rewards.chunk(2)
    return {"eval/implicit_accuracy": (chosen > rejected).float().mean().item(),
            "eval/implicit_margin": (chosen - rejected).mean().item(),
            "eval/implicit_reward/chosen": chosen.mean().item(), "eval/implicit_reward/rejected": rejected.mean().item()}


def preference_accuracy(trainer, eval_dataset=None) -> dict[str, float]:
    """DPO's implicit-reward accuracy and margin on held-out pairs, computed by TRL's ``DPOTrainer.evaluate()``.

    The implicit reward of a completion is ``beta * (log pi(y|x) - log pi_ref(y|x))``; accuracy is the fraction of
    pairs whose chosen completion gets the higher one, margin the mean difference. ``trainer`` is a DPOTrainer
    (e.g. :func:`rlhf_lm.stages.dpo.build_trainer`); ``eval_dataset`` defaults to its own eval split.
    """
    if eval_dataset is None and trainer.eval_dataset is None:
        raise DataError("preference_accuracy needs held-out pairs: the trainer has no eval split.")
    return implicit_reward_metrics(trainer.evaluate(eval_dataset))


def _text_len(value: Any, tokenizer) -> int:
    text = value if isinstance(value, str) else " ".join(m["content"] for m in value)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def evaluate_pairs(reward: ClassifierReward, pairs, gold: bool = False) -> dict[str, float]:
    """All reward metrics on prompt/chosen/rejected rows, scored by ``reward`` as it will be scored downstream."""
    prompts, chosen, rejected = pairs["prompt"], pairs["chosen"], pairs["rejected"]
    r_c, r_r = reward.raw_scores(prompts, chosen), reward.raw_scores(prompts, rejected)
    lens_c = torch.tensor([_text_len(c, reward.tokenizer) for c in chosen])
    lens_r = torch.tensor([_text_len(r, reward.tokenizer) for r in rejected])
    gold_c = gold_r = None
    if gold:
        from rlhf_lm.builtin_task.task import gold_reward

        gold_c = torch.tensor([gold_reward(p, c) for p, c in zip(prompts, chosen, strict=True)])
        gold_r = torch.tensor([gold_reward(p, r) for p, r in zip(prompts, rejected, strict=True)])
    return preference_metrics(r_c, r_r, lens_c, lens_r, gold_c, gold_r)
