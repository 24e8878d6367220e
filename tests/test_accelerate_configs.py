"""Every accelerate config loads with accelerate's own loader, and its launcher turns it into the intended setup."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"

# file -> (distributed type, launcher flag that must be on, mixed precision, runs on CPU)
EXPECTED = {
    "single_gpu.yaml": (DistributedType.NO, None, "bf16", False),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, "multi_gpu", "bf16", False),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, "use_deepspeed", "bf16", False),
    "deepspeed_zero3.yaml": (DistributedType.DEEPSPEED, "use_deepspeed", "bf16", False),
    "fsdp.yaml": (DistributedType.FSDP, "use_fsdp", "bf16", False),
    # torchrun-style launch (one process per rank) with use_cpu: see the comment in the file and test_distributed.py
    "multi_cpu.yaml": (DistributedType.MULTI_GPU, "multi_gpu", "no", True),
    # FSDP2 on CPU ranks: accelerate alone would run it as DDP; rlhf_lm.fsdp makes it real (tests/test_fsdp.py)
    "fsdp_cpu.yaml": (DistributedType.FSDP, "use_fsdp", "no", True),
}


def test_the_set_is_complete():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_launcher_accepts_it(name):
    path = CONFIGS / name
    dist_type, flag, precision, cpu = EXPECTED[name]
    config = load_config_from_file(str(path))
    assert config.distributed_type == dist_type
    assert config.mixed_precision == precision and bool(config.use_cpu) is cpu

    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if flag:
        assert getattr(args, flag) is True
    if dist_type == DistributedType.DEEPSPEED:
        stage = int(re.search(r"zero(\d)", name)[1])
        assert defaults.deepspeed_config["zero_stage"] == stage
        assert defaults.deepspeed_config["zero3_init_flag"] is (stage == 3)
    if dist_type == DistributedType.FSDP:
        assert defaults.fsdp_config["fsdp_version"] == 2  # FSDP2 (fully_shard)
        assert args.fsdp_auto_wrap_policy == "TRANSFORMER_BASED_WRAP"


def test_the_cpu_fsdp_config_shards_like_the_gpu_one():
    """CI trains with fsdp_cpu.yaml: its FSDP settings must be the ones GPU users launch with (fsdp.yaml)."""
    gpu, cpu = (yaml.safe_load((CONFIGS / name).read_text()) for name in ("fsdp.yaml", "fsdp_cpu.yaml"))
    assert cpu["fsdp_config"] == gpu["fsdp_config"]


def test_fsdp2_environment_from_the_launcher():
    """What the launcher hands the ranks for FSDP: version 2, layer-wise wrapping, resharding after forward."""
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "fsdp.yaml"), "train.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_RESHARD_AFTER_FORWARD"].lower() == "true"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_header_has_a_launch_command_whose_recipe_exists(name):
    text = (CONFIGS / name).read_text()
    commands = [line for line in text.splitlines() if line.startswith("#") and "accelerate launch" in line]
    assert commands, f"{name} needs a launch command in its header comment"
    for command in commands:
        assert f"accelerate_configs/{name}" in command
        for recipe in re.findall(r"--config (\S+\.yaml)", command):
            assert (ROOT / recipe).is_file(), f"{name} points at a recipe that does not exist: {recipe}"
