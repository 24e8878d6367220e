"""The reward-model Python API: metric math against hand-computed values, wrappers, load_reward and its errors."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from rlhf_lm.errors import ArtifactError, ConfigError, RewardError
from rlhf_lm.reward_metrics import expected_calibration_error, pairwise_accuracy, pearson, preference_metrics
from rlhf_lm.rewards import (
    ClassifierReward,
    EnsembleReward,
    FunctionReward,
    GoldReward,
    NormalizedReward,
    check_rewards,
    load_reward,
    reward_text,
)


# ------------------------------------------------------------------------------------------------ pure metrics
def test_pairwise_accuracy_counts_ties_as_half():
    chosen = torch.tensor([2.0, 0.0, 1.0, 3.0])
    rejected = torch.tensor([1.0, 1.0, 1.0, -1.0])
    assert pairwise_accuracy(chosen, rejected) == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_ece_by_hand():
    # p = sigmoid(diff): confidences max(p, 1-p) and correctness p > 0.5, binned on [0.5, 1] in 5 bins of 0.1.
    p = torch.tensor([0.55, 0.45, 0.95, 0.85, 0.80])
    # bin 0 (0.5-0.6): p=.55 (conf .55, right), p=.45 (conf .55, wrong) -> acc .5, conf .55, gap .05, share 2/5
    # bin 3 (0.8-0.9): .85 and .80 (both right)  -> acc 1, conf .825, gap .175, share 2/5
    # bin 4 (0.9-1.0): .95 (right)               -> acc 1, conf .95, gap .05, share 1/5
    expected = 0.4 * 0.05 + 0.4 * 0.175 + 0.2 * 0.05
    assert expected_calibration_error(p, n_bins=5) == pytest.approx(expected, abs=1e-6)


def test_ece_is_zero_for_perfectly_calibrated_bins():
    # Ten pairs at p = 0.8: a calibrated model is right on 8 of them (label noise makes the other 2 "wrong").
    p = torch.tensor([0.8] * 8 + [0.2] * 2)
    assert expected_calibration_error(p) == pytest.approx(0.0, abs=1e-6)


def test_pearson_matches_hand_value_and_handles_constants():
    x, y = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 7.0])
    # deviations x: -1,0,1; y: -2.33,-0.33,2.67 -> cov 5, |x| sqrt(2), |y| sqrt(12.667)
    assert pearson(x, y) == pytest.approx(5 / math.sqrt(2 * 12.666667), abs=1e-5)
    assert pearson(x, torch.ones(3)) == 0.0


def test_preference_metrics_length_and_gold():
    r_c, r_r = torch.tensor([1.0, 0.0, 2.0, 0.5]), torch.tensor([0.0, 1.0, 1.0, 0.5])
    len_c, len_r = torch.tensor([5, 3, 4, 4]), torch.tensor([2, 6, 4, 1])
    gold_c, gold_r = torch.tensor([0.5, 0.2, 0.0, -0.1]), torch.tensor([0.1, 0.6, 0.0, 0.3])
    m = preference_metrics(r_c, r_r, len_c, len_r, gold_c, gold_r)
    assert m["reward/accuracy"] == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    assert m["reward/margin"] == pytest.approx((1 - 1 + 1 + 0) / 4)
    # longer wins: pair 1 chosen longer (right), 2 rejected longer (wrong), 3 tie (half), 4 chosen longer (right)
    assert m["reward/length_baseline_accuracy"] == pytest.approx(2.5 / 4)
    # the model prefers the longer answer in pair 1 (yes), 2 (yes: prefers rejected, which is longer), 4 (tie: no)
    assert m["reward/prefers_longer"] == pytest.approx(2 / 3)
    # gold: pair 3 is a gold tie and excluded; model agrees with gold on pairs 1 and 2, not on 4 (score tie)
    assert m["reward/gold_accuracy"] == pytest.approx(2 / 3)
    assert m["reward/label_gold_agreement"] == pytest.approx(1 / 3)
    assert -1 <= m["reward/length_corr"] <= 1


# -------------------------------------------------------------------------------------------------- wrappers
def _word_count(prompt: str, completion: str) -> float:
    return float(len(completion.split()))


def test_function_reward_and_normalized_reward():
    reward = FunctionReward(_word_count)
    out = reward(["p", "p", "p"], ["a", "a b", "a b c"])
    assert out.tolist() == [1.0, 2.0, 3.0]
    norm = NormalizedReward.fit(reward, ["p"] * 3, ["a", "a b", "a b c"])
    assert norm.mean == pytest.approx(2.0) and norm.std == pytest.approx(math.sqrt(2 / 3))
    assert norm(["p"], ["a b"]).tolist() == pytest.approx([0.0])
    with pytest.raises(RewardError, match="std must be a positive"):
        NormalizedReward.fit(reward, ["p", "p"], ["a", "b"])  # every completion scores the same: std 0


def test_ensemble_normalises_each_member_before_weighting():
    length = FunctionReward(_word_count, name="length")
    scaled = FunctionReward(lambda p, c: 100.0 * len(c), name="chars")  # another scale entirely
    calib = (["p"] * 3, ["a", "a b", "a b c"])
    ens = EnsembleReward([length, scaled], weights=[0.5, 0.5], calibration=calib)
    out = ens(["p", "p"], ["a b", "a b c"])
    # members normalised on the calibration set: "a b" is the mean for words (0) and chars ("a b" = 3 chars)
    words_z = torch.tensor([0.0, 1.0]) / math.sqrt(2 / 3)
    chars = torch.tensor([1.0, 3.0, 5.0]) * 100
    chars_z = (torch.tensor([300.0, 500.0]) - chars.mean()) / chars.std(unbiased=False)
    assert out.tolist() == pytest.approx((0.5 * words_z + 0.5 * chars_z).tolist(), abs=1e-5)
    raw = EnsembleReward([length, scaled], weights=[1.0, 2.0], normalize=False)
    assert raw(["p"], ["a b"]).tolist() == pytest.approx([2.0 + 2 * 300.0])
    with pytest.raises(RewardError, match="calibration"):
        EnsembleReward([length])


def test_gold_reward_is_the_task_gold():
    from rlhf_lm.builtin_task.task import gold_reward

    p, c = "Describe the cat and the dog.\n", "the cat is happy . the dog is kind ."
    assert GoldReward()([p], [c]).tolist() == pytest.approx([gold_reward(p, c)])


def test_reward_text_matches_reward_trainer_layout(tiny_task_dir):
    from rlhf_lm.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_task_dir / "base_policy"))
    assert reward_text("Q\n", "a b .", tok) == "Q\na b ." + tok.eos_token
    chat = reward_text([{"role": "user", "content": "hi"}], "yo", tok)
    assert chat == tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                           tokenize=False)


# ---------------------------------------------------------------------------------------------- load_reward
def test_load_reward_resolves_every_spec_kind(tmp_path):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        import torch

        def shortness(prompt, completion):
            return -float(len(completion))

        class Constant:
            def __init__(self, value=1.0):
                self.value = value

            def __call__(self, prompts, completions):
                return torch.full((len(prompts),), self.value)
    """))
    fn = load_reward(f"{tmp_path}/my_rewards.py:shortness")
    assert fn(["p", "p"], ["ab", "abcd"]).tolist() == [-2.0, -4.0]
    const = load_reward(f"{tmp_path}/my_rewards.py:Constant", value=3.0)
    assert const(["p"], ["x"]).tolist() == [3.0]
    assert const.name == f"{tmp_path}/my_rewards.py:Constant"  # so a consumer's error names the spec
    with pytest.raises(RewardError, match="my_rewards.py:Constant returned shape"):
        check_rewards(const(["p", "p"], ["x", "y"])[:1], 2, const.name)
    assert isinstance(load_reward("gold"), GoldReward)
    dotted = load_reward("rlhf_lm.builtin_task.task:gold_reward")
    assert dotted(["Describe the cat and the dog.\n"], ["the cat is happy ."]).shape == (1,)
    assert load_reward(fn) is fn


