"""The ``controller:`` section of a recipe, as a typed spec with the checks a user needs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rlhf_lm.errors import ConfigError, suggest

POLICIES = ("rules", "online", "learned")
LAYER_GROUPS = ("lower", "middle", "upper")


@dataclass
class ControllerSpec:
    """How the controller decides and what it may change. Keys of the recipe's ``controller:`` mapping."""

    policy: str = field(default="rules", metadata={"help": "rules | online (probe-and-commit) | learned."})
    interval: int = field(default=10, metadata={"help": "Optimizer steps between two decisions."})
    control_lr: bool = field(default=True, metadata={"help": "Steer the learning rate (a multiplier on the schedule)."})
    control_beta: bool = field(
        default=False, metadata={"help": "Steer DPO beta / PPO KL coefficient (adaptive KL towards kl_target)."})
    min_lr_multiplier: float = field(default=1e-3, metadata={"help": "Lowest total LR multiplier."})
    max_lr_multiplier: float = field(default=1e3, metadata={"help": "Highest total LR multiplier."})
    # rules
    plateau_patience: int = field(default=2, metadata={"help": "Decisions without improvement before the LR drops."})
    plateau_factor: float = field(default=0.5, metadata={"help": "LR factor applied on a plateau."})
    plateau_threshold: float = field(
        default=1e-3, metadata={"help": "Relative improvement of the objective that counts as progress."})
    kl_target: float | None = field(
        default=None, metadata={"help": "KL the adaptive rule steers towards (PPO/GRPO: logged KL). None = off."})
    kl_horizon: float = field(default=10.0, metadata={"help": "Adaptive KL horizon, in decisions (Ziegler et al.)."})
    layer_schedule: list[str] | None = field(
        default=None,
        metadata={"help": "Hierarchical fine-tuning: LoRA layer groups to train, one phase each, spread evenly "
                          "over training, e.g. ['upper', 'upper+middle', 'all']. None = all layers throughout."})
    divergence_factor: float = field(
        default=1.5, metadata={"help": "Roll back when the objective exceeds this x the best seen (or is NaN)."})
    # online probe-and-commit
    candidates: list[float] = field(
        default_factory=lambda: [0.1, 1.0, 10.0],
        metadata={"help": "LR factors tried at each probe (relative to the current LR)."})
    probe_steps: int = field(default=4, metadata={"help": "Optimizer steps each candidate trains during a probe."})
    probe_every: int | None = field(
        default=None, metadata={"help": "Probe at every n-th decision (None = as often as compute_budget allows)."})
    increase_damping: float = field(
        default=0.5,
        metadata={"help": "Online: a winning factor f > 1 is committed as f ** increase_damping. Probes of a few steps "
                          "favour large steps (short-horizon bias), so increases are taken part way; 1 = off."})
    compute_budget: float = field(
        default=1.5, metadata={"help": "Online: most compute, in units of one run without the controller."})
    val_batch_size: int = field(default=32, metadata={"help": "Held-out examples in the fixed validation batch."})
    # learned
    weights: str | None = field(default=None, metadata={"help": "Learned policy weights (.safetensors); None = shipped."})
    seed: int = field(default=0, metadata={"help": "Seed of the probe batches and the validation batch."})

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"controller.policy must be one of {', '.join(POLICIES)}, got '{self.policy}'.")
        if self.interval < 1 or self.probe_steps < 1:
            raise ConfigError("controller.interval and controller.probe_steps must be >= 1.")
        if not 0 < self.min_lr_multiplier <= 1 <= self.max_lr_multiplier:
            raise ConfigError("controller needs 0 < min_lr_multiplier <= 1 <= max_lr_multiplier.")
        if not 0 < self.plateau_factor < 1:
            raise ConfigError(f"controller.plateau_factor must be in (0, 1), got {self.plateau_factor}.")
        if not self.candidates or any(c <= 0 for c in self.candidates):
            raise ConfigError(f"controller.candidates must be positive LR factors, got {self.candidates}.")
        if not 0.0 < self.increase_damping <= 1.0:
            raise ConfigError(f"controller.increase_damping must be in (0, 1], got {self.increase_damping}.")
        if self.compute_budget < 1.0:
            raise ConfigError(f"controller.compute_budget is in units of one run and must be >= 1, "
                              f"got {self.compute_budget}.")
        for phase in self.layer_schedule or []:
            parse_layer_group(phase)

    @classmethod
    def from_dict(cls, spec: dict[str, Any] | None) -> ControllerSpec:
        """The spec from a recipe's ``controller:`` mapping, its values read as a stage's are (``1e-3`` written
        without a dot is a number); errors name the key as ``controller.<key>``."""
        from rlhf_lm.config_parsing import check_value_types, coerce_values

        if spec is not None and not isinstance(spec, dict):
            raise ConfigError(f"controller must be a mapping of controller keys (e.g. {{policy: rules}}), got {spec!r}.")
        spec = dict(spec or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in spec:
            if key not in valid:
                hint = suggest(key, valid, cutoff=0.5) or f" Valid keys: {', '.join(valid)}."
                raise ConfigError(f"Unknown key 'controller.{key}' in the controller section.{hint}")
        spec = coerce_values(cls, spec)
        check_value_types(cls, spec, "the controller section", prefix="controller.")
        try:
            return cls(**spec)
        except TypeError as e:
            raise ConfigError(f"Invalid controller section: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_layer_group(group: str) -> frozenset[str]:
    """'upper+middle' -> {'upper', 'middle'}; 'all' -> every group."""
    if group == "all":
        return frozenset(LAYER_GROUPS)
    parts = frozenset(p.strip() for p in group.split("+"))
    bad = parts - set(LAYER_GROUPS)
    if bad or not parts:
        raise ConfigError(f"Unknown layer group '{group}': use lower, middle, upper, 'all', or joins like "
                          "'upper+middle'.")
    return parts


def controller_objective(stage: str) -> str:
    """What the controller measures in ``stage``, from its entry in :data:`rlhf_lm.stages.STAGES` (or a custom stage
    module's ``CONTROLLER``): "loss" on a held-out batch, or the logged "reward"."""
    from rlhf_lm.stages import STAGES, get_stage

    objective = get_stage(stage).controller if stage in STAGES or "." in stage else None
    if objective is None:
        steered = [name for name, entry in STAGES.items() if entry.controller]
        raise ConfigError(f"The controller does not know stage '{stage}'; stages: {', '.join(steered)}.")
    return objective
