"""Load preference and prompt datasets, normalise them to TRL's format, and validate with row-precise errors.

Sources: a Hub dataset id, a local .json / .jsonl (also .gz) / .parquet / .csv file (or a directory of them), or
an in-memory ``datasets.Dataset``. Nothing is dropped silently: every dropped row is counted by reason in a
:class:`DataReport`, and a dataset left empty is an error that says why.

* :mod:`~rlhf_lm.data.readers` - raw rows from a file, a directory, the Hub or a Dataset (:func:`load_rows`)
* :mod:`~rlhf_lm.data.rows` - :class:`Rows` (a dataset that names its rows in errors) and the checks of a value
* :mod:`~rlhf_lm.data.formats` - preference formats (HH-RLHF, explicit, conversational, UltraFeedback, SHP)
* :mod:`~rlhf_lm.data.hh_rlhf` - HH-RLHF dialogues split into prompt and response, as text or chat messages
* :mod:`~rlhf_lm.data.prompts` - prompt-only rows for PPO / GRPO / RLOO
* :mod:`~rlhf_lm.data.loading` - train / eval datasets from a config's data arguments, held-out prompts
* :mod:`~rlhf_lm.data.lengths` - the one length filter (counted drops or truncation)
* :mod:`~rlhf_lm.data.report` - :class:`DataReport`

Submodules import each other directly (never this package), so importing any one of them starts no cycle.
"""

from rlhf_lm.data.formats import NORMALISERS, PREFERENCE_FORMATS, detect_format, normalize_preferences
from rlhf_lm.data.hh_rlhf import ASSISTANT_TAG, hh_dialogue_messages, split_hh_dialogue
from rlhf_lm.data.lengths import filter_by_length
from rlhf_lm.data.loading import (
    DEFAULT_EVAL_FRACTION,
    held_out_prompts,
    held_out_split,
    hh_as_messages,
    load_preference_data,
    load_prompt_data,
    train_eval_split,
    unseen_prompts,
)
from rlhf_lm.data.prompts import normalize_prompts
from rlhf_lm.data.readers import LOCAL_SUFFIXES, load_rows
from rlhf_lm.data.report import DataReport
from rlhf_lm.data.rows import Rows

__all__ = [
    "ASSISTANT_TAG",
    "DEFAULT_EVAL_FRACTION",
    "LOCAL_SUFFIXES",
    "NORMALISERS",
    "PREFERENCE_FORMATS",
    "DataReport",
    "Rows",
    "detect_format",
    "filter_by_length",
    "held_out_prompts",
    "held_out_split",
    "hh_as_messages",
    "hh_dialogue_messages",
    "load_preference_data",
    "load_prompt_data",
    "load_rows",
    "normalize_preferences",
    "normalize_prompts",
    "split_hh_dialogue",
    "train_eval_split",
    "unseen_prompts",
]
