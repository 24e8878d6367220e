"""The real tier: every stage for a few steps on a real chat checkpoint, SmolLM2-135M-Instruct
(``rlhf_lm.real_checkpoint``), with chat-formatted data.

Tiny models built from a config have no chat template, no generation_config and a pad token distinct from EOS; this
checkpoint has a template that writes a default system prompt, BOS ``<|im_start|>``, pad = EOS = ``<|im_end|>`` and a
generation_config - where users' bugs live. The data is a small handmade preference that a few steps pick up: a
polite answer that gives the asked-for fact over a rude non-answer.

Every run checks that the trained parameters moved and the frozen base did not; that its artifact reloads and gives
the in-memory numbers again; that decoded text holds no special-token debris; that every reward is read from the text
layout the reward model was trained on; and, where a few steps make it certain, that the metric moved the right way.

The expensive runs are shared: one pipeline (reward -> dpo -> evaluate) also provides the reward model that PPO,
GRPO and RLOO optimise. The file runs in about 3.5 minutes on 2 CPU cores with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from rlhf_lm.configs import config_from_dict
from rlhf_lm.rewards import ClassifierReward

pytestmark = pytest.mark.real

LOG_2 = math.log(2)
BETA = 0.1
TOKEN = "hf_stand_in_secret_token"
# (question, a polite answer that states the fact, a rude non-answer)
QA = [
    ("What is the capital of France?", "The capital of France is Paris.", "Look it up yourself."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Who cares about spiders? Not me."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue.", "Go outside and look, genius."),
    ("What is two plus two?", "Two plus two is four.", "Seriously? Use your fingers."),
    ("Which planet do we live on?", "We live on planet Earth.", "What a stupid question."),
    ("What do bees make?", "Bees make honey.", "Stop bothering me with this."),
    ("How many days are in a week?", "A week has seven days.", "Figure it out yourself."),
    ("What is frozen water called?", "Frozen water is called ice.", "I am not your teacher."),
    ("Which animal says moo?", "A cow says moo.", "Ugh, ask someone else."),
    ("What is the opposite of hot?", "The opposite of hot is cold.", "Whatever, I don't care."),
    ("How many hours are in a day?", "A day has twenty-four hours.", "Buy a clock and leave me alone."),
    ("What do plants need from the sun?", "Plants need sunlight to make their food.", "Not my problem."),
    ("What is the largest ocean?", "The Pacific is the largest ocean.", "Google exists, you know."),
    ("What gas do we breathe in to live?", "We breathe in oxygen to live.", "Why would I tell you?"),
    ("How many months are in a year?", "A year has twelve months.", "Count them yourself, lazy."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "Nobody cares about that."),
    ("Which bird is a symbol of peace?", "The dove is a symbol of peace.", "Boring question, go away."),
    ("What do cows drink?", "Cows drink water.", "Stop wasting my time."),
    ("What shape has three sides?", "A triangle has three sides.", "You should know this already, dummy."),
    ("What is the boiling point of water in Celsius?", "Water boils at one hundred degrees Celsius.",
     "Read a book for once."),
    ("Which season comes after winter?", "Spring comes after winter.", "Ask your mom."),
    ("What is the colour of grass?", "Grass is green.", "Are you blind? Look at it."),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels.", "Go count them, idiot."),
    ("What do you call a baby dog?", "A baby dog is called a puppy.", "Don't ask me dumb things."),
    ("What is the capital of Italy?", "The capital of Italy is Rome.", "I refuse to answer that."),
    ("Which fruit is yellow and curved?", "A banana is yellow and curved.", "Shut up and eat something."),
    ("How many continents are there?", "There are seven continents.", "Too lazy to learn? Not my job."),
    ("What do fish use to breathe?", "Fish breathe with their gills.", "Leave me alone."),
    ("What is the closest star to Earth?", "The Sun is the closest star to Earth.", "Who even asks that?"),
    ("What is the main language of Spain?", "The main language of Spain is Spanish.", "Figure it out, genius."),
    ("How many minutes are in an hour?", "An hour has sixty minutes.", "Stop pestering me."),
    ("What is the tallest animal?", "The giraffe is the tallest animal.", "Go to a zoo and find out."),
    # held out
    ("What is the capital of Germany?", "The capital of Germany is Berlin.", "Not telling you."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies.", "Ugh, such a silly question."),
    ("Which metal is liquid at room temperature?", "Mercury is liquid at room temperature.", "Look it up, lazy."),
    ("What is the freezing point of water in Celsius?", "Water freezes at zero degrees Celsius.", "I don't care."),
    ("How many sides does a square have?", "A square has four sides.", "Count them yourself."),
    ("What do we call a house for bees?", "A house for bees is called a hive.", "Go away, I'm busy."),
    ("Which organ pumps blood?", "The heart pumps blood.", "Ask a doctor, not me."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid.", "Why should I help you?"),
]
TRAIN_PAIRS, EVAL_PAIRS = QA[:32], QA[32:]
# Prompts for the online stages (PPO, GRPO, RLOO) and for evaluation: questions no pair answers.
TRAIN_QUESTIONS = ["What is the capital of Canada?", "How many legs does a cat have?", "What colour is snow?",
                   "What is three plus three?", "What do cats drink?", "Which animal barks?",
                   "What is the opposite of big?", "How many eyes does a person have?"]
EVAL_QUESTIONS = ["What is the capital of England?", "What do birds use to fly?", "Which season is the hottest?",
                  "What colour is the sun?"]
SPECIAL_TEXT = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
ROLE_HEADER = re.compile(r"(^|\n)(system|user|assistant)\n")  # a chat turn's header leaking into a reply


# ------------------------------------------------------------------------------------------------------ helpers
def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pair_rows(pairs) -> list[dict]:
    return [{"prompt": user(q), "chosen": assistant(c), "rejected": assistant(r)} for q, c, r in pairs]


def run_stage(module, callbacks=None, **values) -> dict:
    cfg = config_from_dict(module.CONFIG, values, "test_real_model")
    return module.run(cfg, callbacks=callbacks) if callbacks else module.run(cfg)


def assert_clean_replies(texts: list[str]) -> None:
    """Decoded replies end at EOS: no special tokens (pad = EOS here), no chat-turn headers after them."""
    assert texts
    for text in texts:
        assert not any(s in text for s in SPECIAL_TEXT), repr(text)
        assert not ROLE_HEADER.search(text), repr(text)


def assert_only_lora_trained(adapter: dict[str, torch.Tensor], heads: tuple[str, ...] = ()) -> None:
    """A LoRA artifact holds LoRA factors (and the named heads) only - nothing of the frozen base - and every LoRA B,
    which starts at zero, was trained."""
    assert all("lora_A" in k or "lora_B" in k or any(f".{h}." in k for h in heads) for k in adapter), \
        sorted(k for k in adapter if "lora_" not in k)[:5]
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values()), "a LoRA B is still zero: it never trained"


def checkpoint_key(param_name: str) -> str:
    """The key of a PEFT model's base parameter in the checkpoint's safetensors (embeddings tied to the LM head)."""
    key = param_name.removeprefix("base_model.model.").replace(".base_layer", "")
    return "model.embed_tokens.weight" if key == "lm_head.weight" else key


def training_layout_score(judge: ClassifierReward, prompt: list[dict], reply: str) -> float:
    """The reward of a reply laid out exactly as TRL's RewardTrainer laid out the training pairs: the chat template
    over prompt + reply, tokenized by the template, scored in one unpadded forward pass."""
    ids = judge.tokenizer.apply_chat_template(prompt + assistant(reply), tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        return judge.model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def reply_logprob(model, tokenizer, prompt: list[dict], reply: str) -> float:
    """Summed log-probability of a reply (template tokens up to and including EOS) given a chat prompt."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(prompt + assistant(reply), tokenize=True, return_dict=True)["input_ids"]
    assert full[:len(prompt_ids)] == prompt_ids
    ids = torch.tensor([full])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    model.train(was_training)
    targets = ids[0, 1:]
    return logps[torch.arange(len(targets)), targets][len(prompt_ids) - 1:].sum().item()


