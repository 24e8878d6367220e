"""The data layer: every source and format normalises to prompt/chosen/rejected; bad input fails precisely."""

import gzip
import json

import pytest
from datasets import Dataset

from rlhf_lm.configs import DataArguments
from rlhf_lm.data import (
    DataReport,
    filter_by_length,
    load_preference_data,
    load_prompt_data,
    load_rows,
    normalize_preferences,
    normalize_prompts,
    split_hh_dialogue,
    train_eval_split,
)
from rlhf_lm.errors import ConfigError, DataError

HH = [
    {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks.",
     "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Go away."},
    {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 4"},  # identical
]
EXPLICIT = [{"prompt": "Q1", "chosen": "good", "rejected": "bad"}, {"prompt": "Q2", "chosen": "yes", "rejected": "no"}]
CONVERSATIONAL = [{
    "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go"}],
}]
ULTRAFEEDBACK = [
    {"prompt": "Write a haiku", "completions": [{"response": "a", "overall_score": 3.0},
                                                {"response": "b", "overall_score": 9.0},
                                                {"response": "c", "overall_score": 5.0}]},
    {"prompt": "Tie", "completions": [{"response": "x", "overall_score": 2.0}, {"response": "y", "overall_score": 2.0}]},
]
SHP = [
    {"history": "Why is the sky blue?", "human_ref_A": "Rayleigh", "human_ref_B": "Magic", "labels": 1},
    {"history": "Best pet?", "human_ref_A": "Cat", "human_ref_B": "Dog", "labels": 0},
    {"history": "Tie?", "human_ref_A": "p", "human_ref_B": "q", "labels": None, "score_A": 3, "score_B": 3},
]


def write_jsonl(path, rows, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def test_hh_rlhf_splits_at_last_assistant_turn(tmp_path):
    ds, report = normalize_preferences(load_rows(write_jsonl(tmp_path / "hh.jsonl", HH)))
    row = ds[0]
    assert row["prompt"] == "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"
    assert (row["chosen"], row["rejected"]) == (" Fine, thanks.", " Go away.")
    assert report.dropped == {"chosen == rejected": 1} and report.rows_out == 1


def test_explicit_conversational_ultrafeedback_shp(tmp_path):
    ds, _ = normalize_preferences(load_rows(Dataset.from_list(EXPLICIT)))
    assert ds[1] == {"prompt": "Q2", "chosen": "yes", "rejected": "no"}

    ds, _ = normalize_preferences(load_rows(Dataset.from_list(CONVERSATIONAL)))
    assert ds[0]["prompt"] == [{"role": "user", "content": "Hi"}]
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "Hello"}]

    ds, report = normalize_preferences(load_rows(write_jsonl(tmp_path / "uf.jsonl", ULTRAFEEDBACK)), seed=3)
    assert ds[0]["chosen"] == "b" and ds[0]["rejected"] in {"a", "c"}
    assert report.dropped == {"all completions tie on score": 1}

    ds, report = normalize_preferences(load_rows(write_jsonl(tmp_path / "shp.jsonl", SHP)))
    assert [(r["chosen"], r["rejected"]) for r in ds] == [("Rayleigh", "Magic"), ("Dog", "Cat")]
    assert report.dropped == {"tie": 1}


def test_custom_column_names_and_explicit_format():
    rows = [{"q": "Q", "good": "A", "bad": "B"}]
    ds, _ = normalize_preferences(load_rows(Dataset.from_list(rows)), "explicit", "q", "good", "bad")
    assert ds[0] == {"prompt": "Q", "chosen": "A", "rejected": "B"}


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "json", "parquet", "csv"])
def test_every_file_type_loads(tmp_path, suffix):
    path = tmp_path / f"pairs.{suffix}"
    ds = Dataset.from_list(EXPLICIT)
    if suffix.startswith("jsonl"):
        write_jsonl(path, EXPLICIT, gz=suffix.endswith("gz"))
    elif suffix == "json":
        path.write_text(json.dumps(EXPLICIT))
    elif suffix == "parquet":
        ds.to_parquet(str(path))
    else:
        ds.to_csv(str(path), index=False)
    out, _ = normalize_preferences(load_rows(path))
    assert out.to_list() == EXPLICIT


