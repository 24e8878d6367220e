"""The stages: one module per stage with a straight-line ``main(argv)``, and :data:`STAGES`, the one table of them.

The CLI's subcommands, the pipeline's artifact passing, the controller's objective and the plotted curves are all
read from :data:`STAGES`, so adding a stage means adding its module to this package and one entry below - nothing
outside ``stages/``. Entries name their module by path and import it on first use, so ``rlhf-lm --help`` and
pipeline planning of other stages never pay for a stage's torch / TRL imports.

A stage module follows :class:`Stage`. A pipeline recipe may also name a module of your own by its path
(``stages: [task, mypkg.score]``); it declares what a table entry would say as module attributes: ``PROVIDES``,
``READS`` and ``CONTROLLER`` (all optional).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from rlhf_lm.errors import ConfigError, suggest

# What a stage can hand on to later stages of a pipeline (see rlhf_lm.pipeline for where each one goes).
ARTIFACTS = ("base_model", "preference_data", "prompt_data", "gold", "reward_model", "policy")
READS = ("pairs", "prompts")  # the training data a stage reads from a task: preference pairs or prompts
# What a controller (rlhf_lm.controller) measures in a stage: its loss on a fixed held-out batch ("loss", which the
# online policy can probe candidates on), or the reward the stage logs ("reward": rules and learned policies only).
CONTROLLER_OBJECTIVES = ("loss", "reward")
DEFAULT_CURVES = ("loss", "reward", "kl")  # what rlhf_lm.plotting draws for a stage that names no curves


@runtime_checkable
class Stage(Protocol):
    """What a stage module provides: its config dataclass, ``run`` and the command-line entry point.

    ``run`` trains (or builds, or evaluates), writes ``metrics.json`` last into ``cfg.output_dir`` and returns the
    final metrics. ``callbacks`` are ``transformers.TrainerCallback`` objects for the stage's trainer, given to it
    with ``callbacks=`` as TRL's trainers take them; a stage that trains nothing (evaluate) has no events to send.
    ``main`` is what ``rlhf-lm <stage>`` calls; a stage of your own that only runs in pipelines may leave it out.
    """

    CONFIG: type

    def run(self, cfg: Any, callbacks: list | None = None) -> dict[str, Any]: ...

    def main(self, argv: list[str] | None = None) -> int: ...


@dataclass(frozen=True)
class StageEntry:
    """One row of :data:`STAGES`: everything the CLI, the pipeline and the controller need to know about a stage."""

    name: str
    module: str  # dotted path of the module that follows the Stage protocol
    help: str = ""  # one line for `rlhf-lm --help`
    provides: tuple[str, ...] = ()  # artifacts later pipeline stages can take from it (ARTIFACTS)
    reads: str | None = None  # "pairs" or "prompts": which data of a task it trains or evaluates on
    controller: str | None = None  # the controller's objective here (CONTROLLER_OBJECTIVES); None: no controller
    curves: tuple[str, ...] = DEFAULT_CURVES  # logged metrics worth plotting, in order of preference
    # (metric, label) pairs of the final metrics worth a line when the stage finishes (rlhf_lm.progress)
    summary: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.provides) - set(ARTIFACTS))
        if unknown:
            raise ConfigError(f"Stage '{self.name}' provides {unknown}; a stage can provide {list(ARTIFACTS)}.")
        if self.reads is not None and self.reads not in READS:
            raise ConfigError(f"Stage '{self.name}' reads '{self.reads}'; a stage reads one of {list(READS)}.")
        if self.controller is not None and self.controller not in CONTROLLER_OBJECTIVES:
            raise ConfigError(f"Stage '{self.name}' gives the controller objective '{self.controller}'; one of "
                              f"{list(CONTROLLER_OBJECTIVES)} (or None for no controller).")

    def load(self) -> Stage:
        """The stage module, imported now; a clear error when it is missing or does not follow :class:`Stage`."""
        try:
            module = importlib.import_module(self.module)
        except ModuleNotFoundError as e:
            if e.name != self.module and not self.module.startswith(f"{e.name}."):
                raise  # the module exists but one of its own imports is missing: that traceback is the news
            raise ConfigError(f"Stage '{self.name}' is not available in this installation ({self.module} is "
                              "missing).") from e
        missing = [name for name in ("CONFIG", "run") if not hasattr(module, name)]
        if missing:
            raise ConfigError(f"Stage module {self.module} must define CONFIG (a config dataclass) and "
                              f"run(cfg, callbacks); it lacks {', '.join(missing)}.")
        return module

    @property
    def config_class(self) -> type:
        return self.load().CONFIG

    def run(self, cfg: Any, callbacks: list | None = None) -> dict[str, Any]:
        return self.load().run(cfg, callbacks=list(callbacks or [])) or {}

    def main(self, argv: list[str] | None = None) -> int:
        return self.load().main(argv)


_POLICY = "Fine-tune a policy with"
_AGAINST_REFERENCE = (("eval/win_rate", "win-rate"), ("eval/gold_reward/policy", "gold reward"), ("eval/kl", "KL"))
STAGES: dict[str, StageEntry] = {entry.name: entry for entry in (
    StageEntry("task", "rlhf_lm.stages.task",
               "Build the built-in gold-reward task: data files and a tiny base policy.",
               provides=("base_model", "preference_data", "prompt_data", "gold"),
               curves=(),  # the base policy's brief pre-training is part of building the task, not worth a plot
               summary=(("task/num_train_prompts", "train prompts"), ("task/num_eval_prompts", "held-out prompts"),
                        ("task/label_agreement", "label-gold agreement"))),
    StageEntry("reward", "rlhf_lm.stages.reward",
               "Train a reward model on preference pairs (TRL RewardTrainer, LoRA).",
               provides=("reward_model",), reads="pairs", controller="loss",
               curves=("loss", "accuracy", "margin", "eval_loss"),
               summary=(("reward/accuracy", "held-out accuracy"), ("reward/gold_accuracy", "gold accuracy"))),
    StageEntry("dpo", "rlhf_lm.stages.dpo",
               f"{_POLICY} DPO (TRL DPOTrainer, LoRA, reference = adapters off).",
               provides=("policy",), reads="pairs", controller="loss",
               curves=("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen"),
               summary=(("eval/implicit_accuracy", "implicit accuracy"), *_AGAINST_REFERENCE)),
    StageEntry("ppo", "rlhf_lm.stages.ppo",
               f"{_POLICY} PPO (LoRA policy + value head on one frozen base).",
               provides=("policy",), reads="prompts", controller="reward",
               curves=("objective/rlhf_reward", "objective/scores", "objective/kl", "policy/clipfrac",
                       "loss/policy_avg"),
               summary=(("objective/scores", "reward (last batch)"), ("objective/kl", "KL"))),
    StageEntry("grpo", "rlhf_lm.stages.grpo", f"{_POLICY} GRPO (TRL GRPOTrainer).",
               provides=("policy",), reads="prompts", controller="reward",
               curves=("reward", "kl", "loss", "completions/mean_length"),
               summary=(("reward/first", "reward at start"), ("reward/last", "at end"))),
    StageEntry("rloo", "rlhf_lm.stages.rloo", f"{_POLICY} RLOO (TRL RLOOTrainer).",
               provides=("policy",), reads="prompts", controller="reward",
               curves=("reward", "kl", "loss", "completions/mean_length"),
               summary=(("reward/first", "reward at start"), ("reward/last", "at end"))),
    StageEntry("evaluate", "rlhf_lm.stages.evaluate",
               "Win-rate vs the reference, reward, KL and samples on held-out prompts.", reads="prompts",
               summary=_AGAINST_REFERENCE),
)}


def is_known_stage(kind: str) -> bool:
    """True for a stage of the table or an importable top-level package of a custom stage; imports nothing."""
    return kind in STAGES or importlib.util.find_spec(kind.split(".")[0]) is not None


def unknown_stage_error(kind: str, source: str = "the recipe") -> ConfigError:
    return ConfigError(f"Unknown stage '{kind}' in {source}.{suggest(kind, STAGES)} Stages: {', '.join(STAGES)} (or the module path "
                       "of your own stage); a section with another name needs `stage: <one of these>`.")


def get_stage(kind: str, source: str = "the recipe") -> StageEntry:
    """The table's entry for ``kind``, or an entry for the custom stage module at path ``kind`` (imported now)."""
    if kind in STAGES:
        return STAGES[kind]
    try:
        module = importlib.import_module(kind)
    except ModuleNotFoundError as e:
        if e.name != kind and not kind.startswith(f"{e.name}."):
            raise
        raise unknown_stage_error(kind, source) from e
    entry = StageEntry(kind, kind, provides=tuple(getattr(module, "PROVIDES", ())),
                       reads=getattr(module, "READS", "pairs"),  # what custom stages were always given
                       controller=getattr(module, "CONTROLLER", None))
    entry.load()  # checks the module follows the Stage protocol
    return entry


__all__ = ["ARTIFACTS", "CONTROLLER_OBJECTIVES", "DEFAULT_CURVES", "READS", "STAGES", "Stage", "StageEntry",
           "get_stage", "is_known_stage", "unknown_stage_error"]