def as_conversation(prompt) -> list[dict]:
    """The chat a recorded prompt stands for: the messages themselves, or the one known question its text holds."""
    if isinstance(prompt, list):
        return prompt
    found = [q for q in TRAIN_QUESTIONS + EVAL_QUESTIONS if q in prompt]
    assert len(found) == 1, f"cannot tell which question {prompt!r} asks"
    return user(found[0])


def assert_scored_as_in_training(records: list[dict], judge: ClassifierReward) -> None:
    """Each score a stage used is the reward model's score of that conversation in its training layout."""
    for r in records:
        expected = training_layout_score(judge, as_conversation(r["prompt"]), r["completion"])
        assert r["score"] == pytest.approx(expected, abs=1e-4), (r["prompt"], r["completion"])


RECORDING_REWARD = '''
import json

from rlhf_lm.rewards import ClassifierReward


class RecordingReward:
    """The trained reward model, plus a log of every (prompt, completion, score) a stage asked it for."""

    name = "recording"

    def __init__(self):
        self.reward = ClassifierReward.from_pretrained({reward_dir!r})

    def __call__(self, prompts, completions):
        scores = self.reward(prompts, completions)
        with open({log!r}, "a") as f:
            for p, c, s in zip(prompts, completions, scores.tolist()):
                f.write(json.dumps({{"prompt": p, "completion": c, "score": s}}) + "\\n")
        return scores
'''


def recording_reward(reward_dir: Path, tmp_path: Path) -> tuple[str, Path]:
    """A reward spec (``file.py:Name``, as a user writes one) for the trained reward model, and its log file."""
    log = tmp_path / "rewards.jsonl"
    path = tmp_path / "recording_reward.py"
    path.write_text(RECORDING_REWARD.format(reward_dir=str(reward_dir), log=str(log)))
    return f"{path}:RecordingReward", log


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real_data")
    write_jsonl(root / "pairs_train.jsonl", pair_rows(TRAIN_PAIRS))
    write_jsonl(root / "pairs_eval.jsonl", pair_rows(EVAL_PAIRS))
    write_jsonl(root / "prompts_train.jsonl", [{"prompt": user(q)} for q in TRAIN_QUESTIONS])
    write_jsonl(root / "prompts_eval.jsonl", [{"prompt": user(q)} for q in EVAL_QUESTIONS])
    return root