def test_prompt_only_from_strings_messages_and_hh_dialogues():
    ds, report = normalize_prompts(load_rows(Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"}])))
    assert ds["prompt"] == ["a", "b"] and report.dropped == {"duplicate prompt": 1}
    ds, _ = normalize_prompts(load_rows(Dataset.from_list(HH[:1])))
    assert ds[0]["prompt"].endswith("How are you?\n\nAssistant:")
    msgs = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]
    ds, _ = normalize_prompts(load_rows(Dataset.from_list(msgs)))
    assert ds[0]["prompt"] == [{"role": "user", "content": "Hi"}]


def test_split_is_deterministic_by_seed(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(100)]
    args = DataArguments(dataset_name=str(write_jsonl(tmp_path / "d.jsonl", rows)), eval_fraction=0.2)
    train1, eval1, _ = load_preference_data(args, seed=7)
    train2, eval2, _ = load_preference_data(args, seed=7)
    _, eval3, _ = load_preference_data(args, seed=8)
    assert eval1["prompt"] == eval2["prompt"] and train1["prompt"] == train2["prompt"]
    assert eval1["prompt"] != eval3["prompt"]
    assert len(eval1) == 20 and not set(eval1["prompt"]) & set(train1["prompt"])


BAD_INPUTS = [
    # (file content, kwargs, error pattern)
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n', {},
     r"bad\.jsonl:2: malformed JSON"),
    ('{"prompt": "a", "good": "b"}\n', {}, r"Cannot tell the preference format from columns \['good', 'prompt'\]"),
    ('{"prompt": "a", "chosen": "b"}\n', {"data_format": "explicit"},
     r"missing column\(s\) \['rejected'\] for format 'explicit'; columns found: \['prompt', 'chosen'\]"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 5, "rejected": "c"}\n', {},
     r"bad\.jsonl:2, column 'chosen': got number, but line 1 has str"),
    ('{"prompt": "a", "chosen": 5, "rejected": "c"}\n', {},
     r"bad\.jsonl:1, column 'chosen': expected a string or a list of \{role, content\} messages, got int"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "  ", "chosen": "b", "rejected": "c"}\n', {},
     r"bad\.jsonl:3, column 'prompt': the text is empty"),
    ('{"prompt": "a", "chosen": "b", "rejected": "b"}\n', {},
     r"No usable preference pairs left .* dropped 1 \(chosen == rejected\)"),
    ('{"chosen": "no assistant turn", "rejected": "x"}\n', {}, r"bad\.jsonl:1: no '\\n\\nAssistant:' turn"),
    ("[1, 2]\n", {}, r"bad\.jsonl:1: expected a JSON object per line, got list"),
    ("", {}, r"bad\.jsonl has no rows"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', {"data_format": "yaml"}, r"Unknown data_format 'yaml'"),
]


@pytest.mark.parametrize("content, kwargs, pattern", BAD_INPUTS)
def test_bad_input_is_reported_precisely(tmp_path, content, kwargs, pattern):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=pattern):
        normalize_preferences(load_rows(path), **kwargs)


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match="Dataset file not found: ./nope.jsonl"):
        load_rows("./nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="holds no data files"):
        load_rows(tmp_path)
    with pytest.raises(DataError, match="No dataset given"):
        load_preference_data(DataArguments())
    with pytest.raises(DataError, match="leaves no training rows"):
        train_eval_split(Dataset.from_list(EXPLICIT[:1]), 0.5, 0)


def test_length_filter_counts_every_drop(tiny_task_dir):
    from rlhf_lm.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_task_dir / "base_policy"))
    rows = [{"prompt": "Describe the cat.\n", "chosen": "the cat is happy .", "rejected": "the cat is sad ."},
            {"prompt": "Describe the cat.\n", "chosen": "the cat is happy . " * 20, "rejected": "a dog ."},
            {"prompt": "the dog is bad . " * 30, "chosen": "x", "rejected": "y"}]
    report = DataReport("rows", rows_in=3)
    kept = filter_by_length(Dataset.from_list(rows), tok, max_length=40, report=report)
    assert kept["chosen"] == ["the cat is happy ."]
    assert report.dropped == {"prompt alone has >= 40 tokens": 1, "pair over max_length=40": 1}
    report = DataReport("rows", rows_in=3)
    kept = filter_by_length(Dataset.from_list(rows), tok, max_length=40, report=report, mode="truncate")
    assert len(kept) == 2 and report.truncated == {"pair over max_length=40": 1}


