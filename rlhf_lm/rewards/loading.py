"""``load_reward(spec)``: resolve a reward spec (``"gold"``, a directory, ``module:Name``, ``file.py:Name``) to a
RewardModel."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

from rlhf_lm.builtin_task.gold import GoldReward
from rlhf_lm.errors import RewardError, describe
from rlhf_lm.rewards.classifier import ClassifierReward
from rlhf_lm.rewards.function import FunctionReward
from rlhf_lm.rewards.protocol import RewardModel


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
        # a trained reward-stage artifact or a Hugging Face classifier directory
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
