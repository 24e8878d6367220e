"""The preference pairs DPO trains and is evaluated on: loaded with their held-out pairs (:func:`load_pairs`), then
turned into the token ids TRL's DPOTrainer trains on - TRL's tokenization done in batches and cached - and fitted to
``max_length`` with every cut or dropped pair counted.

:func:`prepare_pairs` is what the DPO stage runs on each split (:func:`tokenize_pairs` then
:func:`apply_length_limit`); the ``evaluate`` stage uses the same two for its held-out pairs. The output has
exactly the columns TRL's DPOTrainer computes itself (``TOKEN_COLUMNS``), so :class:`rlhf_lm.trainers.DPOTrainer`
trains on it as it is.

Why our own tokenization rather than TRL's ``_prepare_dataset`` and the datasets cache it goes through: it is
measurably faster. ``benchmarks/dpo_vs_trl.py`` (``benchmarks/results/dpo_vs_trl.json``: 2000 pairs of the built-in
task, its tiny Llama tokenizer, one CPU thread, TRL 1.16) measured 2.98x TRL's pairs/s on a cold cache and 113x on a
rerun that reads the token cache back. Replace it with TRL's once that ratio drops to about 1.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from datasets import Dataset

from rlhf_lm.data.formats import normalize_preferences
from rlhf_lm.data.loading import hh_as_messages, load_preference_data
from rlhf_lm.data.readers import load_rows
from rlhf_lm.data.report import DataReport
from rlhf_lm.errors import DataError

LENGTH_MODES = ("truncate_prompt", "truncate", "drop")
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def load_pairs(cfg, tokenizer=None) -> tuple[Dataset, Dataset | None, DataReport, DataReport]:
    """Train / held-out pairs from the DPO stage's config, each with its report (``tokenizer`` decides
    ``hh_format: auto``). The held-out pairs come from ``eval_dataset_name`` when it is set, else from the split or
    share of the training data that ``load_preference_data`` holds out."""
    if cfg.eval_dataset_name:  # the held-out pairs live elsewhere: train on all of dataset_name
        keys = ("dataset_name", "dataset_config", "dataset_train_split", "data_format", "hh_format", "prompt_column",
                "chosen_column", "rejected_column", "max_train_samples", "max_eval_samples")
        train_args = SimpleNamespace(**{k: getattr(cfg, k) for k in keys}, dataset_eval_split=None, eval_fraction=0.0)
        train, _, report = load_preference_data(train_args, seed=cfg.seed, tokenizer=tokenizer)
    else:
        train, eval_ds, report = load_preference_data(cfg, seed=cfg.seed, tokenizer=tokenizer)
    if cfg.eval_dataset_name:
        rows = load_rows(cfg.eval_dataset_name, cfg.dataset_eval_split or "train", cfg.dataset_config)
        eval_ds, eval_report = normalize_preferences(rows, cfg.data_format, cfg.prompt_column, cfg.chosen_column,
                                                     cfg.rejected_column, cfg.seed, hh_as_messages(cfg, tokenizer))
        if cfg.max_eval_samples:
            eval_ds = eval_ds.select(range(min(cfg.max_eval_samples, len(eval_ds))))
    else:
        eval_report = DataReport(source=f"{report.source} (eval)", rows_in=len(eval_ds) if eval_ds is not None else 0)
    if eval_ds is not None and len(eval_ds) == 0:
        raise DataError(f"The eval split of {eval_report.source} is empty. Give held-out pairs (eval_dataset_name or "
                        "dataset_eval_split), or set eval_fraction: 0 to train without one.")
    return train, eval_ds, report, eval_report


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _encode(tokenizer, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of ``texts``, straight from the Rust tokenizer when that gives what ``tokenizer(texts)`` gives.

    ``tokenizer(texts)`` builds an attention mask and a Python ``Encoding`` per row that DPO never reads; skipping
    them is about a third of the tokenization time. The shortcut is taken only when the backend has no truncation or
    padding of its own and splits special tokens as the wrapper would.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if (backend is not None and hasattr(backend, "encode_batch_fast") and backend.truncation is None
            and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def _tokenize_batch(batch: dict[str, list], tokenizer) -> dict[str, list]:
    """TRL's DPO tokenization of a batch, with one tokenizer call per column instead of three per row."""
    prompts, chosen, rejected = batch["prompt"], batch["chosen"], batch["rejected"]
    if isinstance(prompts[0], str):
        eos = tokenizer.eos_token
        chosen = [c if c.endswith(eos) else c + eos for c in chosen]
        rejected = [r if r.endswith(eos) else r + eos for r in rejected]
        unique = list(dict.fromkeys(prompts))  # several pairs often share a prompt: tokenize it once
        ids_of = dict(zip(unique, _encode(tokenizer, unique), strict=True))
        prompt_ids = [ids_of[p] for p in prompts]
        chosen_full = _encode(tokenizer, [p + c for p, c in zip(prompts, chosen, strict=True)])
        rejected_full = _encode(tokenizer, [p + r for p, r in zip(prompts, rejected, strict=True)])
    else:  # conversational: render with the chat template (which carries its own special tokens), then tokenize
        render = tokenizer.apply_chat_template
        prompt_text = render(prompts, tokenize=False, add_generation_prompt=True)
        chosen_text = render([p + c for p, c in zip(prompts, chosen, strict=True)], tokenize=False)
        rejected_text = render([p + r for p, r in zip(prompts, rejected, strict=True)], tokenize=False)
        prompt_ids, chosen_full, rejected_full = (_encode(tokenizer, t, add_special_tokens=False)
                                                  for t in (prompt_text, chosen_text, rejected_text))
    out: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for p, c, r in zip(prompt_ids, chosen_full, rejected_full, strict=True):
        # As TRL does: the completion starts where prompt and prompt+completion tokenizations diverge.
        n = min(_common_prefix(p, c), _common_prefix(p, r))
        out["prompt_ids"].append(p[:n])
        out["chosen_ids"].append(c[n:])
        out["rejected_ids"].append(r[n:])
    return out


