"""Padding statistics: how much of a batch is padding, for random and length-grouped batch orders.

Only the benchmarks need these (``benchmarks/gpu_bench.py --padding``); the stages group batches by length with
:class:`rlhf_lm.speed.LengthGroupedBatches`. Padding is compute thrown away: every pad position runs through every
layer, and DPO pads the chosen and rejected sequences of a batch to one width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def pair_length(prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> int:
    """Width a preference pair needs in a DPO batch: the prompt plus the longer of its two responses."""
    return len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))


def batch_order(lengths: Sequence[int], batch_size: int, group_by_length: bool, seed: int = 0) -> list[int]:
    """The order a sampler would visit rows in: a random permutation, or transformers' length-grouped one."""
    generator = torch.Generator().manual_seed(seed)
    if group_by_length:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        return list(get_length_grouped_indices(list(lengths), batch_size, generator=generator))
    return torch.randperm(len(lengths), generator=generator).tolist()


def padded_width(longest: int, pad_to_multiple_of: int | None = None) -> int:
    if not pad_to_multiple_of:
        return longest
    return math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of


def padding_fraction(
    sequence_lengths: Sequence[Sequence[int]], pad_to_multiple_of: int | None = None
) -> float:
    """Share of the positions in ``batches`` that are padding. Each batch is the lengths of the sequences padded
    together (for DPO: the chosen and the rejected sequence of every pair)."""
    real = padded = 0
    for batch in sequence_lengths:
        width = padded_width(max(batch), pad_to_multiple_of)
        real += sum(batch)
        padded += width * len(batch)
    return 1.0 - real / padded if padded else 0.0


def dpo_padding_fraction(
    chosen_lengths: Sequence[int],
    rejected_lengths: Sequence[int],
    batch_size: int,
    group_by_length: bool = False,
    pad_to_multiple_of: int | None = None,
    seed: int = 0,
) -> float:
    """Padding share of DPO batches of ``batch_size`` pairs (prompt+chosen and prompt+rejected lengths per pair),
    visited in random or length-grouped order; the last incomplete batch is dropped."""
    pair_lengths = [max(c, r) for c, r in zip(chosen_lengths, rejected_lengths)]
    order = batch_order(pair_lengths, batch_size, group_by_length, seed)
    batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    return padding_fraction([[chosen_lengths[i] for i in b] + [rejected_lengths[i] for i in b] for b in batches],
                            pad_to_multiple_of)
