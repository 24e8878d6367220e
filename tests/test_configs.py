"""Recipe parsing: YAML gives defaults, CLI flags override, unknown keys name the closest valid key."""

from dataclasses import dataclass

import pytest
import trl

from rlhf_lm.configs import (
    ControllerArguments,
    DataArguments,
    ModelArguments,
    TrainingDefaults,
    config_from_dict,
    parse_config,
)
from rlhf_lm.errors import ConfigError


@dataclass
class DemoConfig(ModelArguments, DataArguments, ControllerArguments, TrainingDefaults, trl.RewardConfig):
    pass


@dataclass
class ReorderedConfig(TrainingDefaults, trl.RewardConfig, ControllerArguments, DataArguments, ModelArguments):
    """DemoConfig's bases in another order: the checks and defaults must not depend on it (a chain of
    ``__post_init__`` calls through the bases stopped at TRL's config, which does not call super)."""


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    recipe = write(tmp_path, "lora_r: 8\nlearning_rate: 0.01\ndataset_name: data.jsonl\ncontroller:\n  policy: rules\n")
    cfg = parse_config(DemoConfig, ["--config", recipe, "--lora_r", "4", "--output_dir", str(tmp_path)])
    assert cfg.lora_r == 4  # flag beats recipe
    assert cfg.learning_rate == 0.01  # recipe beats class default
    assert cfg.dataset_name == "data.jsonl"
    assert cfg.controller == {"policy": "rules"}
    assert cfg.use_peft is True and cfg.gradient_checkpointing is False and cfg.bf16 is False  # our defaults on CPU
    assert cfg.dtype == "float32"  # bf16 base weights only when training in bf16



@pytest.mark.parametrize(
    "recipe, flags, message",
    [
        ("learning_rat: 0.1\n", [], "Unknown config key 'learning_rat' in recipe .* Did you mean 'learning_rate'"),
        ("", ["--lora_rr", "3"], "Unknown config key 'lora_rr' in command-line flags.* Did you mean 'lora_r'"),
        ("lora_r: 0\n", [], "lora_r must be a positive integer"),
        ("eval_fraction: 1.5\n", [], "eval_fraction must be in"),
        ("- a\n- b\n", [], "must be a YAML mapping"),
        ("lora_r: [1\n", [], "not valid YAML"),
    ],
)
def test_bad_recipes_raise_config_errors(tmp_path, recipe, flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(DemoConfig, ["--config", write(tmp_path, recipe), *flags])


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="Recipe file not found: nope.yaml"):
        parse_config(DemoConfig, ["--config", "nope.yaml"])


def test_controller_json_on_command_line(tmp_path):
    cfg = parse_config(DemoConfig, ["--controller", '{"policy": "online"}', "--output_dir", str(tmp_path)])
    assert cfg.controller == {"policy": "online"}


def test_config_from_dict_checks_keys(tmp_path):
    cfg = config_from_dict(DemoConfig, {"lora_r": 2, "output_dir": str(tmp_path)}, "stage 'reward'")
    assert cfg.lora_r == 2
    with pytest.raises(ConfigError, match="Unknown config key 'lora_alpa' in stage 'reward'.*'lora_alpha'"):
        config_from_dict(DemoConfig, {"lora_alpa": 2}, "stage 'reward'")


def test_cli_help_lists_fields(capsys):
    with pytest.raises(SystemExit):
        parse_config(DemoConfig, ["--help"])
    out = capsys.readouterr().out
    assert "--lora_r" in out and "--dataset_name" in out and "LoRA rank" in out


@pytest.mark.parametrize("stage", ["reward", "dpo", "ppo", "grpo", "rloo", "evaluate"])
def test_every_stage_prints_its_help(stage, capsys):
    """argparse formats help text with %: a stray '%' in any field's help breaks `rlhf-lm <stage> --help`."""
    import importlib

    config_cls = importlib.import_module(f"rlhf_lm.stages.{stage}").CONFIG
    with pytest.raises(SystemExit) as exit_info:
        parse_config(config_cls, ["--help"])
    assert exit_info.value.code == 0
    assert "--output_dir" in capsys.readouterr().out


def test_a_tracking_backend_that_is_not_installed_fails_before_anything_loads():
    """transformers raises only at trainer construction (data and model already loaded), with a raw traceback."""
    from rlhf_lm.stages.dpo import DPOStageConfig
    from rlhf_lm.stages.ppo import PPOStageConfig

    for config_cls in (DPOStageConfig, PPOStageConfig):
        with pytest.raises(ConfigError, match=r"report_to: swanlab needs a package .*pip install 'swanlab'"):
            config_cls(report_to="swanlab")
    assert DPOStageConfig(report_to="tensorboard").report_to == ["tensorboard"]  # the test extra installs it


PROMPT_STAGE_UNREAD = {"data_format": "hh_rlhf", "chosen_column": "good", "rejected_column": "bad", "load_in_4bit": True,
                       "load_in_8bit": True, "bnb_4bit_quant_type": "fp4", "use_bnb_nested_quant": True}


@pytest.mark.parametrize("stage", ["ppo", "grpo", "rloo"])
@pytest.mark.parametrize("key", sorted(PROMPT_STAGE_UNREAD))
def test_keys_a_prompt_stage_does_not_read_are_errors(stage, key, tmp_path):
    """ppo / grpo / rloo read prompts only and never quantize: these keys used to be accepted and then ignored."""
    import importlib

    import yaml

    config_cls = importlib.import_module(f"rlhf_lm.stages.{stage}").CONFIG
    value = PROMPT_STAGE_UNREAD[key]
    names_it = rf"{key} in .* is not read by {config_cls.__name__}: "
    with pytest.raises(ConfigError, match=names_it):
        parse_config(config_cls, ["--config", write(tmp_path, yaml.safe_dump({key: value}))])
    with pytest.raises(ConfigError, match=names_it):
        parse_config(config_cls, [f"--{key}", str(value)])
    with pytest.raises(ConfigError, match=names_it):
        config_from_dict(config_cls, {key: value}, f"stage '{stage}'")


