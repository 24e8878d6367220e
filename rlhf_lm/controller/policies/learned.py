"""The learned policy: a small MLP from the scale-free features to the value of each LR factor.

It is trained by ``python -m benchmarks.train_learned_controller`` (in a clone of the repository: training code is
not part of the library) on many short runs of tiny tasks (seeds disjoint from evaluation) and ships in
``rlhf_lm/controller/weights/``. It decides from features alone - no probes - so it
costs nothing beyond one run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_lm.controller.policies.base import Decision
from rlhf_lm.controller.state import FEATURES
from rlhf_lm.errors import ConfigError

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "learned_lr.safetensors"


class QNetwork(nn.Module):
    """features -> predicted improvement of the held-out objective for each LR factor."""

    def __init__(self, num_features: int, num_actions: int, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, num_actions))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def features_to_tensor(features: dict[str, float], names: list[str] | tuple[str, ...] = FEATURES) -> torch.Tensor:
    return torch.tensor([features.get(n, 0.0) for n in names], dtype=torch.float32)


class LearnedPolicy:
    probes = False  # it learned from probe outcomes so that it need not probe at run time

    def __init__(self, network: QNetwork, factors: list[float], feature_names: list[str],
                 mean: torch.Tensor, std: torch.Tensor):
        self.network, self.factors, self.feature_names = network.eval(), list(factors), list(feature_names)
        self.mean, self.std = mean, std
        self.increase_damping = 1.0  # set from the spec: its values come from short probes, like the online policy's

    @torch.no_grad()
    def values(self, features: dict[str, float]) -> torch.Tensor:
        x = (features_to_tensor(features, self.feature_names) - self.mean) / self.std
        return self.network(x)

    def decide(self, features: dict[str, float]) -> Decision:
        q = self.values(features)
        factor = self.factors[int(q.argmax())]
        if factor > 1.0:
            factor = factor ** self.increase_damping
        return Decision(lr_factor=factor, reason=f"learned(q={q.max().item():.3g})")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------------------------------------ storage
    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        from safetensors.torch import save_file

        tensors = {f"net.{k}": v.contiguous() for k, v in self.network.state_dict().items()}
        tensors.update(mean=self.mean.contiguous(), std=self.std.contiguous())
        meta = {"factors": json.dumps(self.factors), "features": json.dumps(self.feature_names),
                "hidden": str(self.network.net[0].out_features), "info": json.dumps(extra or {})}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path | None = None) -> LearnedPolicy:
        from safetensors import safe_open

        path = Path(path or DEFAULT_WEIGHTS)
        if not path.is_file():
            raise ConfigError(f"Learned controller weights not found: {path}. Train them with "
                              "`python -m benchmarks.train_learned_controller` (from a clone of the repository) "
                              "or set controller.weights.")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        factors, names = json.loads(meta["factors"]), json.loads(meta["features"])
        net = QNetwork(len(names), len(factors), int(meta["hidden"]))
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        return cls(net, factors, names, tensors["mean"], tensors["std"])
