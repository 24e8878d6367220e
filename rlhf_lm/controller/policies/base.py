"""What a policy returns, and the interface every policy implements."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol


@dataclass
class Decision:
    """One decision: relative factors on the current LR and beta / KL coefficient, and the layer group to train."""

    lr_factor: float = 1.0
    beta_factor: float = 1.0
    layer_group: str | None = None  # None = leave as is
    rollback: bool = False
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Policy(Protocol):
    """A controller policy. ``decide`` maps the scale-free features (rlhf_lm.controller.state.FEATURES) to a Decision;
    its state goes into every checkpoint. Optional: ``observe(objective)``, called with the held-out objective at each
    decision before ``decide``.

    ``probes``: the policy wants probe-and-commit (rlhf_lm.controller.probe) at the decisions the compute budget
    allows, and decides by itself in between. Probing needs a held-out loss, so such a policy runs only in stages
    whose controller objective is "loss". A policy without the attribute does not probe.
    """

    probes: bool

    def decide(self, features: dict[str, float]) -> Decision: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
