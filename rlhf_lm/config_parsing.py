"""Reading a stage config: a YAML recipe and ``--key value`` flags (or a mapping) into a stage dataclass.

Parsing goes through TRL's ``TrlParser`` (YAML gives defaults, flags override); we only add the checks it lacks:
unknown keys name the closest valid key, and validation errors become :class:`~rlhf_lm.errors.ConfigError`.
The dataclasses themselves (and the checks of their values) are in :mod:`rlhf_lm.configs`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from typing import Any, TypeVar

import yaml

from rlhf_lm.errors import ConfigError, closest_spelling, did_you_mean

T = TypeVar("T")


def field_names(config_cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls) if f.init]


def unread_keys(config_cls: type) -> dict[str, str]:
    """The keys ``config_cls`` inherits but does not read (``configs.unread_field``), each with why."""
    return {f.name: f.metadata["unread"] for f in dataclasses.fields(config_cls) if "unread" in f.metadata}


def unread_key_error(key: str, config_cls: type, source: str) -> ConfigError:
    return ConfigError(f"{key} in {source} is not read by {config_cls.__name__}: {unread_keys(config_cls)[key]}. "
                       "Remove it.")


# Names other tools use for our keys (PEFT's `r`, Axolotl / torchtune's `lora_rank`, ...): spelling distance alone
# suggests the wrong key for these (`lora_rank` is closer to `local_rank` than to `lora_r`).
KEY_ALIASES = {
    "lora_rank": "lora_r", "rank": "lora_r", "r": "lora_r", "lora_targets": "lora_target_modules",
    "target_modules": "lora_target_modules", "lr": "learning_rate", "batch_size": "per_device_train_batch_size",
    "train_batch_size": "per_device_train_batch_size", "micro_batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size", "grad_accum": "gradient_accumulation_steps",
    "gradient_accumulation": "gradient_accumulation_steps", "epochs": "num_train_epochs",
    "num_epochs": "num_train_epochs", "model": "model_name_or_path", "model_name": "model_name_or_path",
    "base_model": "model_name_or_path", "dataset": "dataset_name", "data_path": "dataset_name",
    "output": "output_dir", "out_dir": "output_dir", "resume": "resume_from_checkpoint",
}


def closest_key(key: str, valid: list[str]) -> str | None:
    """The valid key a user most likely meant: a known alias, else the closest spelling among keys that share the
    first word (``lora_*`` for ``lora_rank``), else the closest spelling of any key."""
    if KEY_ALIASES.get(key) in valid:
        return KEY_ALIASES[key]
    head = key.split("_")[0]
    same_head = [v for v in valid if v.split("_")[0] == head]
    return closest_spelling(key, same_head, cutoff=0.5) or closest_spelling(key, valid, cutoff=0.5)


_TRUE, _FALSE = ("true", "yes", "1", "y", "t"), ("false", "no", "0", "n", "f")
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number"}


def _members(hint: Any) -> set[Any]:
    """The types a field accepts: a union's members (``float | None``), else the type itself (``list[float]`` is one
    type, a list, not a float)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return set(typing.get_args(hint))
    return {hint}


def _scalar_kinds(hint: Any) -> set[type] | None:
    """{int}, {float}, {bool} (plus NoneType when optional) for a plain scalar field; None for anything else."""
    kinds = _members(hint)
    return kinds if kinds and kinds <= {int, float, bool, type(None)} and kinds - {type(None)} else None


