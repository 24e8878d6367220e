"""The metrics a reward model is judged by on labelled preference pairs: accuracy, margin, calibration (ECE),
length bias and agreement with a gold preference. Pure functions on tensors."""

from __future__ import annotations

import torch


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