BAD_SPECS = [
    # (spec or callable, kwargs, error type, message fragments that must appear)
    ("nowhere/at_all", {}, RewardError, ["nowhere/at_all", "Tried", "gold", "directory"]),
    ("missing_file.py:Reward", {}, RewardError, ["missing_file.py", "does not exist"]),
    ("rlhf_lm.no_such_module:X", {}, RewardError, ["cannot import module"]),
    ("rlhf_lm.builtin_task.task:NoSuchName", {}, RewardError, ["has no attribute 'NoSuchName'", "gold_reward"]),
    ("rlhf_lm.builtin_task.task:TOPICS", {}, RewardError, ["not callable", "__call__(prompts, completions)"]),
    (42, {}, RewardError, ["neither a string nor callable"]),
]


@pytest.mark.parametrize("spec,kwargs,error,fragments", BAD_SPECS, ids=[str(s[0]) for s in BAD_SPECS])
def test_bad_reward_specs_fail_clearly(spec, kwargs, error, fragments):
    with pytest.raises(error) as info:
        load_reward(spec, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


BAD_OUTPUTS = [
    ("wrong shape", lambda ps, cs: torch.zeros(len(ps) + 1), ["shape (4,) for 3 completions"]),
    ("nan", lambda ps, cs: torch.tensor([0.0, float("nan"), 1.0]), ["NaN/inf", "positions [1]"]),
    ("not numbers", lambda ps, cs: "good", ["returned str"]),
]


@pytest.mark.parametrize("case,fn,fragments", BAD_OUTPUTS, ids=[c[0] for c in BAD_OUTPUTS])
def test_bad_reward_outputs_name_the_reward(case, fn, fragments):
    reward = FunctionReward(fn, batched=True, name="my_rewards.py:Broken")
    with pytest.raises(RewardError) as info:
        reward(["p"] * 3, ["c"] * 3)
    assert "my_rewards.py:Broken" in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)
    with pytest.raises(RewardError, match="Broken"):  # the same checks guard any consumer through check_rewards
        check_rewards(fn(["p"] * 3, ["c"] * 3), 3, "my_rewards.py:Broken")


