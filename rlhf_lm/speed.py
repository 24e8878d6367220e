"""Speed helpers shared by the stages: the length column that lets transformers' length-grouped sampler work with
preference data, length-ordered scoring passes, and a fast fingerprint for TRL's reference log-prob cache.

Padding is compute thrown away: every pad position runs through every layer. DPO pads the chosen and rejected
sequences of a batch to one width, so one long response makes the whole batch long. Grouping batches by length
(transformers' ``train_sampling_strategy="group_by_length"``: random mega-batches of 50 batches, each sorted by
length) keeps the randomness between batches and removes most of that waste; the DPO and reward stages do it by
default (:class:`LengthGroupedBatches`). ``benchmarks/gpu_bench.py --padding`` measures the padding on real HH-RLHF
pairs (``benchmarks/padding.py``) and ``benchmarks/cpu_defaults.py`` the time it saves; the numbers are in
docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

LENGTH_COLUMN = "length"  # transformers' TrainingArguments.length_column_name default


def pair_lengths(dataset):
    """Width each pair of a tokenized preference dataset needs (numpy array): DPO's prompt_ids / chosen_ids /
    rejected_ids, or RewardTrainer's chosen_ids / rejected_ids (each already holding the prompt). Read straight from
    Arrow, without turning token ids into Python lists."""
    import numpy as np
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    chosen, rejected = (pc.list_value_length(table[c]).to_numpy() for c in ("chosen_ids", "rejected_ids"))
    prompt = pc.list_value_length(table["prompt_ids"]).to_numpy() if "prompt_ids" in table.column_names else 0
    return prompt + np.maximum(chosen, rejected)


def add_length_column(dataset, column: str = LENGTH_COLUMN):
    """``dataset`` with a ``length`` column: :func:`pair_lengths`."""
    return dataset.add_column(column, pair_lengths(dataset).tolist())


def in_length_order(dataset, score):
    """``score(dataset)`` computed over the rows sorted longest first, returned in the original row order.

    A one-off pass over every row (e.g. DPO's precomputed reference log-probs) walks the data in stored order,
    where batches are as padded as random ones; sorted, neighbours have nearly equal lengths. Longest first, so a
    batch too big for memory fails at once. ``score`` must return the rows it was given, in that order.
    """
    import numpy as np

    order = np.argsort(-pair_lengths(dataset), kind="stable")
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return score(dataset.select(order)).select(inverse)


def with_length_column(dataset, args):
    """``dataset`` with a length column when ``args`` (TrainingArguments) group batches by length and it has none."""
    from datasets import Dataset

    if (args.train_sampling_strategy == "group_by_length" and isinstance(dataset, Dataset)
            and args.length_column_name not in dataset.column_names):
        return add_length_column(dataset, args.length_column_name)
    return dataset


class LengthGroupedBatches:
    """Trainer mixin (put it before TRL's DPOTrainer / RewardTrainer): with
    ``train_sampling_strategy="group_by_length"``, batches hold pairs of similar length (evaluation batches too).

    transformers' samplers read the lengths from a ``length`` column but TRL's tokenized datasets have none, and the
    Trainer prunes columns its model does not take before the sampler sees them. So: add the column once TRL has
    tokenized a dataset, and keep it through the pruning (TRL's collators ignore columns they do not know).
    """

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return with_length_column(super()._prepare_dataset(dataset, processing_class, args, dataset_name), args)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.args.length_column_name not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.args.length_column_name]


def fingerprint_module(module: torch.nn.Module) -> str:
    """A 128-bit fingerprint of a module's state: every tensor's name, dtype, shape and raw bytes (xxh3).

    TRL keys its cache of precomputed reference log-probs by ``trl.trainer.utils.hash_module``, which copies every
    weight to fp32 and runs SHA-256 over it: 12.5 s for a 1.5B model (measured on the H200 as the setup cost of
    precomputing, and on CPU), about 8 s per billion parameters, paid by every run before its first step. A cache key
    needs no cryptographic hash: xxh3 over the bytes as stored takes 0.12 s for the same model and still changes
    with any changed bit (xxhash is a dependency of ``datasets``).
    """
    import xxhash

    digest = xxhash.xxh3_128()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@contextlib.contextmanager
def fast_reference_fingerprint(trainer_module) -> Iterator[None]:
    """While constructing a TRL trainer, key its precomputed reference log-probs by :func:`fingerprint_module`.

    TRL calls ``hash_module`` from inside ``DPOTrainer.__init__`` (between loading the models and the precompute
    pass) with no hook to replace it, so the name is swapped in the trainer's module for the duration of the
    construction and put back afterwards.
    """
    original = trainer_module.hash_module
    trainer_module.hash_module = fingerprint_module
    try:
        yield
    finally:
        trainer_module.hash_module = original