def test_real_hh_rlhf_rows_normalise(hh_pairs_path):
    ds, report = normalize_preferences(load_rows(hh_pairs_path))
    assert report.rows_in == 1800 and report.rows_out == len(ds) >= 1790
    for row in ds.select(range(50)):
        assert row["prompt"].startswith("\n\nHuman:") and row["prompt"].endswith("\n\nAssistant:")
        assert "\n\nAssistant:" not in row["chosen"] and row["chosen"] != row["rejected"]
    # the prompt is the shared dialogue: re-joining gives back the raw row
    raw = load_rows(hh_pairs_path).dataset[0]
    prompt, response = split_hh_dialogue(raw["chosen"])
    assert prompt + response == raw["chosen"]


def test_prompt_data_from_task(tiny_task_dir):
    args = DataArguments(dataset_name=str(tiny_task_dir / "data" / "prompts_train.jsonl"), eval_fraction=0.0)
    train, eval_ds, report = load_prompt_data(args)
    assert eval_ds is None and len(train) == report.rows_out > 100


def test_held_out_prompts_that_are_also_training_prompts_are_dropped_and_counted(tmp_path):
    def write(name, prompts):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))

    write("train", ["a?", "b?", "e?"])
    write("eval", ["b?", "c?", "e?", "d?"])
    args = DataArguments(dataset_name=str(tmp_path), dataset_train_split="train", dataset_eval_split="eval")
    train, eval_ds, report = load_prompt_data(args)
    assert eval_ds["prompt"] == ["c?", "d?"] and len(train) == 3
    assert report.dropped["eval: held-out prompt also in the training data (eval)"] == 2

    write("eval", ["a?", "e?"])
    with pytest.raises(DataError, match="Every prompt of the held-out split 'eval' also occurs"):
        load_prompt_data(args)


# ------------------------------------------------------------------------------------------- HH-RLHF as chat
def test_hh_dialogues_become_chat_messages():
    from rlhf_lm.data import hh_dialogue_messages

    text = "\n\nHuman: hi\n\nAssistant:  hello \n\nHuman: one\n\nHuman: two\n\nAssistant: ok"
    assert hh_dialogue_messages(text) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "one\n\ntwo"},  # one speaker twice in a row: joined (templates alternate)
        {"role": "assistant", "content": "ok"}]
    assert hh_dialogue_messages("no turns at all") is None


