"""Padding accounting and length grouping (rlhf_lm.speed), by hand and inside a real DPOTrainer."""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset

from rlhf_lm.speed import (
    LENGTH_COLUMN,
    add_length_column,
    dpo_padding_fraction,
    padded_width,
    padding_fraction,
    pair_length,
)


def test_padding_fraction_by_hand():
    assert pair_length([1, 2], [3], [4, 5, 6]) == 5
    assert padded_width(65, 64) == 128 and padded_width(64, 64) == 64 and padded_width(65, None) == 65
    # one batch of lengths 2 and 4: width 4, 6 real of 8 positions
    assert padding_fraction([[2, 4]]) == pytest.approx(0.25)
    # padded to a multiple of 8: 6 real of 16
    assert padding_fraction([[2, 4]], pad_to_multiple_of=8) == pytest.approx(0.625)
    # two batches: [3, 3] wastes nothing, [1, 5] wastes 4 of 10 -> 4 / 16 overall
    assert padding_fraction([[3, 3], [1, 5]]) == pytest.approx(0.25)


def test_length_column_for_dpo_and_reward_datasets():
    dpo = Dataset.from_list([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]}])
    reward = Dataset.from_list([{"chosen_ids": [1, 2, 3, 4], "rejected_ids": [5, 6]}])
    assert add_length_column(dpo)[LENGTH_COLUMN] == [5]
    assert add_length_column(reward)[LENGTH_COLUMN] == [4]


def test_equal_lengths_never_pad_and_grouping_removes_most_padding():
    assert dpo_padding_fraction([7] * 40, [7] * 40, batch_size=4) == 0.0
    rng = random.Random(0)
    chosen = [rng.choice([10, 1000]) for _ in range(800)]
    rejected = [c + rng.randint(0, 5) for c in chosen]
    random_order = dpo_padding_fraction(chosen, rejected, batch_size=4, group_by_length=False)
    grouped = dpo_padding_fraction(chosen, rejected, batch_size=4, group_by_length=True)
    assert random_order > 0.4  # most random batches of 4 mix a 10-token and a 1000-token pair
    # what is left: the 0-5 token gaps between a pair's two responses, and mega-batch boundaries
    assert grouped < random_order / 10


def test_group_by_length_works_in_dpo_trainer_with_the_length_column(tmp_path):
    """The recipe we recommend to the DPO stage: a length column, remove_unused_columns=False and
    train_sampling_strategy='group_by_length' give length-sorted batches, and training runs."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    from trl import DPOConfig, DPOTrainer

    from rlhf_lm.modeling import train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat . " * 20], vocab_size=300)
    rng = random.Random(0)

    def text(n):
        return " ".join(rng.choice(["cat", "sat", "mat"]) for _ in range(n))

    rows = []
    for _ in range(64):
        n = rng.choice([3, 40])
        rows.append({"prompt": text(n), "chosen": " " + text(n), "rejected": " " + text(n + 1),
                     "prompt_ids": [0] * n, "chosen_ids": [0] * (n + 1), "rejected_ids": [0] * (n + 2)})
    dataset = add_length_column(Dataset.from_list(rows)).remove_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    assert dataset[0][LENGTH_COLUMN] == len(rows[0]["prompt_ids"]) + len(rows[0]["rejected_ids"])

    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to="none",
                     use_cpu=True, bf16=False, gradient_checkpointing=False, remove_unused_columns=False,
                     train_sampling_strategy="group_by_length", save_strategy="no", disable_tqdm=True)
    reference = AutoModelForCausalLM.from_config(config)
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=dataset, processing_class=tok)
    widths = [batch["attention_mask"].sum(1).tolist() for batch in trainer.get_train_dataloader()]
    # Batches hold pairs of one length class (short ~8 tokens, long ~80), except at most one per mega-batch of
    # 8 batches where the sorted run turns from long to short; random order would mix about half of the 32.
    mixed = sum(max(w) - min(w) > 3 for w in widths)
    assert len(widths) == 32 and mixed <= 4, widths
    trainer.train()
    assert trainer.state.global_step == 1
