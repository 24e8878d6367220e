"""Reward models: the protocol every consumer accepts, built-in reward models, and ``load_reward(spec)``.

A reward model is anything with ``__call__(prompts, completions) -> torch.Tensor``: one float per (prompt,
completion) pair, higher is better. PPO, GRPO/RLOO and evaluation take any such object, so a custom reward is a
plain class or function - no registration needed.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from rlhf_lm.errors import RewardError, describe

# The reply a reward model is probed with before training (any short text will do: the probe catches a spec that
# raises, or returns NaN or the wrong shape, whatever the input).
PROBE_COMPLETION = "OK."


@runtime_checkable
class RewardModel(Protocol):
    """Scores completions: ``reward(prompts, completions)`` returns a float tensor of shape ``(len(prompts),)``.

    Each prompt comes as the data has it: a string, or for conversational data a list of messages (system prompt
    and earlier turns included); each completion is the text of the reply, special tokens stripped. PPO, GRPO/RLOO
    and evaluation all call it this way, so a reward model sees the layout it was trained on.
    """

    def __call__(self, prompts: list[str | list[dict]], completions: list[str]) -> torch.Tensor: ...


def check_rewards(rewards, n: int, name: str) -> torch.Tensor:
    """Validate what a reward model returned: a finite float tensor of shape (n,). Errors name the reward."""
    if not isinstance(rewards, torch.Tensor):
        try:
            rewards = torch.as_tensor(rewards, dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise RewardError(f"Reward model {name} returned {type(rewards).__name__}; return a float tensor of "
                              f"shape ({n},).") from e
    rewards = rewards.detach().float().reshape(-1) if rewards.dim() == 2 and rewards.shape[-1] == 1 else rewards
    if rewards.shape != (n,):
        raise RewardError(f"Reward model {name} returned shape {tuple(rewards.shape)} for {n} completions; "
                          f"return one float per completion, shape ({n},).")
    if not torch.isfinite(rewards).all():
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()[:5]
        raise RewardError(f"Reward model {name} returned NaN/inf for completions at positions {bad}. Check its "
                          "normalisation (e.g. division by a zero std) and inputs.")
    return rewards.float()


def probe_reward(reward: RewardModel, prompts: list, completions: list[str] | None = None,
                 name: str | None = None) -> None:
    """Call ``reward`` once on a small sample, so a reward that raises or returns NaN / the wrong shape stops the run
    before training (not after it, when the trained model would be at stake)."""
    name = name or getattr(reward, "name", type(reward).__name__)
    prompts = list(prompts)[:2] or ["Hello."]
    completions = list(completions or [PROBE_COMPLETION] * len(prompts))[: len(prompts)]
    try:
        values = reward(prompts, completions)
    except RewardError:
        raise
    except Exception as e:
        raise RewardError(f"Reward model {name} failed when called on a sample before training: {describe(e)}.") from e
    check_rewards(values, len(prompts), name)


class FunctionReward:
    """Wrap a plain Python function ``fn(prompt, completion) -> float`` (or a batched one) as a RewardModel."""

    def __init__(self, fn: Callable, batched: bool = False, name: str | None = None):
        self.fn, self.batched = fn, batched
        self.name = name or getattr(fn, "__qualname__", repr(fn))

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        if self.batched:
            values = self.fn(prompts, completions)
        else:
            values = [self.fn(p, c) for p, c in zip(prompts, completions)]
        return check_rewards(values, len(prompts), self.name)  # converts lists, and names this reward on bad output

    def __repr__(self) -> str:
        return f"FunctionReward({self.name})"


class GoldReward(FunctionReward):
    """The built-in task's programmatic gold reward (see ``rlhf_lm.task``). Its prompts are text; a conversational
    prompt is judged by the text of its last message (the task's prompt, when the task is posed as a chat)."""

    def __init__(self):
        from rlhf_lm.task import gold_reward

        super().__init__(gold_reward, name="gold")

    def __call__(self, prompts: list, completions: list[str]) -> torch.Tensor:
        texts = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
        return super().__call__(texts, completions)


def _import_object(spec: str):
    """Resolve ``package.module:Name`` or ``path/to/file.py:Name``."""
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise RewardError(f"Reward spec '{spec}': file {path} does not exist.")
        module_name = f"_rlhf_lm_user_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        # The file's folder goes on sys.path while it loads, so a reward file can import its siblings.
        folder = str(path.resolve().parent)
        sys.path.insert(0, folder)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[module_name]
            raise RewardError(f"Reward spec '{spec}': importing {path} failed: {describe(e)}.") from e
        finally:
            sys.path.remove(folder)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise RewardError(f"Reward spec '{spec}': cannot import module '{target}' ({e}).") from e
        except Exception as e:
            raise RewardError(f"Reward spec '{spec}': importing module '{target}' failed: {describe(e)}.") from e
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_")]
        raise RewardError(f"Reward spec '{spec}': '{target}' has no attribute '{attr}'. It defines: {public}.")
    return getattr(module, attr)


def load_reward(spec, **kwargs) -> RewardModel:
    """Resolve a reward spec to a RewardModel.

    ``spec`` may be a RewardModel (returned as is), ``"gold"`` (the built-in task's gold reward), a reward-stage
    artifact or classifier directory, ``package.module:Name`` or ``path/file.py:Name``. A class is instantiated with
    ``kwargs``; a plain function ``(prompt, completion) -> float`` is wrapped in :class:`FunctionReward`.
    """
    if not isinstance(spec, str):
        if callable(spec):
            return spec
        raise RewardError(f"Reward spec {spec!r} is neither a string nor callable.")
    tried = []
    if spec == "gold":
        return GoldReward()
    tried.append("'gold' (built-in task reward)")
    if os.path.isdir(spec):
        from rlhf_lm.reward_model import ClassifierReward  # a trained reward stage artifact / HF classifier dir

        return ClassifierReward.from_pretrained(spec, **kwargs)
    tried.append(f"a directory named {spec} (none exists)")
    if ":" in spec:
        obj = _import_object(spec)
        if inspect.isclass(obj):
            try:
                obj = obj(**kwargs)
            except Exception as e:
                raise RewardError(f"Reward spec '{spec}': creating {obj.__name__} failed: {describe(e)}.") from e
        elif inspect.isfunction(obj):  # per-pair fn(prompt, completion) -> float, unless marked fn.batched = True
            obj = FunctionReward(obj, batched=getattr(obj, "batched", False), name=spec)
        if not callable(obj):
            raise RewardError(f"Reward spec '{spec}' resolved to a {type(obj).__name__}, which is not callable. "
                              "Point it at a class or function with __call__(prompts, completions).")
        if not getattr(obj, "name", None):  # consumers name the reward in errors (check_rewards): use the spec
            try:
                obj.name = spec
            except AttributeError:  # __slots__ or a read-only property: errors then use the class name
                pass
        return obj
    tried.append("'module:Name' or 'file.py:Name' (no ':' in the spec)")
    raise RewardError(f"Cannot resolve reward spec '{spec}'. Tried: {'; '.join(tried)}.")
