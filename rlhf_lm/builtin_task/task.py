"""The built-in gold-reward task: a small, learnable stand-in for RLHF (after Gao et al. 2022).

Prompts ask about two things of one topic ("Describe the cat and the dog.\n"). Completions are short sentences,
each pairing a noun with an adjective ("the cat is happy . a cold rain ."). The **gold reward** is a fixed
program scoring three things a human rater might care about, each in [-1, 1]:

* sentiment - the mean polarity of the adjectives (+1 positive, -1 negative),
* relevance - the mean topicality of the nouns (+1 on the prompt's topic, -1 off it),
* coverage  - how many of the two nouns the prompt asked about are mentioned (none -1, one 0, both +1),

averaged to one score in [-1, 1]; a completion with no scorable word gets -1.

A text generator draws completions with random per-sample rates of positive adjectives and on-topic nouns, so
its texts span the whole reward range. It supplies (1) the text a small base policy is pre-trained on, so that
the base policy starts near the task's average reward, and (2) preference pairs: two completions for one prompt,
labelled by a Bradley-Terry draw ``P(a > b) = sigmoid((gold(a) - gold(b)) / label_temperature)`` - annotators
disagree more on close pairs, exactly as human labels do. Reward models learn from these noisy labels only;
evaluation prompts are held out from everything used in training. All of it is deterministic by seed.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

TOPICS: dict[str, list[str]] = {
    "animals": ["cat", "dog", "horse", "bird", "fish", "rabbit", "tiger", "whale"],
    "food": ["bread", "apple", "soup", "cheese", "rice", "cake", "pear", "salad"],
    "weather": ["rain", "snow", "sun", "wind", "cloud", "storm", "fog", "frost"],
    "music": ["song", "guitar", "drum", "piano", "violin", "choir", "flute", "band"],
    "sport": ["ball", "goal", "race", "team", "match", "coach", "bike", "pool"],
    "travel": ["train", "ship", "road", "map", "hotel", "beach", "bridge", "tent"],
}
POSITIVE = ["good", "great", "lovely", "happy", "bright", "kind", "calm", "warm", "fresh", "fine", "nice", "sweet"]
NEGATIVE = ["bad", "awful", "sad", "dull", "cruel", "cold", "rotten", "ugly", "grim", "nasty", "sour", "poor"]
PROMPT_TEMPLATES = [
    "Write about the {a} and the {b}.\n",
    "Tell me about the {a} and the {b}.\n",
    "Describe the {a} and the {b}.\n",
    "Say something about the {a} and the {b}.\n",
]
SENTENCE_TEMPLATES = ["the {n} is {j} .", "the {n} was very {j} .", "a {j} {n} .", "the {n} looks {j} .",
                      "i think the {n} is {j} ."]

NOUN_TOPIC = {noun: topic for topic, nouns in TOPICS.items() for noun in nouns}
ADJ_SCORE = {**{w: 1.0 for w in POSITIVE}, **{w: -1.0 for w in NEGATIVE}}


# ------------------------------------------------------------------------------------------------- gold reward
def prompt_nouns(prompt: str) -> list[str]:
    """The nouns a prompt asks about, in order."""
    return [w for w in _words(prompt) if w in NOUN_TOPIC]


def _words(text: str) -> list[str]:
    return text.lower().replace(".", " ").replace(",", " ").split()


def gold_reward(prompt: str, completion: str) -> float:
    """The task's ground truth: mean of sentiment, relevance and coverage, in [-1, 1] (see module docstring)."""
    asked = prompt_nouns(prompt)
    topic = NOUN_TOPIC[asked[0]] if asked else None
    words = _words(completion)
    adjs = [ADJ_SCORE[w] for w in words if w in ADJ_SCORE]
    nouns = [w for w in words if w in NOUN_TOPIC]
    if not adjs and not nouns:
        return -1.0
    sentiment = sum(adjs) / len(adjs) if adjs else 0.0
    relevance = sum(1.0 if NOUN_TOPIC[n] == topic else -1.0 for n in nouns) / len(nouns) if nouns else 0.0
    covered = len(set(asked) & set(nouns))
    coverage = covered - 1.0 if len(set(asked)) == 2 else (2.0 * covered - 1.0)
    return (sentiment + relevance + coverage) / 3.0


