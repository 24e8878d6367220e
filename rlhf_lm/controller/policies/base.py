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
    def decide(self, features: dict[str, float]) -> Decision: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