def _fits(value: Any, kinds: set[type]) -> bool:
    if value is None:
        return type(None) in kinds
    if bool in kinds and (isinstance(value, bool) or str(value).strip().lower() in _TRUE + _FALSE):
        return True
    if isinstance(value, bool):
        return False
    for kind in (int, float):
        if kind in kinds:
            if isinstance(value, int) or (kind is float and isinstance(value, float)):
                return True
            if isinstance(value, str):
                try:
                    kind(value.strip())
                    return True
                except ValueError:
                    pass
    return False


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def coerce_values(config_cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the strings of number and bool fields turned into numbers and bools.

    PyYAML reads ``1e-4`` (no dot) as a string; a number field gets the number (an integer field an integral one:
    ``1e2`` -> 100). A bool field's ``"true"`` / ``"no"`` / ... (TRL's string_to_bool words) become the bool, as on
    the command line - left a string, ``"false"`` would be truthy.
    """
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # an annotation that cannot be resolved: leave the values to the dataclass checks
        return dict(values)
    out = dict(values)
    for key, value in values.items():
        if not isinstance(value, str):
            continue
        kinds = _members(hints.get(key))
        text = value.strip()
        if kinds <= {bool, type(None)} and text.lower() in _TRUE + _FALSE:
            out[key] = text.lower() in _TRUE
        elif not _NUMBER.fullmatch(text):
            continue
        elif float in kinds:
            out[key] = float(text)
        elif int in kinds and float(text).is_integer():
            out[key] = int(float(text))
    return out


def read_values(config_cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """The one way a mapping of config values (a stage recipe, a pipeline stage's shared keys + section + overrides)
    is read: unknown keys fail naming the closest valid one, strings of number / bool fields are converted, and a
    value that still is not its field's type fails naming ``source`` and the key."""
    check_keys(list(values), config_cls, source)
    values = coerce_values(config_cls, values)
    check_value_types(config_cls, values, source)
    return values


def read_override(text: str) -> Any:
    """The value of a ``--key value`` override that is set into a recipe mapping (the pipeline's ``--seed 1``,
    ``--dpo.beta 0.2``): read as YAML, as the same text written in the recipe would be; :func:`read_values` then
    converts it with the recipe's other values. (A stage's own flags are converted by TrlParser, per field type.)"""
    return yaml.safe_load(text)


def check_value_types(config_cls: type, values: dict[str, Any], source: str, prefix: str = "") -> None:
    """A ConfigError naming ``source`` and the key (after ``prefix``: ``controller.``) for a value that cannot be its
    field's number or bool type (``learning_rate: abc``); argparse would print its whole usage text and not say which
    file was wrong."""
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # an annotation that cannot be resolved: the dataclass checks still run
        return
    for key, value in values.items():
        kinds = _scalar_kinds(hints.get(key))
        if kinds and not _fits(value, kinds):
            names = " or ".join(_KIND_NAMES[k] for k in (bool, int, float) if k in kinds)
            raise ConfigError(f"{source}: {prefix}{key} must be {names}, got {value!r}.")


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML recipe into a dict, with errors that name the file."""
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"Recipe file not found: {path}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"Recipe {path} is not valid YAML: {e}") from e
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise ConfigError(f"Recipe {path} must be a YAML mapping of config keys, got {type(recipe).__name__}.")
    return recipe


def check_keys(keys: list[str], config_cls: type, source: str) -> None:
    """Raise a ConfigError for any key that is not a field of ``config_cls``, naming the closest valid key."""
    valid = field_names(config_cls)
    for key in keys:
        if key in unread_keys(config_cls):
            raise unread_key_error(key, config_cls, source)
        if key not in valid:
            raise ConfigError(f"Unknown config key '{key}' in {source} for {config_cls.__name__}."
                              f"{did_you_mean(closest_key(key, valid))}")


def parse_config(config_cls: type[T], args: list[str] | None = None) -> T:
    """Parse ``[--config recipe.yaml] [--key value ...]`` into ``config_cls`` (YAML = defaults, flags override)."""
    args = list(args or [])
    from trl import TrlParser  # here: rlhf_lm.controller.spec reads its section with this module, without TRL

    parser = TrlParser([config_cls])
    parser.error = _argparse_error  # one ConfigError line instead of argparse's usage text and exit
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            raise ConfigError("--config needs a path to a YAML recipe.")
        path = args[i + 1]
        del args[i : i + 2]
        recipe = load_recipe(path)
        _set_env(recipe.pop("env", None) or {}, path)
        # The recipe's values become the parser's defaults (what TrlParser's parse_args_and_config does with the
        # file), read the way a pipeline stage's are, so flags then override them.
        parser.set_defaults_with_config(**read_values(config_cls, recipe, f"recipe {path}"))
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args, return_remaining_strings=True)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"Invalid configuration for {config_cls.__name__}: {e}") from e
    flags = [a.lstrip("-").split("=")[0].replace("-", "_") for a in remaining if a.startswith("--")]
    if remaining:
        check_keys(flags or remaining, config_cls, "command-line flags")
        raise ConfigError(f"Unexpected command-line arguments: {' '.join(remaining)}")
    return parsed[0]


def _set_env(env: Any, path: str) -> None:
    """A recipe's ``env:`` mapping sets environment variables (as TRL's recipes do), before anything reads them."""
    if not isinstance(env, dict):
        raise ConfigError(f"recipe {path}: env must be a mapping of environment variables, got {env!r}.")
    for key, value in env.items():
        os.environ[key] = str(value)


def _argparse_error(message: str) -> None:
    raise ConfigError(f"command-line flags: {message}.")


def config_from_dict(config_cls: type[T], values: dict[str, Any], source: str = "a dict") -> T:
    """Build a stage config from a mapping (e.g. one stage of a pipeline recipe), read by :func:`read_values`."""
    values = read_values(config_cls, values, source)
    try:
        return config_cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"Invalid configuration for {config_cls.__name__} from {source}: {e}") from e