def test_hh_format_decides_between_messages_and_text(tmp_path):
    from rlhf_lm.modeling import train_tokenizer

    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: ok\n\nHuman: and?\n\nAssistant: fine thanks",
             "rejected": "\n\nHuman: hi\n\nAssistant: ok\n\nHuman: and?\n\nAssistant: go away"},
            {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant:   "}]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat_tok = train_tokenizer(["hi ok and fine"] * 10, vocab_size=280)  # it has a chat template
    args = DataArguments(dataset_name=str(path), eval_fraction=0.0)
    train, _, report = load_preference_data(args, tokenizer=chat_tok)  # hh_format: auto
    assert train[0]["prompt"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                                  {"role": "user", "content": "and?"}]
    assert train[0]["chosen"] == [{"role": "assistant", "content": "fine thanks"}]
    assert len(train) == 1 and report.dropped["empty response"] == 1

    chat_tok.chat_template = None  # no template: the raw text stays
    assert load_preference_data(args, tokenizer=chat_tok)[0][0]["prompt"].endswith("\n\nAssistant:")
    text_args = DataArguments(dataset_name=str(path), eval_fraction=0.0, hh_format="text")
    assert isinstance(load_preference_data(text_args)[0][0]["prompt"], str)

    prompts, _, _ = load_prompt_data(DataArguments(dataset_name=str(path), eval_fraction=0.0, hh_format="messages"))
    assert prompts[0]["prompt"][-1] == {"role": "user", "content": "and?"}
    with pytest.raises(ConfigError, match="hh_format"):
        DataArguments(hh_format="chat")


def test_every_shared_hh_pair_converts_to_alternating_messages(hh_pairs_path):
    pairs, report = normalize_preferences(load_rows(str(hh_pairs_path)), "hh_rlhf", hh_messages=True)
    assert len(pairs) + sum(report.dropped.values()) == report.rows_in == 1800
    for prompt in pairs["prompt"]:
        roles = [m["role"] for m in prompt]
        assert roles[0] == "user" and roles[-1] == "user"
        assert all(a != b for a, b in zip(roles, roles[1:]))


def test_held_out_prompts_are_the_eval_share_minus_training_prompts(tmp_path):
    from rlhf_lm.data import held_out_prompts

    rows = [{"prompt": f"q{i % 30}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(60)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = DataArguments(dataset_name=str(tmp_path / "pairs.jsonl"), eval_fraction=0.25)
    train, eval_ds, _ = load_preference_data(args)
    prompts = held_out_prompts(args)
    assert prompts and len(prompts) == len(set(prompts))
    assert not set(prompts) & set(train["prompt"]) and set(prompts) <= set(eval_ds["prompt"])


def test_max_train_samples_is_counted_so_the_report_adds_up(tiny_task_dir):
    args = DataArguments(dataset_name=str(tiny_task_dir / "data" / "pairs_train.jsonl"), eval_fraction=0.0,
                         max_train_samples=10)
    train, _, report = load_preference_data(args)
    assert len(train) == report.rows_out == 10
    assert report.rows_out + sum(report.dropped.values()) == report.rows_in
    assert report.dropped["beyond max_train_samples=10"] == report.rows_in - 10 - sum(
        v for k, v in report.dropped.items() if not k.startswith("beyond"))


def test_hh_prompts_in_the_prompt_column_become_messages_too(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: and?\n\nAssistant:"}) + "\n"
                    + json.dumps({"prompt": "\n\nHuman: bye\n\nAssistant:"}) + "\n")
    prompts, _, _ = load_prompt_data(DataArguments(dataset_name=str(path), eval_fraction=0.0, hh_format="messages"))
    assert prompts["prompt"] == [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                  {"role": "user", "content": "and?"}], [{"role": "user", "content": "bye"}]]
    text, _, _ = load_prompt_data(DataArguments(dataset_name=str(path), eval_fraction=0.0, hh_format="text"))
    assert text["prompt"][1] == "\n\nHuman: bye\n\nAssistant:"


def test_evaluate_finds_the_held_out_prompts_of_a_prompt_stage_that_records_no_data_format(tmp_path):
    """ppo / grpo / rloo have no data_format key (they read prompts only), so their metrics.json records none."""
    from types import SimpleNamespace

    from rlhf_lm.saved_policy import prompts_held_out_in_training

    rows = [{"prompt": f"q{i}?"} for i in range(40)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for trained in ({"dataset_name": str(tmp_path / "prompts.jsonl"), "eval_fraction": 0.25},  # today's record
                    {"dataset_name": str(tmp_path / "prompts.jsonl"), "eval_fraction": 0.25,  # before this change
                     "data_format": "prompt_only"}):
        prompts = prompts_held_out_in_training(SimpleNamespace(policy_path="runs/ppo"), trained, None)
        assert len(prompts) == 10 and set(prompts) <= {r["prompt"] for r in rows}
