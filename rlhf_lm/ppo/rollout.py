"""Rollouts: batched, KV-cached sampling from the policy, then the per-token quantities PPO needs.

Prompts are left-padded so every completion starts at the same column; ``generate`` keeps the KV cache and stops
once every row has emitted EOS. Tokens after a row's first EOS become padding and are masked out everywhere.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from rlhf_lm.ppo.core import exact_kl
from rlhf_lm.ppo.model import PolicyWithValueHead
from rlhf_lm.rewards import RewardModel, check_rewards
from rlhf_lm.sampling import Prompt, left_pad, pad_token_id, sample, sampling_config, stop_token_ids


@dataclass
class Rollout:
    """One batch of sampled completions, with everything the PPO update reads (response tensors are (B, R))."""

    input_ids: torch.Tensor       # (B, P + R) prompt (left-padded) + response (right-padded after EOS)
    attention_mask: torch.Tensor  # (B, P + R)
    response_start: int           # P
    response_mask: torch.Tensor   # (B, R) 1 up to and including the first EOS
    logprobs: torch.Tensor        # (B, R) under the sampling policy
    ref_logprobs: torch.Tensor    # (B, R) under the reference (adapters disabled)
    values: torch.Tensor          # (B, R)
    entropy: torch.Tensor         # (B, R)
    scores: torch.Tensor          # (B,) reward-model scores, before any penalty or normalisation
    has_eos: torch.Tensor         # (B,) bool
    prompts: list[Prompt]         # as the data has them: text, or a list of messages
    completions: list[str]
    full_kl: torch.Tensor | None = None  # (B, R) exact KL(policy || reference) per position (kl_estimator: full)


def truncate_after_eos(responses: torch.Tensor, stop_ids: list[int],
                       pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad everything after the first stop token (any EOS id). Returns (responses, mask incl. that token, has_eos
    per row)."""
    is_eos = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    has_eos = is_eos.any(1)
    no_eos = torch.full_like(has_eos, responses.shape[1], dtype=torch.long)
    first_eos = torch.where(has_eos, is_eos.long().argmax(1), no_eos)
    positions = torch.arange(responses.shape[1], device=responses.device)
    mask = positions[None, :] <= first_eos[:, None]
    return responses.masked_fill(~mask, pad_id), mask.long(), has_eos


def token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor,
                               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each sampled token and the entropy of each next-token distribution, at ``temperature``."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    token_logp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return token_logp, entropy


@torch.no_grad()
def collect_rollout(model: PolicyWithValueHead, tokenizer, prompts: list[Prompt], prompt_ids: list[list[int]],
                    reward_model: RewardModel, args, forward_batch_size: int, reward_name: str = "reward_model",
                    autocast=None) -> Rollout:
    """Sample one completion per prompt, score it, and compute logprobs, reference logprobs, values and entropy.

    Samples come from the full softmax at ``args.temperature`` (cut only by ``args.top_k`` / ``args.top_p``, never
    by the checkpoint's generation_config), the distribution the log-probs below are computed from.
    """
    device = next(model.parameters()).device
    pad_id, stop_ids = pad_token_id(tokenizer), stop_token_ids(model.policy, tokenizer)
    query, query_mask = left_pad(prompt_ids, pad_id, device)
    config = sampling_config(max_new_tokens=args.max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    was_training = model.training
    model.eval()
    with (autocast or nullcontext)():
        sequences = sample(model.policy, query, query_mask, config)
    start = query.shape[1]
    responses, response_mask, has_eos = truncate_after_eos(sequences[:, start:], stop_ids, pad_id)
    input_ids = torch.cat([query, responses], 1)
    attention_mask = torch.cat([query_mask, response_mask], 1)

    parts = {"logprobs": [], "ref_logprobs": [], "values": [], "entropy": []}
    if args.kl_estimator == "full":
        parts["full_kl"] = []
    for i in range(0, len(prompts), forward_batch_size):
        ids, mask, resp = (input_ids[i:i + forward_batch_size], attention_mask[i:i + forward_batch_size],
                           responses[i:i + forward_batch_size])
        with (autocast or nullcontext)():
            logits, values = model(ids, mask, start)
            ref_logits = model.reference_logits(ids, mask, start)
        logp, entropy = token_logprobs_and_entropy(logits, resp, args.temperature)
        ref_logp, _ = token_logprobs_and_entropy(ref_logits, resp, args.temperature)
        for key, value in (("logprobs", logp), ("ref_logprobs", ref_logp), ("values", values.float()),
                           ("entropy", entropy)):
            parts[key].append(value)
        if "full_kl" in parts:
            parts["full_kl"].append(exact_kl(logits, ref_logits, args.temperature))
    model.train(was_training)

    # The text a reward model sees ends at EOS; the special tokens themselves are not part of the completion. The
    # prompts go as the data has them, so a classifier reward lays them out as in its training.
    completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
    scores = check_rewards(reward_model(list(prompts), completions), len(prompts), reward_name).to(device)
    mask_f = response_mask.float()
    return Rollout(
        input_ids=input_ids, attention_mask=attention_mask, response_start=start, response_mask=response_mask,
        scores=scores, has_eos=has_eos, prompts=list(prompts), completions=completions,
        **{k: torch.cat(v) * mask_f for k, v in parts.items()},
    )