# Settings every training stage shares: CPU, a log line per step, no checkpoints, LoRA rank 4.
COMMON = dict(use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1, report_to="none", lora_r=4,
              lora_alpha=8)


@pytest.fixture(scope="module")
def pipeline_run(real_model_dir, data, tmp_path_factory) -> Path:
    """reward -> dpo -> evaluate as one pipeline recipe; the artifacts flow from stage to stage."""
    from rlhf_lm.pipeline import plan_pipeline, run_pipeline

    run_dir = tmp_path_factory.mktemp("real_pipeline") / "run"
    recipe = {
        "output_dir": str(run_dir), "stages": ["reward", "dpo", "evaluate"], "model_name_or_path": str(real_model_dir),
        "seed": 0, "max_length": 128, "per_device_eval_batch_size": 8, **COMMON,
        "reward": dict(dataset_name=str(data), dataset_train_split="pairs_train", dataset_eval_split="pairs_eval",
                       learning_rate=1e-3, max_steps=6, per_device_train_batch_size=4),
        "dpo": dict(dataset_name=str(data / "pairs_train.jsonl"), eval_dataset_name=str(data / "pairs_eval.jsonl"),
                    learning_rate=5e-4, max_steps=4, per_device_train_batch_size=4, beta=BETA, cache_tokenized=False),
        "evaluate": dict(prompts=str(data / "prompts_eval.jsonl"), pairs=str(data / "pairs_eval.jsonl"), beta=BETA,
                         max_new_tokens=16, batch_size=8),
    }
    run_pipeline(plan_pipeline(recipe))
    return run_dir


@pytest.fixture(scope="module")
def judge(pipeline_run) -> ClassifierReward:
    """The pipeline's reward model, reloaded from its artifact (adapter merged)."""
    return ClassifierReward.from_pretrained(pipeline_run / "reward", device="cpu")


# ------------------------------------------------------------------------------------------------------ reward
def test_reward_model_learns_the_preference_and_reloads_exactly(pipeline_run, real_model_dir, data, judge):
    from transformers import set_seed

    from rlhf_lm.evaluation import evaluate_pairs
    from rlhf_lm.modeling import load_sequence_classifier

    out = pipeline_run / "reward"
    saved = json.loads((out / "metrics.json").read_text())
    metrics = saved["metrics"]
    assert saved["data"]["train"]["rows_out"] == len(TRAIN_PAIRS) and saved["data"]["eval"]["rows_out"] == len(
        EVAL_PAIRS), saved["data"]  # max_length=128 fits every chat; nothing dropped
    # Polite + factual vs rude is learnt in a few steps: held-out pairs are ranked right (measured: all 8 of 8).
    assert metrics["reward/accuracy"] >= 0.75 and metrics["reward/margin"] > 0, metrics

    adapter = load_file(out / "adapter_model.safetensors")
    assert_only_lora_trained(adapter, heads=("score",))
    head = next(v for k, v in adapter.items() if ".score." in k)
    set_seed(0)  # the stage seeds the fresh head; training moved it away from there
    initial = load_sequence_classifier(str(real_model_dir)).score.weight
    assert head.shape == initial.shape and not torch.allclose(head, initial)

    # Reloaded, it scores the held-out pairs and the training responses as the in-memory model did.
    pairs = read_jsonl(data / "pairs_eval.jsonl")
    batch = {k: [p[k] for p in pairs] for k in ("prompt", "chosen", "rejected")}
    unmerged = ClassifierReward.from_pretrained(out, merge=False, device="cpu")
    again = evaluate_pairs(unmerged, batch)
    for key in ("reward/chosen_mean", "reward/rejected_mean", "reward/margin", "reward/accuracy"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-5), key
    train = read_jsonl(data / "pairs_train.jsonl")
    prompts = [p["prompt"] for p in train] * 2
    replies = [p["chosen"] for p in train] + [p["rejected"] for p in train]
    assert unmerged.raw_scores(prompts, replies).mean().item() == pytest.approx(saved["run"]["reward_mean"], abs=1e-5)
    assert torch.allclose(judge.raw_scores(batch["prompt"], batch["chosen"]),
                          unmerged.raw_scores(batch["prompt"], batch["chosen"]), atol=1e-4)

    # The merged model is the checkpoint plus the adapter: what LoRA does not touch is the checkpoint's, bit for bit.
    base = load_file(real_model_dir / "model.safetensors")
    merged = dict(judge.model.named_parameters())
    for key in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(merged[key], base[key]), key
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])

    # A reply is scored from the layout it was trained on (chat template, score read where training read it).
    for p in pairs:
        reply = p["chosen"][0]["content"]
        assert judge.raw_scores([p["prompt"]], [reply]).item() == pytest.approx(
            training_layout_score(judge, p["prompt"], reply), abs=1e-4)


