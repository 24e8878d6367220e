"""Train / eval datasets from a config's data arguments: read, normalise, hold out an eval split (never the training
rows again), cap the sample counts - and the held-out prompts a run can be judged on."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset

from rlhf_lm.data.formats import normalize_preferences
from rlhf_lm.data.prompts import normalize_prompts
from rlhf_lm.data.readers import load_rows
from rlhf_lm.data.report import DataReport
from rlhf_lm.data.rows import Rows
from rlhf_lm.errors import DataError

logger = logging.getLogger(__name__)


def train_eval_split(ds: Dataset, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Deterministic split by seed; ``eval_fraction == 0`` gives no eval set."""
    if eval_fraction <= 0:
        return ds, None
    n_eval = max(1, int(round(len(ds) * eval_fraction)))
    if n_eval >= len(ds):
        raise DataError(f"eval_fraction={eval_fraction} leaves no training rows out of {len(ds)}.")
    split = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return split["train"], split["test"]


def hh_as_messages(args, tokenizer=None) -> bool:
    """Whether HH-RLHF dialogues become chat messages: ``hh_format`` 'messages', or 'auto' with a tokenizer that has
    a chat template (an instruct model is then trained on HH in its own chat format)."""
    hh_format = getattr(args, "hh_format", "text")
    if hh_format == "auto":
        return getattr(tokenizer, "chat_template", None) is not None
    return hh_format == "messages"


DEFAULT_EVAL_FRACTION = 0.1


def _naming_source(rows: Rows, normalize: Callable, *args):
    """``normalize(rows, *args)``, with a DataError that does not say which data it is about prefixed with the
    source (e.g. a format that cannot be detected from the columns)."""
    try:
        return normalize(rows, *args)
    except DataError as e:
        if rows.source in str(e):
            raise
        raise DataError(f"{rows.source}: {e}") from e


def held_out_split(args) -> tuple[str | None, float]:
    """(eval split name, eval fraction) the held-out data comes from, refusing an eval split a source cannot have.

    A single file (or an in-memory Dataset) is one split: a ``dataset_eval_split`` on it would read the training
    rows again and call them held out. That is an error - unless ``eval_fraction`` is set, which then holds out that
    fraction of the file instead (and says so).
    """
    fraction = args.eval_fraction
    source = args.dataset_name
    single = isinstance(source, Dataset) or (isinstance(source, (str, os.PathLike))
                                             and Path(os.path.expanduser(str(source))).is_file())
    if not args.dataset_eval_split or not single:
        return args.dataset_eval_split, DEFAULT_EVAL_FRACTION if fraction is None else fraction
    name = "the in-memory dataset" if isinstance(source, Dataset) else str(source)
    if fraction:
        logger.warning("dataset_eval_split '%s' ignored: %s is a single file with no such split; holding out "
                       "eval_fraction=%s of it instead.", args.dataset_eval_split, name, fraction)
        return None, fraction
    raise DataError(f"dataset_eval_split '{args.dataset_eval_split}' names no held-out data in {name}: a single file "
                    "is one split, so evaluation would reuse the training rows. Point dataset_name at a directory or "
                    "Hub dataset that has that split, or set eval_fraction (e.g. 0.1) to hold out part of the file.")


def load_preference_data(args, seed: int = 0, tokenizer=None) -> tuple[Dataset, Dataset | None, DataReport]:
    """Train / eval preference datasets from ``DataArguments`` (or any object with the same fields). ``tokenizer``
    (the model's) decides ``hh_format: auto``."""
    if not args.dataset_name:
        raise DataError("No dataset given: set dataset_name (a local file, a directory, or a Hub dataset id).")
    eval_split, eval_fraction = held_out_split(args)
    rows = load_rows(args.dataset_name, args.dataset_train_split, args.dataset_config)
    hh_messages = hh_as_messages(args, tokenizer)
    train, report = _naming_source(rows, normalize_preferences, args.data_format, args.prompt_column,
                                   args.chosen_column, args.rejected_column, seed, hh_messages)
    if eval_split:
        eval_rows = load_rows(args.dataset_name, eval_split, args.dataset_config)
        eval_ds, eval_report = _naming_source(eval_rows, normalize_preferences, args.data_format, args.prompt_column,
                                              args.chosen_column, args.rejected_column, seed, hh_messages)
        report.dropped.update({f"eval: {k}": v for k, v in eval_report.dropped.items()})
    else:
        train, eval_ds = train_eval_split(train, eval_fraction, seed)
    train = _take(train, args.max_train_samples, report)
    eval_ds = _take(eval_ds, args.max_eval_samples)
    logger.info(report.summary())
    return train, eval_ds, report


