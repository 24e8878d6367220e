"""Never a silent fallback: launches that would start separate unsharded runs stop with one clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_lm.errors import ConfigError
from rlhf_lm.launch import check_launch

ROOT = Path(__file__).resolve().parents[1]


def test_the_checks_by_hand():
    check_launch(1, "DistributedType.NO", {}, requested=None)  # a plain run
    check_launch(2, "DistributedType.MULTI_CPU", {"WORLD_SIZE": "2"}, requested=2)  # a real group
    with pytest.raises(ConfigError, match="2 processes were started .* separate copies"):
        check_launch(1, "DistributedType.NO", {"WORLD_SIZE": "2"}, requested=None)
    with pytest.raises(ConfigError, match="asked for FSDP"):
        check_launch(1, "DistributedType.NO", {"ACCELERATE_USE_FSDP": "true"}, requested=None)
    fsdp_on_cpu = {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}
    check_launch(2, "DistributedType.MULTI_CPU", {**fsdp_on_cpu, "FSDP_VERSION": "2"}, requested=2)  # made real
    with pytest.raises(ConfigError, match=r"FSDP version 1 on CPU.*Set fsdp_config.fsdp_version: 2"):
        check_launch(2, "DistributedType.MULTI_CPU", fsdp_on_cpu, requested=2)  # accelerate's default version
    with pytest.raises(ConfigError, match="asked for 2 processes but started 1"):
        check_launch(1, "DistributedType.NO", {}, requested=2)


def _launch(tmp_path: Path, *args: str) -> list[str]:
    """Each rank's LAUNCH line (two ranks' prints can land on one line of the shared stdout: split them apart)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *args, str(ROOT / "tests" / "launch_probe.py")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    return [("LAUNCH" + part).splitlines()[0].rstrip() for part in done.stdout.split("LAUNCH")[1:]]


def test_cpu_flag_with_two_processes_is_refused(tmp_path):
    """`--cpu --num_processes 2` starts one process, and only the launcher's command line says two were asked for."""
    assert _launch(tmp_path, "--cpu", "--num_processes", "2") == [
        "LAUNCH ERROR: accelerate launch was asked for 2 processes but started 1 (--cpu starts one). For several CPU "
        "processes use --config_file accelerate_configs/multi_cpu.yaml (DDP, one gloo group) or "
        "accelerate_configs/fsdp_cpu.yaml (FSDP2); DeepSpeed needs GPUs."]


def test_fsdp1_on_cpu_is_refused_naming_the_key_to_change(tmp_path):
    config = yaml.safe_load((ROOT / "accelerate_configs" / "fsdp.yaml").read_text())
    config.update(use_cpu=True, num_processes=2, mixed_precision="no")
    config["fsdp_config"]["fsdp_version"] = 1
    (tmp_path / "fsdp1_cpu.yaml").write_text(yaml.safe_dump(config))
    lines = _launch(tmp_path, "--config_file", str(tmp_path / "fsdp1_cpu.yaml"), "--main_process_port", "0")
    # The CLI makes CPU ranks one gloo group, where accelerate drops the FSDP request: unsharded DDP. rlhf-lm makes
    # only FSDP2 real on CPU, so version 1 is refused, with the key to change.
    assert lines and all(x.startswith("LAUNCH ERROR: The launch asked for FSDP version 1 on CPU") and
                         "fsdp_config.fsdp_version: 2" in x for x in lines), lines


def test_fsdp2_on_cpu_passes(tmp_path):
    """accelerate_configs/fsdp_cpu.yaml: the stages switch FSDP2 on for CPU ranks (tests/test_fsdp.py trains)."""
    lines = _launch(tmp_path, "--config_file", str(ROOT / "accelerate_configs" / "fsdp_cpu.yaml"),
                    "--main_process_port", "0")
    assert lines == ["LAUNCH OK", "LAUNCH OK"]


def test_a_real_two_process_group_passes(tmp_path):
    lines = _launch(tmp_path, "--config_file", str(ROOT / "accelerate_configs" / "multi_cpu.yaml"),
                    "--num_processes", "2", "--main_process_port", "0")
    assert lines == ["LAUNCH OK", "LAUNCH OK"]


def test_the_cli_stops_such_a_launch_with_one_line_before_loading_anything(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "-m", "rlhf_lm", "dpo",
           "--model_name_or_path", str(tmp_path / "no_model"), "--dataset_name", str(tmp_path / "no_data.jsonl"),
           "--output_dir", str(tmp_path / "out")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    errors = [line for line in done.stderr.splitlines() if line.startswith("rlhf-lm dpo: error:")]
    assert errors == ["rlhf-lm dpo: error: accelerate launch was asked for 2 processes but started 1 (--cpu starts "
                      "one). For several CPU processes use --config_file accelerate_configs/multi_cpu.yaml (DDP, one "
                      "gloo group) or accelerate_configs/fsdp_cpu.yaml (FSDP2); DeepSpeed needs GPUs."], \
        done.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