def test_classifier_reward_directory_errors(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        ClassifierReward.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="neither a LoRA adapter"):
        load_reward(str(tmp_path / "empty"))


def test_backbone_without_eos_or_pad_fails_clearly(tmp_path):
    """A tokenizer with neither EOS/SEP nor pad cannot mark where a reward is read: say so, and how to fix it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rlhf_lm.modeling import load_tokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a b c d"], trainers.BpeTrainer(vocab_size=50, special_tokens=["<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path / "bare")
    with pytest.raises(ConfigError, match="no EOS token") as info:
        load_tokenizer(str(tmp_path / "bare"), require_eos=True)
    assert str(tmp_path / "bare") in str(info.value) and "eos_token" in str(info.value)


def test_a_classifier_scores_exactly_the_tokens_reward_training_saw(tmp_path):
    """A multi-turn conversation with a system prompt, and a reward tokenizer whose chat template differs from
    any policy's: the ids ClassifierReward scores for (prompt, reply) are the ids TRL's RewardTrainer trains on."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from rlhf_lm.modeling import tiny_config, train_tokenizer
    from rlhf_lm.rewards import reward_input_ids

    tok = train_tokenizer(["system user assistant be kind hi there hello friend how are you fine"] * 20,
                          vocab_size=300)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>"
                         "{% endfor %}")  # not the policy's layout
    dialogue = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": "hello friend"}, {"role": "user", "content": "how are you"}]
    pairs = [{"prompt": dialogue, "chosen": [{"role": "assistant", "content": "fine"}],
              "rejected": [{"role": "assistant", "content": "go away"}]},
             {"prompt": "hi there ", "chosen": "hello friend", "rejected": "go away"}]
    for pair in pairs:
        model = AutoModelForSequenceClassification.from_config(tiny_config("llama", tok, num_labels=1))
        trainer = RewardTrainer(model=model, args=RewardConfig(output_dir=str(tmp_path), use_cpu=True,
                                                               report_to="none"),
                                train_dataset=Dataset.from_list([pair]), processing_class=tok)
        trained_on = trainer.train_dataset[0]["chosen_ids"]
        reply = pair["chosen"] if isinstance(pair["chosen"], str) else pair["chosen"][0]["content"]
        assert reward_input_ids(pair["prompt"], reply, tok) == trained_on