TOKENIZATION_VERSION = "1"  # bump when _tokenize_batch changes, so cached results are not reused


def tokenizer_fingerprint(tokenizer) -> str:
    """A content hash of everything that decides the token ids (vocabulary, merges, template, special tokens)."""
    from datasets.fingerprint import Hasher

    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else tokenizer
    return Hasher.hash((type(tokenizer).__name__, state, tokenizer.eos_token, getattr(tokenizer, "chat_template", None),
                        bool(getattr(tokenizer, "split_special_tokens", False))))


def tokenize_pairs(ds: Dataset, tokenizer, num_proc: int | None = None, batch_size: int = 1000,
                   cache_dir: str | Path | None = None) -> Dataset:
    """``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` exactly as TRL's DPOTrainer would compute them.

    TRL maps three single-row tokenizer calls (plus an EOS pass) over the data; here each batch goes through the
    fast tokenizer once per column, and a prompt shared by several pairs is tokenized once. That is where the
    preprocessing speed-up comes from. With ``cache_dir`` the result is stored under a fingerprint of the data's
    content and the tokenizer, so the next run on the same data (another beta, another seed) reads it back instead.
    """
    if len(ds) == 0:
        return Dataset.from_dict({c: [] for c in TOKEN_COLUMNS})
    cache = {}
    if cache_dir is not None:
        from datasets.fingerprint import Hasher

        fingerprint = Hasher.hash((ds._fingerprint, tokenizer_fingerprint(tokenizer), TOKENIZATION_VERSION))
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache = dict(new_fingerprint=fingerprint, load_from_cache_file=True,
                     cache_file_name=str(Path(cache_dir) / f"dpo-pairs-{fingerprint}.arrow"))
    return ds.map(_tokenize_batch, batched=True, batch_size=batch_size, num_proc=num_proc,
                  fn_kwargs={"tokenizer": tokenizer}, remove_columns=ds.column_names, desc="Tokenizing pairs",
                  **cache)