def test_a_pipeline_gives_shared_keys_only_to_stages_that_read_them(tmp_path):
    from rlhf_lm.pipeline import plan_pipeline

    plan = plan_pipeline({"stages": ["reward", "ppo"], "data_format": "hh_rlhf", "load_in_4bit": True,
                          "chosen_column": "good"}, output_dir=str(tmp_path))
    reward, ppo = plan.stages
    assert reward.values["data_format"] == "hh_rlhf" and reward.values["load_in_4bit"] is True
    assert not {"data_format", "load_in_4bit", "chosen_column"} & set(ppo.values)
    with pytest.raises(ConfigError, match=r"load_in_4bit in section 'ppo' of .* is not read by PPOStageConfig"):
        plan_pipeline({"stages": ["reward", "ppo"], "ppo": {"load_in_4bit": True}}, output_dir=str(tmp_path))


def test_the_preference_stages_still_read_them(tmp_path):
    from rlhf_lm.stages.dpo import DPOStageConfig

    cfg = DPOStageConfig(output_dir=str(tmp_path), data_format="hh_rlhf", chosen_column="good",
                         rejected_column="bad", bnb_4bit_quant_type="fp4")
    assert (cfg.data_format, cfg.chosen_column, cfg.rejected_column, cfg.bnb_4bit_quant_type) == (
        "hh_rlhf", "good", "bad", "fp4")


@pytest.mark.parametrize("config_cls", [DemoConfig, ReorderedConfig])
def test_the_order_of_the_bases_does_not_change_checks_or_defaults(config_cls, tmp_path, monkeypatch):
    """The dtype default reads bf16, which TrainingDefaults resolves: it used to depend on the bases' order."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU with bf16, where bf16 defaults on
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(trl.RewardConfig, "__post_init__", lambda self: None)  # transformers would look for a GPU
    cfg = config_cls(output_dir=str(tmp_path), controller='{"policy": "rules"}')
    assert (cfg.bf16, cfg.dtype, cfg.controller, cfg.report_to) == (True, "bfloat16", {"policy": "rules"}, "none")
    for bad, message in (({"lora_r": 0}, "lora_r must be"), ({"eval_fraction": 2.0}, "eval_fraction must be"),
                         ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be")):
        with pytest.raises(ConfigError, match=message):
            config_cls(output_dir=str(tmp_path), **bad)


def test_a_stage_recipe_and_a_pipeline_section_read_values_the_same_way(tmp_path, monkeypatch):
    """One reading of recipe values: YAML's unquoted `1e2` (a string to PyYAML), and the words for true / false."""
    from rlhf_lm.pipeline import build_config, parse_args, plan_pipeline
    from rlhf_lm.stages.dpo import DPOStageConfig

    values = {"learning_rate": "3e-5", "max_length": "1e2", "use_peft": "yes", "precompute_ref_log_probs": "false",
              "output_dir": str(tmp_path / "dpo")}
    from_recipe = parse_config(DPOStageConfig, ["--config", write(tmp_path, "".join(f"{k}: '{v}'\n"
                                                                                    for k, v in values.items()))])
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(f"stages: [dpo]\noutput_dir: {tmp_path}\n")
    recipe, source, _ = parse_args(["--config", str(pipe), *(x for k, v in values.items() for x in (f"--dpo.{k}",
                                                                                                    f"'{v}'"))])
    from_pipeline = build_config(plan_pipeline(recipe, source).stages[0])
    for cfg in (from_recipe, from_pipeline):
        assert (cfg.learning_rate, cfg.max_length, cfg.use_peft, cfg.precompute_ref_log_probs) == (3e-5, 100, True,
                                                                                                   False)
    import os

    monkeypatch.setenv("RLHF_LM_TEST_ENV", "before")  # restored after the test
    parse_config(DemoConfig, ["--config", write(tmp_path, "env: {RLHF_LM_TEST_ENV: from the recipe}\n")])
    assert os.environ["RLHF_LM_TEST_ENV"] == "from the recipe"  # a recipe's env: sets variables, as TrlParser's did


def test_a_bad_controller_section_fails_when_the_config_is_read(tmp_path):
    """Not later, when the stage builds its controller after loading data: the key is named controller.<key>."""
    from rlhf_lm.stages.ppo import PPOStageConfig

    for section, message in (("{intervall: 5}", r"'controller\.intervall'.* Did you mean 'interval'"),
                             ("{interval: often}", r"controller\.interval must be an integer, got 'often'"),
                             ("{policy: magic}", r"controller\.policy must be one of"),
                             ("[rules]", "controller must be a mapping")):
        with pytest.raises(ConfigError, match=message):
            parse_config(PPOStageConfig, ["--config", write(tmp_path, f"controller: {section}\n")])
    with pytest.raises(ConfigError, match=r"'controller\.intervall'"):
        parse_config(DemoConfig, ["--controller", '{"intervall": 5}'])
    with pytest.raises(ConfigError, match=r"'controller\.intervall'"):
        config_from_dict(PPOStageConfig, {"controller": {"intervall": 5}}, "section 'ppo'")
    cfg = parse_config(DemoConfig, ["--config", write(tmp_path, "controller: {policy: rules, min_lr_multiplier: 1e-2}\n"),
                                    "--output_dir", str(tmp_path)])
    assert cfg.controller == {"policy": "rules", "min_lr_multiplier": 0.01}  # the keys set, read as numbers