# --------------------------------------------------------------------------------------------------------- DPO
def test_dpo_learns_the_preference_against_the_base_and_reloads_exactly(pipeline_run):
    out = pipeline_run / "dpo"
    saved = json.loads((out / "metrics.json").read_text())
    trained = saved["metrics"]
    assert saved["run"]["reference"] == "base (adapters off)"
    assert saved["data"]["train"]["rows_out"] == len(TRAIN_PAIRS), saved["data"]

    history = saved["log_history"]  # the stage keeps its training curves in its metrics.json
    steps = [h for h in history if "loss" in h and "rewards/margins" in h]
    assert len(steps) == 4
    # Step 1: the policy (LoRA B = 0) is its reference, the adapter-free base, so the loss is exactly log 2.
    assert steps[0]["loss"] == pytest.approx(LOG_2, abs=1e-4)
    assert steps[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    # Four steps move it the right way on held-out pairs (measured: loss 0.52, margin 0.40, accuracy 1.0).
    assert trained["eval/dpo_loss"] < LOG_2 and trained["eval/implicit_margin"] > 0, trained
    assert trained["eval/implicit_accuracy"] >= 0.75, trained

    assert_only_lora_trained(load_file(out / "adapter_model.safetensors"))
    # The evaluate stage reloaded the adapter from disk and scored the same held-out pairs without TRL: the same
    # implicit rewards as TRL's evaluate() on the in-memory model.
    evaluated = json.loads((pipeline_run / "evaluate" / "metrics.json").read_text())["metrics"]
    assert evaluated["eval/implicit_accuracy"] == pytest.approx(trained["eval/implicit_accuracy"], abs=1e-6)
    assert evaluated["eval/implicit_margin"] == pytest.approx(trained["eval/implicit_margin"], abs=1e-4)


class TrainingProbe(TrainerCallback):
    """Snapshots the trainable parameters when training starts; when it ends, keeps them again, the frozen ones'
    agreement with the checkpoint, and the policy's log-probability of a fixed reply (all from the live model).
    Also keeps the trainer's logs."""

    def __init__(self, checkpoint: Path, prompt: list[dict], reply: str):
        self.checkpoint, self.prompt, self.reply = checkpoint, prompt, reply
        self.before: dict[str, torch.Tensor] = {}
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        base = load_file(self.checkpoint)
        params = dict(model.named_parameters())
        self.after = {n: params[n].detach().clone() for n in self.before}
        self.frozen = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
        self.base_unchanged = {n: torch.equal(p, base[checkpoint_key(n)]) for n, p in self.frozen.items()
                               if "lora_" not in n}
        self.logprob = reply_logprob(model, processing_class, self.prompt, self.reply)


@pytest.fixture(scope="module")
def sft_adapter(real_model_dir, tmp_path_factory) -> Path:
    """A LoRA SFT adapter on the real model: three supervised steps on the polite answers, saved with peft."""
    from peft import get_peft_model

    from rlhf_lm.configs import ModelArguments
    from rlhf_lm.modeling import load_causal_lm, load_tokenizer, lora_config_from_args

    tokenizer = load_tokenizer(str(real_model_dir))
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(str(real_model_dir), dtype="float32"),
                           lora_config_from_args(ModelArguments(lora_r=4, lora_alpha=8)))
    chats = [user(q) + assistant(c) for q, c, _ in TRAIN_PAIRS[:8]]
    batch = tokenizer.apply_chat_template(chats, tokenize=True, padding=True, return_dict=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("sft") / "adapter"
    model.save_pretrained(out)
    return out


def test_dpo_trains_on_from_an_sft_adapter_that_stays_the_reference(real_model_dir, data, sft_adapter, tmp_path):
    from peft import PeftModel

    from rlhf_lm.modeling import load_causal_lm, load_tokenizer
    from rlhf_lm.stages import dpo

    # The SFT policy really differs from the base on the training replies (it learnt them), so a reference that
    # fell back to the base would show at step 1 as a nonzero implicit reward.
    tokenizer = load_tokenizer(str(real_model_dir))
    base = load_causal_lm(str(real_model_dir), dtype="float32")
    sft = PeftModel.from_pretrained(load_causal_lm(str(real_model_dir), dtype="float32"), sft_adapter)
    gains = [reply_logprob(sft, tokenizer, user(q), c) - reply_logprob(base, tokenizer, user(q), c)
             for q, c, _ in TRAIN_PAIRS[8:12]]
    assert min(gains) > 0.2, gains  # measured: 0.9 to 3.0 nats

    probe_prompt, probe_reply = user(EVAL_PAIRS[0][0]), EVAL_PAIRS[0][1]
    probe = TrainingProbe(real_model_dir / "model.safetensors", probe_prompt, probe_reply)
    out = tmp_path / "dpo_sft"
    run_stage(dpo, callbacks=[probe], model_name_or_path=str(real_model_dir), sft_adapter_path=str(sft_adapter),
              dataset_name=str(data / "pairs_train.jsonl"), eval_dataset_name=str(data / "pairs_eval.jsonl"),
              output_dir=str(out), learning_rate=5e-4, max_steps=3, per_device_train_batch_size=4,
              per_device_eval_batch_size=8, max_length=128, beta=BETA, cache_tokenized=False, seed=0, **COMMON)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["run"]["reference"] == "sft_adapter"

    # In memory: the base is the checkpoint's, bit for bit; the "ref" copy is the SFT adapter as saved; the trained
    # adapter started from it and moved.
    assert probe.base_unchanged and all(probe.base_unchanged.values()), \
        [n for n, same in probe.base_unchanged.items() if not same][:5]
    sft_weights = load_file(sft_adapter / "adapter_model.safetensors")
    ref = {n: p for n, p in probe.frozen.items() if ".ref." in n}
    assert len(ref) == len(sft_weights) and all(
        torch.equal(p, sft_weights[n.replace(".ref.", ".")]) for n, p in ref.items())
    assert probe.before and all(".default." in n for n in probe.before)
    assert all(torch.equal(p, sft_weights[n.replace(".default.", ".")]) for n, p in probe.before.items())
    moved = [n for n in probe.before if not torch.equal(probe.before[n], probe.after[n])]
    assert set(moved) == set(probe.before), set(probe.before) - set(moved)

    # Saved: the trained adapter only (not TRL's "ref" copy), reloading to the in-memory policy's numbers.
    adapter = load_file(out / "adapter_model.safetensors")
    assert set(adapter) == set(sft_weights)
    reloaded = PeftModel.from_pretrained(load_causal_lm(str(real_model_dir), dtype="float32"), out)
    assert reply_logprob(reloaded, tokenizer, probe_prompt, probe_reply) == pytest.approx(probe.logprob, abs=1e-5)

    # Step 1: policy = SFT = reference, so DPO starts at log 2 with zero implicit rewards.
    history = [h for h in probe.logs if "rewards/chosen" in h]
    assert history[0]["loss"] == pytest.approx(LOG_2, abs=1e-4)
    assert history[0]["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert history[0]["rewards/rejected"] == pytest.approx(0, abs=1e-5)


# ---------------------------------------------------------------------------------------------------- evaluate
def test_evaluate_samples_are_clean_and_judged_in_the_training_layout(pipeline_run, judge):
    out = pipeline_run / "evaluate"
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    rows = read_jsonl(out / "samples.jsonl")
    assert [r["prompt"] for r in rows] == [user(q) for q in EVAL_QUESTIONS]
    assert_clean_replies([r["policy"] for r in rows] + [r["reference"] for r in rows])
    records = [{"prompt": r["prompt"], "completion": r[who], "score": r["scores"][f"reward_{who}"]}
               for r in rows for who in ("policy", "reference")]
    assert_scored_as_in_training(records, judge)
    wins = [(r["scores"]["reward_policy"] > r["scores"]["reward_reference"])
            + 0.5 * (r["scores"]["reward_policy"] == r["scores"]["reward_reference"]) for r in rows]
    assert metrics["eval/num_prompts"] == len(EVAL_QUESTIONS) and math.isfinite(metrics["eval/kl"])
    assert metrics["eval/win_rate"] == pytest.approx(sum(wins) / len(wins))


# ------------------------------------------------------------------------------------------------ pipeline + hub
def hub_env(hub_url: str, home: Path) -> dict[str, str]:
    """The environment of a user's process that talks to the Hub stand-in (as tests/test_hub.py sets it up)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_ENDPOINT=hub_url, HF_TOKEN=TOKEN)
    return env


def test_pipeline_hands_artifacts_on_and_its_push_reloads_identically(pipeline_run, real_model_dir, judge, tmp_path):
    from hub_server import HubStandIn
    from peft import PeftModel

    from rlhf_lm.modeling import load_causal_lm, load_tokenizer

    record = json.loads((pipeline_run / "pipeline.json").read_text())
    assert {name: s["status"] for name, s in record["stages"].items()} == {
        "reward": "ran", "dpo": "ran", "evaluate": "ran"}
    evaluate = next(p for p in record["stage_plan"] if p["name"] == "evaluate")
    assert evaluate["inputs"] == {"policy": "dpo", "reward_model": "reward"}
    assert evaluate["values"]["policy_path"] == str(pipeline_run / "dpo")
    assert evaluate["values"]["reward_model"] == str(pipeline_run / "reward")

    download = tmp_path / "download"
    with HubStandIn(token=TOKEN) as hub:
        env = hub_env(hub.url, tmp_path / "home")
        push = subprocess.run([sys.executable, "-m", "rlhf_lm", "push", str(pipeline_run), "--repo_id",
                               "test-user/smollm2-run"], env=env, capture_output=True, text=True, timeout=300)
        assert push.returncode == 0, push.stderr[-3000:]
        assert TOKEN not in push.stdout + push.stderr
        files = set(hub.repos["test-user/smollm2-run"].files)
        assert {"README.md", "pipeline.json", "reward/adapter_model.safetensors", "reward/tokenizer.json",
                "dpo/adapter_model.safetensors", "dpo/tokenizer.json", "evaluate/samples.jsonl"} <= files
        assert not any("checkpoint-" in f or ".partial" in f for f in files)
        code = ("from huggingface_hub import snapshot_download; "
                f"snapshot_download('test-user/smollm2-run', local_dir={str(download)!r})")
        pull = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert pull.returncode == 0, pull.stderr[-3000:]

    # What comes back down gives the numbers of what went up: the DPO policy's log-probs, the reward model's scores.
    prompt, reply = user(EVAL_PAIRS[1][0]), EVAL_PAIRS[1][1]
    tokenizer = load_tokenizer(str(download / "dpo"))
    local = PeftModel.from_pretrained(load_causal_lm(str(real_model_dir), dtype="float32"), pipeline_run / "dpo")
    pulled = PeftModel.from_pretrained(load_causal_lm(str(real_model_dir), dtype="float32"), download / "dpo")
    logprob = reply_logprob(pulled, tokenizer, prompt, reply)
    assert logprob == reply_logprob(local, tokenizer, prompt, reply)
    with pulled.disable_adapter():
        assert reply_logprob(pulled, tokenizer, prompt, reply) != pytest.approx(logprob, abs=1e-3)
    pulled_judge = ClassifierReward.from_pretrained(download / "reward", base_model=str(real_model_dir), device="cpu")
    replies = [EVAL_PAIRS[1][1], EVAL_PAIRS[1][2]]
    assert torch.equal(pulled_judge.raw_scores([prompt] * 2, replies), judge.raw_scores([prompt] * 2, replies))


# --------------------------------------------------------------------------------------------------------- PPO
PPO = dict(rollout_batch_size=4, per_device_train_batch_size=4, per_device_eval_batch_size=4, num_ppo_epochs=1,
           max_new_tokens=16, max_steps=2, learning_rate=1e-3, kl_coef=0.05, seed=0)


def test_ppo_on_chat_prompts(pipeline_run, real_model_dir, data, judge, tmp_path):
    from peft import PeftModel

    from rlhf_lm.modeling import load_causal_lm, load_tokenizer
    from rlhf_lm.ppo import PPOTrainer
    from rlhf_lm.rewards import load_reward
    from rlhf_lm.stages import ppo

    spec, log = recording_reward(pipeline_run / "reward", tmp_path)
    out = tmp_path / "ppo"
    # lora_dropout on: PPO's updates must still run without dropout (their ratios compare with dropout-free rollouts)
    values = dict(model_name_or_path=str(real_model_dir), dataset_name=str(data), dataset_train_split="prompts_train",
                  dataset_eval_split="prompts_eval", reward_model=spec, output_dir=str(out), eval_strategy="steps",
                  eval_steps=2, **PPO, **{**COMMON, "lora_dropout": 0.1})
    run_stage(ppo, **values)
    saved = json.loads((out / "metrics.json").read_text())
    steps = [h for h in saved["log_history"] if "objective/scores" in h]
    evals = [h for h in saved["log_history"] if "eval/scores" in h]
    assert len(steps) == 2 and len(evals) == 1 and saved["run"]["episodes"] == 8

    # The reward model was asked for 2 rollouts of 4 and one eval batch; its scores are the ones PPO logged, each
    # the reward model's score of that chat in its training layout, and every completion ends cleanly at EOS.
    records = read_jsonl(log)
    assert len(records) == 8 + len(EVAL_QUESTIONS)
    for i, step in enumerate(steps):
        assert step["objective/scores"] == pytest.approx(sum(r["score"] for r in records[4 * i:4 * i + 4]) / 4,
                                                         abs=1e-5)
    assert evals[0]["eval/scores"] == pytest.approx(sum(r["score"] for r in records[8:]) / len(EVAL_QUESTIONS),
                                                    abs=1e-5)
    assert_clean_replies([r["completion"] for r in records])
    assert_scored_as_in_training(records, judge)
    # One PPO epoch over one minibatch: each update's forward pass sees the weights the rollout sampled with, so
    # the ratios are 1 - unless dropout, or a different layout of the tokens, makes the two passes differ.
    for step in steps:
        assert step["policy/approxkl"] < 1e-9 and step["policy/clipfrac"] == 0, step  # dropout on: ~1e-5

    assert_only_lora_trained(load_file(out / "adapter_model.safetensors"))
    value_head = load_file(out / "value_head.safetensors")
    assert value_head["weight"].shape == (1, 576) and value_head["bias"].abs().sum() > 0  # the bias starts at 0

    # Reloaded (adapter + value head), the final evaluation comes out as the in-memory model's did.
    model = PeftModel.from_pretrained(load_causal_lm(str(real_model_dir), dtype="float32"), out)
    trainer = PPOTrainer(model, config_from_dict(ppo.CONFIG, {**values, "output_dir": str(tmp_path / "again")}),
                         load_tokenizer(str(out), padding_side="left"), load_reward(str(pipeline_run / "reward")),
                         [user(q) for q in TRAIN_QUESTIONS], eval_prompts=[user(q) for q in EVAL_QUESTIONS])
    trainer.unwrapped.value_head.load_state_dict(value_head)
    again = trainer.evaluate()
    assert again["eval/scores"] == pytest.approx(evals[0]["eval/scores"], abs=1e-5)
    assert again["eval/kl"] == pytest.approx(evals[0]["eval/kl"], abs=1e-5)


def test_ppo_with_the_reward_adapter_on_the_policys_base(pipeline_run, real_model_dir, judge, tmp_path):
    """The reward stage's LoRA adapter trained on SmolLM2, scored on the PPO policy's own SmolLM2 weights (one base
    copy): the scores are the separate reward model's (pad = EOS and the chat template here), PPO trains the policy
    adapter, and the reward adapter comes out bit-identical and is not saved with the policy."""
    from peft import get_peft_model

    from rlhf_lm.configs import ModelArguments
    from rlhf_lm.modeling import load_causal_lm, load_tokenizer, lora_config_from_args
    from rlhf_lm.ppo import PPOConfig, PPOTrainer
    from rlhf_lm.rewards import FunctionReward
    from rlhf_lm.shared_reward import SharedBaseReward, load_reward_for_policy

    tokenizer = load_tokenizer(str(real_model_dir), padding_side="left")
    torch.manual_seed(0)
    policy = get_peft_model(load_causal_lm(str(real_model_dir), dtype="float32"),
                            lora_config_from_args(ModelArguments(lora_r=4, lora_alpha=8)))
    reward, layout = load_reward_for_policy(str(pipeline_run / "reward"), policy, tokenizer)
    assert isinstance(reward, SharedBaseReward) and layout["shared_base"], layout

    prompts = [user(q) for q, _, _ in EVAL_PAIRS] * 2
    replies = [c for _, c, _ in EVAL_PAIRS] + [r for _, _, r in EVAL_PAIRS]
    shared = reward(prompts, replies)
    unmerged = ClassifierReward.from_pretrained(pipeline_run / "reward", merge=False, device="cpu")
    assert torch.equal(shared, unmerged(prompts, replies))  # sharing itself changes no bit
    # The default loader merges the adapter into its base, which rounds differently: ~1e-5 on scores of size ~1.
    torch.testing.assert_close(shared, judge(prompts, replies), rtol=1e-5, atol=1e-5)
    del unmerged

    records: list[dict] = []

    def recorded(prompts, completions):
        scores = reward(prompts, completions)
        records.extend({"prompt": p, "completion": c, "score": s} for p, c, s in zip(prompts, completions,
                                                                                      scores.tolist()))
        return scores

    before = {n: p.detach().clone() for n, p in reward.adapter_parameters().items()}
    args = PPOConfig(output_dir=str(tmp_path / "ppo"), **PPO, **{k: v for k, v in COMMON.items() if "lora" not in k})
    trainer = PPOTrainer(policy, args, tokenizer, FunctionReward(recorded, batched=True, name="shared"),
                         [user(q) for q in TRAIN_QUESTIONS])
    trainer.train()
    assert len(records) == 8
    assert_clean_replies([r["completion"] for r in records])
    assert_scored_as_in_training(records, judge)
    after = reward.adapter_parameters()
    assert all(torch.equal(before[n], after[n]) and after[n].grad is None for n in before)
    trainer.save_model(tmp_path / "out")
    assert not (tmp_path / "out" / "reward").exists()
    assert_only_lora_trained(load_file(tmp_path / "out" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def checkpoint_with_sampling_settings(real_model_dir, tmp_path_factory) -> Path:
    """The real checkpoint with a generation_config.json that ships sampling settings, as Qwen2.5-Instruct's does
    (the weights and tokenizer are links to the real files)."""
    out = tmp_path_factory.mktemp("sampling_checkpoint")
    for f in real_model_dir.iterdir():
        if f.name != "generation_config.json":
            (out / f.name).symlink_to(f)
    config = json.loads((real_model_dir / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)
    (out / "generation_config.json").write_text(json.dumps(config))
    return out


def test_ppo_rollouts_sample_the_plain_softmax_from_the_prompt_tokens_dpo_trains_on(
        checkpoint_with_sampling_settings, tmp_path):
    from datasets import Dataset
    from peft import get_peft_model

    from rlhf_lm.configs import ModelArguments
    from rlhf_lm.modeling import load_causal_lm, load_tokenizer, lora_config_from_args
    from rlhf_lm.ppo import PPOConfig, PPOTrainer
    from rlhf_lm.ppo.rollout import collect_rollout
    from rlhf_lm.preference_pairs import tokenize_pairs
    from rlhf_lm.rewards import FunctionReward

    path = str(checkpoint_with_sampling_settings)
    tokenizer = load_tokenizer(path, padding_side="left")
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(path, dtype="float32"),
                           lora_config_from_args(ModelArguments(lora_r=4, lora_alpha=8)))
    assert model.get_base_model().generation_config.top_k == 20  # the checkpoint's own settings are loaded
    args = PPOConfig(output_dir=str(tmp_path / "ppo"), rollout_batch_size=8, per_device_train_batch_size=8,
                     max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0, use_cpu=True, report_to="none",
                     disable_tqdm=True, seed=0)
    prompts = [user(q) for q in TRAIN_QUESTIONS]
    trainer = PPOTrainer(model, args, tokenizer, FunctionReward(lambda prompt, completion: 0.0, name="zero"), prompts)

    # PPO samples from exactly the prompt tokens DPO trains on: the template's own <|im_start|> (BOS) tokens and
    # nothing added on top, ending in the assistant header.
    pairs = Dataset.from_list([{"prompt": p, "chosen": assistant("Yes."), "rejected": assistant("No.")}
                               for p in prompts])
    assert trainer.prompt_ids == tokenize_pairs(pairs, tokenizer)["prompt_ids"]
    for ids in trainer.prompt_ids:
        text = tokenizer.decode(ids)
        assert ids[0] == tokenizer.bos_token_id and text.count("<|im_start|>") == 3, text
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n"), text

    rollout = collect_rollout(trainer.unwrapped, tokenizer, trainer.prompts, trainer.prompt_ids, trainer.reward_model,
                              args, forward_batch_size=8)
    responses, mask = rollout.input_ids[:, rollout.response_start:], rollout.response_mask.bool()
    for row, keep, has_eos in zip(responses, mask, rollout.has_eos, strict=True):
        n = int(keep.sum())  # the mask covers the reply up to and including its first EOS, then nothing
        assert keep[:n].all() and not keep[n:].any()
        eos_at = (row[:n] == tokenizer.eos_token_id).nonzero().flatten().tolist()
        assert eos_at == ([n - 1] if has_eos else []) and (has_eos or n == responses.shape[1])
    assert_clean_replies(rollout.completions)

    trainer.unwrapped.eval()
    with torch.no_grad():
        logits, _ = trainer.unwrapped(rollout.input_ids, rollout.attention_mask, rollout.response_start)
    logp = logits.float().log_softmax(-1)  # temperature 1: the distribution PPO's ratios and KL assume
    sampled = logp.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(sampled[mask], rollout.logprobs[mask], atol=1e-4)
    # Top-k (the checkpoint's 20, or transformers' default 50) never samples a token ranked 50th or lower; the full
    # softmax does, about `expected` times in these samples (measured: ~20 of ~175 tokens).
    rank = (logp > sampled.unsqueeze(-1)).sum(-1)[mask]
    expected = (1 - logp.exp().topk(50, dim=-1).values.sum(-1))[mask].sum().item()
    assert expected > 5, f"too few tokens ({expected:.1f} expected beyond the top 50) to tell the two apart"
    assert (rank >= 50).sum().item() >= 1, f"no sampled token outside the top 50 (expected {expected:.1f})"
    # And the sampled tokens are as likely as the full softmax makes them: sum(log p + entropy) is a martingale with
    # mean 0, so its z-score stays small; top-k / top-p / a repetition penalty push it far up.
    p = logp.exp()
    entropy = -torch.xlogy(p, p).sum(-1)
    variance = (p * logp.square()).nan_to_num().sum(-1) - entropy.square()
    z = ((sampled + entropy)[mask].sum() / variance[mask].sum().sqrt()).item()
    assert abs(z) < 4, z


# ----------------------------------------------------------------------------------------------------- GRPO, RLOO
@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_grpo_and_rloo_on_chat_prompts(name, pipeline_run, real_model_dir, data, judge, tmp_path):
    import importlib

    from peft import PeftModel

    from rlhf_lm.modeling import load_causal_lm, load_tokenizer

    spec, log = recording_reward(pipeline_run / "reward", tmp_path)
    out = tmp_path / name
    run_stage(importlib.import_module(f"rlhf_lm.stages.{name}"), model_name_or_path=str(real_model_dir),
              dataset_name=str(data), dataset_train_split="prompts_train", dataset_eval_split="prompts_eval",
              reward_model=spec, output_dir=str(out), max_steps=2, per_device_train_batch_size=4, num_generations=2,
              max_completion_length=16, learning_rate=1e-3, seed=0, **COMMON)
    steps = [h for h in json.loads((out / "metrics.json").read_text())["log_history"] if "reward" in h]
    assert len(steps) == 2

    # Two steps of 2 prompts x 2 completions: the scores TRL logged are the reward model's scores of those chats in
    # its training layout, and the completions end cleanly at EOS.
    records = read_jsonl(log)
    assert len(records) == 8
    for i, step in enumerate(steps):
        assert step["reward"] == pytest.approx(sum(r["score"] for r in records[4 * i:4 * i + 4]) / 4, abs=1e-5)
    assert_clean_replies([r["completion"] for r in records])
    assert_scored_as_in_training(records, judge)

    assert_only_lora_trained(load_file(out / "adapter_model.safetensors"))
    # The adapter reloads onto the checkpoint and changes the policy.
    tokenizer = load_tokenizer(str(out))
    policy = PeftModel.from_pretrained(load_causal_lm(str(real_model_dir), dtype="float32"), out)
    prompt, reply = user(EVAL_QUESTIONS[0]), "The capital of England is London."
    trained = reply_logprob(policy, tokenizer, prompt, reply)
    with policy.disable_adapter():
        assert reply_logprob(policy, tokenizer, prompt, reply) != pytest.approx(trained, abs=1e-4)
