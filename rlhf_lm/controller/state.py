"""Scale-free features of a training run, for the controller's policies.

Every feature is a ratio, a log-ratio, a fraction or a bounded statistic, so one policy transfers across models,
datasets and learning-rate scales. All of it is pure bookkeeping on floats (no torch), tested by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Log keys each stage reports, by meaning (first present wins).
ACCURACY_KEYS = ("rewards/accuracies", "accuracy", "eval_accuracy")
MARGIN_KEYS = ("rewards/margins", "margin")
KL_KEYS = ("objective/kl", "kl")
CLIPFRAC_KEYS = ("policy/clipfrac", "clip_ratio/region_mean")
REWARD_KEYS = ("objective/scores", "reward", "objective/rlhf_reward")

FEATURES = (
    "progress",          # fraction of max_steps done
    "loss_ema_ratio",    # log(fast EMA / slow EMA) of the training loss: < 0 improving, > 0 getting worse
    "loss_cv",           # std / mean of the recent training loss (noise level)
    "grad_norm_ratio",   # log(fast / slow EMA) of the gradient norm: spikes precede divergence
    "update_ratio",      # log10(|delta theta| / |theta|) per step over the interval: the LR's effective size
    "log_lr_multiplier",  # log of the controller's total LR multiplier so far
    "log_beta_multiplier",
    "accuracy",          # stage accuracy (reward / DPO implicit reward), centred at 0.5
    "margin",            # tanh of the stage margin
    "kl_over_budget",    # KL / kl_target - 1 when both exist (clipped to [-1, 10])
    "clipfrac",
    "val_change",        # relative change of the held-out objective since the last decision
    "val_vs_best",       # log(held-out objective / best seen)
)


def _first(logs: dict[str, float], keys: tuple[str, ...]) -> float | None:
    for k in keys:
        v = logs.get(k)
        if isinstance(v, (int, float)) and math.isfinite(v):
            return float(v)
    return None


@dataclass
class Ema:
    """Exponential moving average with bias correction (so the first values are not pulled toward 0)."""

    decay: float
    value: float = 0.0
    weight: float = 0.0

    def update(self, x: float) -> float:
        self.value = self.decay * self.value + (1 - self.decay) * x
        self.weight = self.decay * self.weight + (1 - self.decay)
        return self.get()

    def get(self) -> float | None:
        return self.value / self.weight if self.weight > 0 else None


@dataclass
class SignalTracker:
    """Running statistics of the logged metrics and the held-out objective, turned into :data:`FEATURES`."""

    loss_fast: Ema = field(default_factory=lambda: Ema(0.7))
    loss_slow: Ema = field(default_factory=lambda: Ema(0.95))
    loss_sq: Ema = field(default_factory=lambda: Ema(0.7))
    grad_fast: Ema = field(default_factory=lambda: Ema(0.7))
    grad_slow: Ema = field(default_factory=lambda: Ema(0.95))
    last: dict[str, float] = field(default_factory=dict)
    val_history: list[float] = field(default_factory=list)
    update_ratio: float | None = None

    def observe_logs(self, logs: dict[str, float]) -> None:
        loss, grad = logs.get("loss"), logs.get("grad_norm")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            self.loss_fast.update(loss)
            self.loss_slow.update(loss)
            self.loss_sq.update(loss * loss)
        if isinstance(grad, (int, float)) and math.isfinite(grad):
            self.grad_fast.update(grad)
            self.grad_slow.update(grad)
        for name, keys in (("accuracy", ACCURACY_KEYS), ("margin", MARGIN_KEYS), ("kl", KL_KEYS),
                           ("clipfrac", CLIPFRAC_KEYS), ("reward", REWARD_KEYS)):
            value = _first(logs, keys)
            if value is not None:
                self.last[name] = value

    def observe_objective(self, value: float) -> None:
        self.val_history.append(float(value))

    def features(self, progress: float, lr_multiplier: float, beta_multiplier: float,
                 kl_target: float | None = None) -> dict[str, float]:
        return compute_features(self, progress, lr_multiplier, beta_multiplier, kl_target)

    def state_dict(self) -> dict:
        return {
            "emas": {n: [getattr(self, n).value, getattr(self, n).weight]
                     for n in ("loss_fast", "loss_slow", "loss_sq", "grad_fast", "grad_slow")},
            "last": dict(self.last), "val_history": list(self.val_history), "update_ratio": self.update_ratio,
        }

    def load_state_dict(self, state: dict) -> None:
        for n, (value, weight) in state["emas"].items():
            getattr(self, n).value, getattr(self, n).weight = value, weight
        self.last, self.val_history = dict(state["last"]), list(state["val_history"])
        self.update_ratio = state.get("update_ratio")


def _log_ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or a <= 0 or b <= 0:
        return 0.0
    return math.log(a / b)


def compute_features(t: SignalTracker, progress: float, lr_multiplier: float, beta_multiplier: float,
                     kl_target: float | None = None) -> dict[str, float]:
    """The feature dict (keys = :data:`FEATURES`, neutral value 0 for anything not observed yet)."""
    mean, sq = t.loss_fast.get(), t.loss_sq.get()
    cv = math.sqrt(max(sq - mean * mean, 0.0)) / abs(mean) if mean not in (None, 0.0) and sq is not None else 0.0
    vals = t.val_history
    val_change = (vals[-1] - vals[-2]) / max(abs(vals[-2]), 1e-8) if len(vals) >= 2 else 0.0
    best = min(vals) if vals else None
    kl = t.last.get("kl")
    feats = {
        "progress": progress,
        "loss_ema_ratio": _log_ratio(t.loss_fast.get(), t.loss_slow.get()),
        "loss_cv": min(cv, 10.0),
        "grad_norm_ratio": _log_ratio(t.grad_fast.get(), t.grad_slow.get()),
        "update_ratio": t.update_ratio if t.update_ratio is not None else 0.0,
        "log_lr_multiplier": math.log(lr_multiplier),
        "log_beta_multiplier": math.log(beta_multiplier),
        "accuracy": t.last.get("accuracy", 0.5) - 0.5,
        "margin": math.tanh(t.last.get("margin", 0.0)),
        # KL / target - 1 (0 = on target), not a log: the k1 KL estimate can be zero or negative early on
        "kl_over_budget": min(max(kl / kl_target - 1.0, -1.0), 10.0) if kl is not None and kl_target else 0.0,
        "clipfrac": t.last.get("clipfrac", 0.0),
        "val_change": max(min(val_change, 10.0), -10.0),
        "val_vs_best": _log_ratio(vals[-1], best) if vals else 0.0,
    }
    return {k: float(feats[k]) for k in FEATURES}