def apply_length_limit(ds: Dataset, max_length: int | None, mode: str, report: DataReport) -> Dataset:
    """Fit tokenized pairs into ``max_length``; every pair that is cut or dropped is counted in ``report``.

    ``mode="truncate_prompt"`` cuts over-long prompts from the left (the last turns stay) to leave room for the longer
    response, and drops only pairs whose response alone fills ``max_length``. Otherwise a prompt that alone fills
    ``max_length`` leaves no completion token to learn from and is dropped (TRL would drop it silently);
    ``mode="truncate"`` keeps the other over-long pairs for TRL's collator to cut from the end (``keep_start``) and
    ``mode="drop"`` removes them.
    """
    if max_length is None or len(ds) == 0:
        report.rows_out = len(ds)
        return ds
    import numpy as np
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]  # lengths straight from Arrow: no Python lists of token ids
    prompt_len, chosen_len, rejected_len = (pc.list_value_length(table[c]).to_numpy() for c in TOKEN_COLUMNS)
    if mode == "truncate_prompt":
        return _truncate_prompts(ds, max_length, max_length - np.maximum(chosen_len, rejected_len), prompt_len, report)
    pair_len = prompt_len + np.maximum(chosen_len, rejected_len)
    prompt_too_long = prompt_len >= max_length
    over = ~prompt_too_long & (pair_len > max_length)
    if prompt_too_long.any():
        report.drop(f"prompt alone has >= max_length={max_length} tokens", int(prompt_too_long.sum()))
    if over.any() and mode == "drop":
        report.drop(f"pair over max_length={max_length}", int(over.sum()))
    elif over.any():
        report.truncated[f"completion cut at max_length={max_length}"] += int(over.sum())
    keep = ~prompt_too_long & ~over if mode == "drop" else ~prompt_too_long
    report.rows_out = int(keep.sum())
    return ds if keep.all() else ds.select(np.flatnonzero(keep))


def _truncate_prompts(ds: Dataset, max_length: int, room, prompt_len, report: DataReport) -> Dataset:
    """Keep the last ``room[i]`` prompt tokens of each pair (what its longer response leaves of ``max_length``)."""
    import numpy as np

    no_room = room < 1
    cut = ~no_room & (prompt_len > room)
    if no_room.any():
        report.drop(f"response alone has >= max_length={max_length} tokens", int(no_room.sum()))
    if cut.any():
        report.truncated[f"prompt cut from the left to fit max_length={max_length}"] += int(cut.sum())
        keep_tokens = dict(zip(np.flatnonzero(cut).tolist(), room[cut].tolist(), strict=True))
        ds = ds.map(lambda row, i: {"prompt_ids": row["prompt_ids"][-keep_tokens[i]:]} if i in keep_tokens else {},
                    with_indices=True, desc="Cutting long prompts from the left")
    report.rows_out = int((~no_room).sum())
    return ds if not no_room.any() else ds.select(np.flatnonzero(~no_room))


def token_cache_dir(cache_tokenized: bool) -> Path | None:
    """Where :func:`tokenize_pairs` keeps its results: under the datasets cache, so clearing that clears ours too."""
    if not cache_tokenized:
        return None
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "rlhf_lm"


def prepare_pairs(ds: Dataset, tokenizer, cfg, report: DataReport, split: str,
                  cache_dir: str | Path | None = None) -> Dataset:
    """Tokenize (or read back from ``cache_dir``) and length-limit one split: the token columns TRL trains on.

    ``cfg`` is the DPO stage's config: its ``dataset_num_proc``, ``max_length`` and ``length_mode`` are read."""
    tokenized = tokenize_pairs(ds, tokenizer, num_proc=cfg.dataset_num_proc, cache_dir=cache_dir)
    tokenized = apply_length_limit(tokenized, cfg.max_length, cfg.length_mode, report)
    if len(tokenized) == 0:
        raise DataError(f"No {split} pairs left after the length limit ({report.summary()}). Raise max_length or "
                        "shorten the prompts.")
    return tokenized
