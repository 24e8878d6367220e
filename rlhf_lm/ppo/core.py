"""The math of PPO for language models, as pure functions on tensors (each tested against hand-computed values).

Shapes: ``(batch, response_length)`` for per-token quantities, with a ``mask`` that is 1 on response tokens up to
and including the first EOS and 0 on the padding after it. Masked positions never contribute to a mean, an advantage
or a loss.

References: Schulman et al. 2015 (GAE), Schulman et al. 2017 (PPO), Ziegler et al. 2019 (per-token KL penalty and
the adaptive KL controller), Schulman 2020 "Approximating KL divergence" (the k1 / k3 estimators).
The ``full`` KL option (exact over the vocabulary, see :func:`exact_kl`) is ours.
"""

from __future__ import annotations

import math

import torch


# ---------------------------------------------------------------------------------------------- masked statistics
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (over all of them, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of ``x`` (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1.0)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Scale the masked entries of ``x`` to unit variance (and zero mean unless ``shift_mean=False``).

    ``shift_mean=False`` is for rewards: shifting them would change how much each token is worth relative to the
    end of the sequence, while scaling keeps the ordering of returns.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


# ------------------------------------------------------------------------------------------------------- KL
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled from the policy.

    With ``log_ratio = logprobs - ref_logprobs``:

    * ``k1 = log_ratio``: unbiased, but single tokens can be negative (the classic RLHF penalty).
    * ``k3 = exp(-log_ratio) - 1 + log_ratio``: also unbiased, and never negative, with lower variance when the
      policies are close (Schulman 2020).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"Unknown KL estimator '{estimator}': use k1 or k3.")


def exact_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(policy(. | s_t) || reference(. | s_t))`` at each position, summed over the whole vocabulary.

    ``logits`` and ``ref_logits`` are ``(..., vocab)``; returns ``(...)``. Unlike k1/k3, which see only the token that
    was sampled, this sees every token: probability the policy moved onto a token the reference finds very unlikely
    counts at every visit of the state, not only in the rare rollout that happens to sample it.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    ref_logp = torch.log_softmax(ref_logits.float() / temperature, dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * kl`` on every response token, plus the sequence score on its last token."""
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


# -------------------------------------------------------------------------------------------------- advantages
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation. Returns ``(advantages, returns)`` with ``returns = advantages + values``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``; the value after the last
    response token is 0 (the episode ends there). Masked positions are zeroed first so they add nothing.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


# ------------------------------------------------------------------------------------------------------ losses
def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, ``mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))`` over response tokens.

    Returns the loss and detached stats: ``clipfrac`` (share of tokens where the clipped term won) and ``approxkl``
    (``0.5 * mean(log_ratio^2)``, the old-vs-new policy drift within the PPO epochs).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range_value: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, ``0.5 * mean(max((V - R)^2, (V_clipped - R)^2))`` with ``V_clipped`` kept within
    ``clip_range_value`` of the rollout's value. Returns the loss and detached ``clipfrac``."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_err > unclipped_err).float(), mask)}
    return loss, stats


# ---------------------------------------------------------------------------------------------- KL controllers
class FixedKLController:
    """A constant KL coefficient. ``value`` is a plain attribute, so a callback may set it."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019: steer the KL coefficient so the observed KL tracks ``target``.

    ``error = clip(KL / target - 1, -0.2, 0.2)``; ``value *= 1 + error * n_steps / horizon``, where ``n_steps`` is
    the number of samples (episodes) seen since the last update.
    """

    def __init__(self, value: float, target: float, horizon: float):
        super().__init__(value)
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


# --------------------------------------------------------------------------------------------- running moments
class RunningMoments:
    """Running mean / std of every score seen so far (Chan et al.'s parallel update), for score normalisation.

    Batch whitening would throw away whether this batch was better than the last; running statistics keep that
    signal while putting scores on a unit scale, whatever the reward model's range.
    """

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean, batch_var = x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.count > 1 else 1.0

    def normalize(self, x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        return (x - self.mean) / (self.std + eps)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