# ------------------------------------------------------------------------------------------------- generator
@dataclass
class TaskConfig:
    """Sizes and noise of the built-in task."""

    seed: int = field(default=0, metadata={"help": "Seed for prompts, splits, texts and labels."})
    eval_prompt_fraction: float = field(default=0.2, metadata={"help": "Fraction of prompts held out for eval."})
    num_pretrain_texts: int = field(default=4000, metadata={"help": "Texts the base policy is pre-trained on."})
    num_train_pairs: int = field(default=2000, metadata={"help": "Preference pairs on training prompts."})
    num_eval_pairs: int = field(default=400, metadata={"help": "Preference pairs on held-out prompts."})
    label_temperature: float = field(
        default=0.3, metadata={"help": "Bradley-Terry temperature of the simulated annotators (higher = noisier)."}
    )
    max_sentences: int = field(default=4, metadata={"help": "Most sentences in a generated completion."})


def all_prompts() -> list[str]:
    prompts = []
    for nouns in TOPICS.values():
        for a in nouns:
            for b in nouns:
                if a != b:
                    prompts.extend(t.format(a=a, b=b) for t in PROMPT_TEMPLATES)
    return prompts


def split_prompts(seed: int = 0, eval_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split of the prompt set."""
    prompts = all_prompts()
    random.Random(seed).shuffle(prompts)
    n_eval = int(len(prompts) * eval_fraction)
    return prompts[n_eval:], prompts[:n_eval]


def sample_completion(prompt: str, rng: random.Random, max_sentences: int = 4) -> str:
    """One completion from the generator: random rates of positive adjectives and on-topic nouns per sample."""
    asked = prompt_nouns(prompt)
    topic = NOUN_TOPIC[asked[0]]
    p_positive, p_on_topic = rng.random(), rng.random()
    off_topic = [n for t, nouns in TOPICS.items() if t != topic for n in nouns]
    sentences = []
    for _ in range(rng.randint(1, max_sentences)):
        if rng.random() < p_on_topic:
            noun = rng.choice(asked) if rng.random() < 0.6 else rng.choice(TOPICS[topic])
        else:
            noun = rng.choice(off_topic)
        adj = rng.choice(POSITIVE if rng.random() < p_positive else NEGATIVE)
        sentences.append(rng.choice(SENTENCE_TEMPLATES).format(n=noun, j=adj))
    return " ".join(sentences)


def preference_pair(prompt: str, rng: random.Random, config: TaskConfig) -> dict[str, str]:
    """Two generator completions labelled by a Bradley-Terry draw on the gold reward (noisy, like annotators)."""
    a = sample_completion(prompt, rng, config.max_sentences)
    b = sample_completion(prompt, rng, config.max_sentences)
    while b == a:
        b = sample_completion(prompt, rng, config.max_sentences)
    margin = (gold_reward(prompt, a) - gold_reward(prompt, b)) / config.label_temperature
    a_wins = rng.random() < 1.0 / (1.0 + math.exp(-margin))
    chosen, rejected = (a, b) if a_wins else (b, a)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def label_agreement(pairs: list[dict[str, str]], temperature: float) -> tuple[float, float]:
    """(observed, expected) rate at which the noisy label agrees with the gold preference (gold ties excluded)."""
    observed, expected, n = 0.0, 0.0, 0
    for p in pairs:
        delta = gold_reward(p["prompt"], p["chosen"]) - gold_reward(p["prompt"], p["rejected"])
        if delta == 0:
            continue
        n += 1
        observed += delta > 0
        expected += 1.0 / (1.0 + math.exp(-abs(delta) / temperature))
    return observed / max(n, 1), expected / max(n, 1)


@dataclass
class TaskData:
    train_prompts: list[str]
    eval_prompts: list[str]
    pretrain_texts: list[str]
    train_pairs: list[dict[str, str]]
    eval_pairs: list[dict[str, str]]


def generate_task(config: TaskConfig | None = None) -> TaskData:
    """All of the task's data for one seed. Evaluation prompts appear in no training text or pair."""
    config = config or TaskConfig()
    rng = random.Random(config.seed)
    train_prompts, eval_prompts = split_prompts(config.seed, config.eval_prompt_fraction)
    pretrain = [p + sample_completion(p, rng, config.max_sentences) for p in rng.choices(train_prompts,
                                                                                           k=config.num_pretrain_texts)]
    train_pairs = [preference_pair(p, rng, config) for p in rng.choices(train_prompts, k=config.num_train_pairs)]
    eval_pairs = [preference_pair(p, rng, config) for p in rng.choices(eval_prompts, k=config.num_eval_pairs)]
    return TaskData(train_prompts, eval_prompts, pretrain, train_pairs, eval_pairs)


# ------------------------------------------------------------------------------------------- on-disk artifact
def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_task(
    output_dir: str | Path,
    config: TaskConfig | None = None,
    arch: str = "llama",
    pretrain_epochs: int = 12,
    callbacks: list | None = None,
    **model_overrides,
) -> Path:
    """Write the task to ``output_dir``: data files and a briefly pre-trained tiny base policy.

    Layout::

        task.json                      config + label-noise statistics
        data/pairs_{train,eval}.jsonl  prompt / chosen / rejected (noisy Bradley-Terry labels)
        data/prompts_{train,eval}.jsonl prompt (eval prompts are held out from all training data)
        base_policy/                   tokenizer + causal LM, loadable with from_pretrained
    """
    from rlhf_lm.builtin_task.pretrain import pretrain_causal_lm
    from rlhf_lm.modeling import build_tiny_model

    config = config or TaskConfig()
    out = Path(output_dir)
    data = generate_task(config)
    (out / "data").mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "data" / "pairs_train.jsonl", data.train_pairs)
    _write_jsonl(out / "data" / "pairs_eval.jsonl", data.eval_pairs)
    _write_jsonl(out / "data" / "prompts_train.jsonl", [{"prompt": p} for p in data.train_prompts])
    _write_jsonl(out / "data" / "prompts_eval.jsonl", [{"prompt": p} for p in data.eval_prompts])

    tokenizer_texts = data.pretrain_texts + [p for p in all_prompts()]
    policy_dir = build_tiny_model(out / "base_policy", tokenizer_texts, arch=arch, seed=config.seed,
                                  **model_overrides)
    pretrain_causal_lm(policy_dir, data.pretrain_texts, epochs=pretrain_epochs, seed=config.seed, callbacks=callbacks)

    observed, expected = label_agreement(data.train_pairs, config.label_temperature)
    meta = {"config": asdict(config), "arch": arch, "label_agreement": observed, "label_agreement_expected": expected,
            "num_train_prompts": len(data.train_prompts), "num_eval_prompts": len(data.eval_prompts)}
    (out / "task.json").write_text(json.dumps(meta, indent=2))
    return out


def task_root(path: str | None) -> Path | None:
    """The built-in task directory that ``path`` (the task dir, its data dir or a data file) belongs to, or None.

    Stages read it to default to the task's gold metrics and its held-out ``data/prompts_eval.jsonl``."""
    if not path:
        return None
    p = Path(path)
    for candidate in (p, p.parent, p.parent.parent):
        if (candidate / "task.json").is_file():
            return candidate
    return None


def task_eval_prompts(path: str | None) -> str | None:
    """The held-out prompt file of the built-in task ``path`` belongs to (see :func:`task_root`), or None."""
    root = task_root(path)
    return str(root / "data" / "prompts_eval.jsonl") if root is not None else None