def load_prompt_data(args, seed: int = 0, tokenizer=None) -> tuple[Dataset, Dataset | None, DataReport]:
    """Train / eval prompt datasets from ``DataArguments``; ``tokenizer`` decides ``hh_format: auto``."""
    if not args.dataset_name:
        raise DataError("No prompt dataset given: set dataset_name (a local file, a directory, or a Hub id).")
    eval_split, eval_fraction = held_out_split(args)
    rows = load_rows(args.dataset_name, args.dataset_train_split, args.dataset_config)
    hh_messages = hh_as_messages(args, tokenizer)
    train, report = _naming_source(rows, normalize_prompts, args.prompt_column, hh_messages)
    if eval_split:
        eval_ds, _ = _naming_source(load_rows(args.dataset_name, eval_split, args.dataset_config), normalize_prompts,
                                    args.prompt_column, hh_messages)
        eval_ds = _without_training_prompts(eval_ds, train, report, eval_split)
    else:
        train, eval_ds = train_eval_split(train, eval_fraction, seed)
    return _take(train, args.max_train_samples, report), _take(eval_ds, args.max_eval_samples), report


def _without_training_prompts(eval_ds: Dataset, train: Dataset, report: DataReport, split: str) -> Dataset:
    """Held-out prompts that also occur in training measure memory, not generalisation: drop and count them."""
    seen = {json.dumps(p) for p in train["prompt"]}
    keep = [i for i, p in enumerate(eval_ds["prompt"]) if json.dumps(p) not in seen]
    if len(keep) < len(eval_ds):
        report.drop(f"eval: held-out prompt also in the training data ({split})", len(eval_ds) - len(keep))
    if not keep:
        raise DataError(f"Every prompt of the held-out split '{split}' also occurs in the training split; give "
                        "dataset_eval_split prompts the policy is not trained on.")
    return eval_ds.select(keep)


def unseen_prompts(held_out: Dataset | None, train: Dataset) -> list[Any]:
    """The distinct prompts of ``held_out`` rows that no ``train`` row has, in their first-seen order."""
    if held_out is None:
        return []
    seen = {json.dumps(p) for p in train["prompt"]}
    out = []
    for prompt in held_out["prompt"]:
        key = json.dumps(prompt)
        if key not in seen:
            seen.add(key)
            out.append(prompt)
    return out


def held_out_prompts(args, seed: int = 0, tokenizer=None) -> list[Any]:
    """The prompts a run held out of its training data (its eval split, or its eval_fraction share), none of them a
    training prompt: the default prompts to judge a policy on, given the data arguments it was trained with."""
    if getattr(args, "data_format", None) == "prompt_only":
        _, eval_ds, _ = load_prompt_data(args, seed, tokenizer)  # already de-duplicated against training
        return list(eval_ds["prompt"]) if eval_ds is not None else []
    train, eval_ds, _ = load_preference_data(args, seed, tokenizer)
    return unseen_prompts(eval_ds, train)


def _take(ds: Dataset | None, n: int | None, report: DataReport | None = None) -> Dataset | None:
    """The first ``n`` rows; with a ``report``, the rows left out are counted, so its numbers add up to the rows read
    and the later drops (length limits) read against the rows actually used."""
    if ds is None or not n or n >= len(ds):
        return ds
    if report is not None:
        report.drop(f"beyond max_train_samples={n}", len(ds) - n)
        report.rows_out = n
    return ds.select(range(n))
