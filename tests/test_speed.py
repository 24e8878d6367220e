"""Padding accounting (benchmarks/padding.py) and length grouping (rlhf_lm.speed), by hand and inside a real
DPOTrainer."""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset

from benchmarks.padding import dpo_padding_fraction, padded_width, padding_fraction, pair_length
from rlhf_lm.speed import LENGTH_COLUMN, add_length_column, fingerprint_module, in_length_order


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


def test_in_length_order_scores_longest_first_and_gives_rows_back_in_their_order():
    rows = Dataset.from_list([{"prompt_ids": [0] * p, "chosen_ids": [0] * c, "rejected_ids": [0] * r, "row": i}
                              for i, (p, c, r) in enumerate([(1, 1, 1), (5, 2, 9), (2, 3, 1), (1, 7, 2)])])
    seen = []

    def score(sorted_rows):
        seen.extend(sorted_rows["row"])
        return sorted_rows.add_column("score", [10 * r for r in sorted_rows["row"]])

    out = in_length_order(rows, score)
    assert seen == [1, 3, 2, 0]  # widths 14, 8, 5, 2
    assert out["row"] == [0, 1, 2, 3] and out["score"] == [0, 10, 20, 30]


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


def _pairs_of_two_lengths(n: int = 64) -> list[dict]:
    """Preference pairs whose texts are either ~4 or ~40 words long, in random order."""
    rng = random.Random(0)

    def text(k):
        return " ".join(rng.choice(["cat", "sat", "mat"]) for _ in range(k))

    rows = []
    for _ in range(n):
        k = rng.choice([3, 40])
        rows.append({"prompt": text(k), "chosen": " " + text(k), "rejected": " " + text(k + 1)})
    return rows


def _tiny_qwen2(tok):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _mixed_batches(trainer) -> tuple[int, int]:
    """(batches mixing the two length classes, all batches) of the trainer's training dataloader."""
    widths = [batch["attention_mask"].sum(1).tolist() for batch in trainer.get_train_dataloader()]
    return sum(max(w) - min(w) > 8 for w in widths), len(widths)


def test_dpo_stage_trainer_groups_batches_by_length_by_default(tmp_path):
    """Our DPO stage's trainer, with the stage's default train_sampling_strategy and TRL's own column pruning:
    batches hold pairs of one length class; evaluation (also length-grouped) and training run."""
    from rlhf_lm.modeling import train_tokenizer
    from rlhf_lm.stages.dpo import DPOStageConfig
    from rlhf_lm.trainers import DPOTrainer

    assert DPOStageConfig.__dataclass_fields__["train_sampling_strategy"].default == "group_by_length"
    tok = train_tokenizer(["the cat sat on the mat . " * 20], vocab_size=300)
    args = DPOStageConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, use_cpu=True,
                          save_strategy="no", disable_tqdm=True)
    assert args.remove_unused_columns  # the length column survives TRL's pruning without turning it off
    dataset = Dataset.from_list(_pairs_of_two_lengths())
    trainer = DPOTrainer(model=_tiny_qwen2(tok), ref_model=_tiny_qwen2(tok), args=args, train_dataset=dataset,
                         eval_dataset=dataset.select(range(16)), processing_class=tok)
    assert trainer.train_dataset[0][LENGTH_COLUMN] == (len(trainer.train_dataset[0]["prompt_ids"])
                                                       + max(len(trainer.train_dataset[0]["chosen_ids"]),
                                                             len(trainer.train_dataset[0]["rejected_ids"])))
    # Batches hold one length class (short ~8 tokens, long ~80), except at most one per mega-batch of 50 batches
    # where the sorted run turns from long to short; random order would mix about half of the 32.
    mixed, batches = _mixed_batches(trainer)
    assert batches == 32 and mixed <= 1
    assert "eval_loss" in trainer.evaluate()
    trainer.train()
    assert trainer.state.global_step == 1

    args.train_sampling_strategy = "random"  # the switch back works, and mixes lengths
    mixed, _ = _mixed_batches(DPOTrainer(model=_tiny_qwen2(tok), ref_model=_tiny_qwen2(tok), args=args,
                                         train_dataset=dataset, processing_class=tok))
    assert mixed >= 8


def test_reward_stage_trainer_groups_batches_by_length_by_default(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rlhf_lm.modeling import train_tokenizer
    from rlhf_lm.stages.reward import RewardStageConfig
    from rlhf_lm.trainers import RewardTrainer

    tok = train_tokenizer(["the cat sat on the mat . " * 20], vocab_size=300)
    args = RewardStageConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, use_cpu=True,
                             save_strategy="no", disable_tqdm=True)
    assert args.train_sampling_strategy == "group_by_length"
    config = _tiny_qwen2(tok).config
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
            for r in _pairs_of_two_lengths()]
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    mixed, batches = _mixed_batches(trainer)
    assert batches == 32 and mixed <= 1
    trainer.train()
    assert trainer.state.global_step == 1


def test_model_fingerprint_follows_every_bit_name_and_dtype():
    """The cache key of precomputed reference log-probs: equal weights give equal keys; one changed bit, a renamed
    tensor or another dtype gives another key."""
    from rlhf_lm.modeling import train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat . " * 20], vocab_size=300)
    a, b = _tiny_qwen2(tok), _tiny_qwen2(tok)
    assert fingerprint_module(a) == fingerprint_module(b) == fingerprint_module(a)
    with torch.no_grad():
        weight = b.model.layers[0].mlp.up_proj.weight
        weight.view(-1)[7] = torch.nextafter(weight.view(-1)[7], torch.tensor(float("inf")))
    assert fingerprint_module(a) != fingerprint_module(b)
    assert fingerprint_module(a) != fingerprint_module(a.to(torch.bfloat16))
    renamed = torch.nn.ModuleDict({"other": _tiny_qwen2(tok)})
    assert fingerprint_module(renamed) != fingerprint_module(_tiny_qwen2(tok))


def test_dpo_stage_trainer_keys_precomputed_reference_by_the_fast_fingerprint(tmp_path):
    """TRL's slow hash_module (fp32 copy + SHA-256: 12 s at 1.5B) is swapped for ours only while our trainer is
    built; a plain TRL trainer built afterwards gets TRL's own back."""
    import trl.trainer.dpo_trainer as trl_dpo

    from rlhf_lm.modeling import train_tokenizer
    from rlhf_lm.stages.dpo import DPOStageConfig
    from rlhf_lm.trainers import DPOTrainer

    tok = train_tokenizer(["the cat sat on the mat . " * 20], vocab_size=300)
    trl_hash = trl_dpo.hash_module
    args = DPOStageConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, use_cpu=True,
                          save_strategy="no", disable_tqdm=True, precompute_ref_log_probs=True)
    model = _tiny_qwen2(tok)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(_pairs_of_two_lengths(8)),
                         processing_class=tok)
    assert trl_dpo.hash_module is trl_hash
    assert trainer._precompute_model_hash == fingerprint_module(_tiny_qwen2(tok))
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
