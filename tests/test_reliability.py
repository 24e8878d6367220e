"""Nothing lost, nothing silent (issue #18).

* the bad-input corpus (tests/corpus/cases.yaml): every user mistake exits 2 with one line naming the file, row,
  column or key, writes nothing and deletes nothing;
* output directories: a run never deletes or overwrites what it did not create, and replaces its own finished
  output only when told to;
* checkpoints: a kill during a save leaves the newest complete checkpoint to resume from (a real SIGKILL of a real
  DPO run), and Ctrl-C names it;
* train first, then judge: an evaluation failure keeps the trained adapter;
* secrets: a token given to a stage is in no file it writes, nor in its logs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from rlhf_lm import cli
from rlhf_lm.artifacts import METRICS_FILE, OUTPUT_MARKER, resolve_resume, staged_output
from rlhf_lm.checkpoints import last_checkpoint
from rlhf_lm.configs import parse_config
from rlhf_lm.errors import ArtifactError
from rlhf_lm.json_files import write_json
from rlhf_lm.stages import STAGES

TESTS = Path(__file__).parent
CORPUS = TESTS / "corpus"
SPEC = yaml.safe_load((CORPUS / "cases.yaml").read_text())
FAKE_TOKEN = "hf_FAKE0token0never0written0anywhere"


def snapshot(directory: Path) -> dict[str, bytes]:
    if not directory.exists():
        return {}
    if directory.is_file():
        return {".": directory.read_bytes()}
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ the corpus
def _finished_output(out: Path, stage: str = "dpo") -> None:
    with staged_output(out, stage=stage) as staged:
        (staged / "adapter_model.safetensors").write_bytes(b"weights")
        write_json(staged / METRICS_FILE, {"metrics": {}, "config": {"output_dir": str(out)}})


def _partial_with_checkpoints(out: Path) -> None:
    """What a crashed run leaves: two complete checkpoints and one torn by a kill during its save."""
    with pytest.raises(KeyboardInterrupt), staged_output(out, stage="dpo") as staged:
        for step in (1, 2):
            (staged / f"checkpoint-{step}").mkdir()
            (staged / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (staged / "checkpoint-3").mkdir()  # torn: no trainer state
        raise KeyboardInterrupt


def _read_only_parent(values: dict, request) -> None:
    parent = Path(values["tmp"]) / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    request.addfinalizer(lambda: parent.chmod(0o755))
    if os.access(parent, os.W_OK):  # root ignores permission bits; /sys refuses writes even to root
        parent = Path("/sys")
    values["out"] = str(parent / "out")


def _setup(name: str | None, values: dict, monkeypatch, request) -> None:
    out, tmp = Path(values["out"]), Path(values["tmp"])
    if name == "foreign_output":
        out.mkdir()
        (out / "precious.txt").write_text("x")
    elif name == "finished_output":
        _finished_output(out)
    elif name == "finished_output_plus_notes":
        _finished_output(out)
        (out / "notes.txt").write_text("mine")
    elif name == "foreign_partial":
        (out.parent / "out.partial").mkdir()
        (out.parent / "out.partial" / "mine.txt").write_text("x")
    elif name == "output_is_file":
        out.write_text("x")
    elif name == "partial_with_checkpoints":
        _partial_with_checkpoints(out)
    elif name == "cwd_with_files":
        (tmp / "notes.txt").write_text("x")
        monkeypatch.chdir(tmp)
    elif name == "read_only_parent":
        _read_only_parent(values, request)
    elif name == "file_in_tmp":
        (tmp / "file.txt").write_text("x")
    else:
        assert name is None, f"unknown setup {name}"


@pytest.mark.parametrize("case", SPEC["cases"], ids=[c["id"] for c in SPEC["cases"]])
def test_corpus_case(case, tiny_task_dir, tmp_path, monkeypatch, capsys, request):
    """One bad input: exit 2, one line (the last on stderr) matching the case, no traceback, nothing changed."""
    values = {"corpus": str(CORPUS), "task": str(tiny_task_dir), "tmp": str(tmp_path / "tmp"),
              "out": str(tmp_path / "out")}
    (tmp_path / "tmp").mkdir()
    _setup(case.get("setup"), values, monkeypatch, request)
    for key, value in case.get("env", {}).items():
        monkeypatch.setenv(key, value)
    argv = [arg.format(**values) for arg in SPEC["commands"][case["command"]] + case.get("args", [])]
    before = {p: snapshot(p) for p in (tmp_path, Path(values["out"]))}

    with pytest.raises(SystemExit) as stopped:  # anything else (a raw traceback) fails the case
        cli.main(argv)

    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("rlhf-lm ")]
    assert stopped.value.code == case.get("exit", 2), err
    assert "Traceback" not in err
    assert len(ours) == 1 and err.rstrip().endswith(ours[0]), err
    assert re.search(case["expect"], ours[0]), ours[0]
    assert {p: snapshot(p) for p in before} == before  # nothing written, nothing deleted


def test_corpus_covers_every_case_of_the_issue():
    covered = {c["issue"] for c in SPEC["cases"]}
    assert covered >= {1, 2, 3, 4, 5, 7, 8, 9, 10}  # 6 (tokens) is test_no_token_in_any_file_a_run_writes
    assert len(SPEC["cases"]) >= 50


# ---------------------------------------------------------------------------------------- output directories
def dpo_args(task: Path, out: Path, *extra: str, lora: bool = True) -> list[str]:
    """A few-step DPO run on the tiny task, through the CLI (LoRA, or a full fine-tune)."""
    model = ["--lora_r", "4", "--lora_alpha", "8"] if lora else ["--use_peft", "false"]
    return ["dpo", "--model_name_or_path", str(task / "base_policy"), "--dataset_name", str(task / "data"),
            "--dataset_train_split", "pairs_train", "--dataset_eval_split", "pairs_eval", "--output_dir", str(out),
            "--use_cpu", "true", "--max_steps", "2", "--per_device_train_batch_size", "8", "--max_length", "96",
            "--learning_rate", "1e-2", "--eval_num_prompts", "4", "--eval_max_new_tokens", "8", "--disable_tqdm",
            "true", "--seed", "0", *model, *extra]


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    return stopped.value.code


def test_a_run_replaces_only_its_own_finished_output_and_never_a_sibling(tiny_task_dir, tmp_path, capsys):
    out = tmp_path / "run"
    for sibling in ("run.old", ".run.old", "run.bak"):  # a user's folders beside the output: never touched
        (tmp_path / sibling).mkdir()
        (tmp_path / sibling / "keep.txt").write_text(sibling)
    siblings = {name: snapshot(tmp_path / name) for name in ("run.old", ".run.old", "run.bak")}

    assert run_cli(dpo_args(tiny_task_dir, out)) == 0
    first = snapshot(out)
    assert run_cli(dpo_args(tiny_task_dir, out, "--learning_rate", "5e-2")) == 2  # a finished run: not without consent
    assert "--overwrite_output_dir true" in capsys.readouterr().err
    assert snapshot(out) == first
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    assert marker["state"] == "finished" and marker["stage"] == "dpo" and "adapter_model.safetensors" in marker["files"]

    assert run_cli(dpo_args(tiny_task_dir, out, "--learning_rate", "5e-2", "--overwrite_output_dir", "true")) == 0
    assert snapshot(out)["adapter_model.safetensors"] != first["adapter_model.safetensors"]  # replaced
    assert {name: snapshot(tmp_path / name) for name in siblings} == siblings
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.old", "run", "run.bak", "run.old"]


# ------------------------------------------------------------------------------------------------ checkpoints
def test_resume_skips_checkpoints_torn_by_a_kill_and_logs_its_choice(tmp_path, caplog):
    out = tmp_path / "run"
    partial = tmp_path / "run.partial"
    for step in (12, 13):
        (partial / f"checkpoint-{step}").mkdir(parents=True)
    (partial / "checkpoint-12" / "trainer_state.json").write_text(json.dumps({"global_step": 12}))
    # checkpoint-13 has 0 files: an older version was killed while writing it in place
    assert last_checkpoint(partial) == str(partial / "checkpoint-12")
    with caplog.at_level(logging.INFO, logger="rlhf_lm.artifacts"):
        assert resolve_resume(out, True) == str(partial / "checkpoint-12")
    assert "Skipping incomplete checkpoint(s) ['checkpoint-13']" in caplog.text
    assert f"Resuming from {partial / 'checkpoint-12'}" in caplog.text
    with pytest.raises(ArtifactError, match="not a complete checkpoint"):
        resolve_resume(out, str(partial / "checkpoint-13"))


@pytest.mark.parametrize("stage", [name for name, entry in STAGES.items()
                                   if "resume_from_checkpoint" in {f.name for f in fields(entry.config_class)}])
def test_every_stage_refuses_to_resume_when_there_is_no_checkpoint(stage, tmp_path):
    """As transformers' Trainer raises for resume_from_checkpoint=True without a checkpoint, every stage stops (before
    loading anything) with an error naming the output_dir."""
    argv = ["--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint", "true", "--model_name_or_path",
            str(tmp_path / "no_model"), "--use_cpu", "true"]
    if "reward_model" in {f.name for f in fields(STAGES[stage].config_class)}:
        argv += ["--reward_model", "gold"]
    with pytest.raises(ArtifactError, match=f"no complete checkpoint of a run of output_dir {tmp_path / 'run'}"):
        STAGES[stage].run(parse_config(STAGES[stage].config_class, argv))
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def _interrupt(signal_name: str, point: str, argv: list[str], log: Path) -> subprocess.CompletedProcess:
    """Run the CLI in a child process that a real signal stops at ``point`` (see tests/interrupt_run.py)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as stderr:
        return subprocess.run([sys.executable, str(TESTS / "interrupt_run.py"), signal_name, point, "--", *argv],
                              env=env, stdout=subprocess.DEVNULL, stderr=stderr, timeout=300)


SAVE_EVERY_STEP = ("--max_steps", "4", "--save_strategy", "steps", "--save_steps", "1")


def _kill(task: Path, tmp_path: Path, point: str) -> Path:
    """An uninterrupted 4-step DPO run into ``straight``, and the same run killed (-9) at ``point`` into ``killed``.
    Returns the killed run's partial dir."""
    assert run_cli(dpo_args(task, tmp_path / "straight", *SAVE_EVERY_STEP)) == 0
    killed = _interrupt("KILL", point, dpo_args(task, tmp_path / "killed", *SAVE_EVERY_STEP), tmp_path / "killed.log")
    assert killed.returncode == -9, (tmp_path / "killed.log").read_text()
    return tmp_path / "killed.partial"


def _resume_matches_the_uninterrupted_run(task: Path, tmp_path: Path, caplog) -> str:
    """Resume the killed run with --resume_from_checkpoint true; it must end exactly like the uninterrupted one.
    Returns what the resume logged about where it started."""
    out = tmp_path / "killed"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rlhf_lm.artifacts"):
        assert run_cli(dpo_args(task, out, *SAVE_EVERY_STEP, "--resume_from_checkpoint", "true")) == 0
    expected = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    resumed = load_file(out / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], atol=1e-5, rtol=0)
    assert json.loads((out / METRICS_FILE).read_text())["metrics"]["train/steps"] == 4
    assert not (tmp_path / "killed.partial").exists()
    return caplog.text


def test_kill_during_a_checkpoint_save_then_resume_matches_an_uninterrupted_run(tiny_task_dir, tmp_path, capsys,
                                                                               caplog):
    # kill -9 after the weights and optimizer of checkpoint-3 are written, before its RNG and trainer state
    partial = _kill(tiny_task_dir, tmp_path, "Trainer._save_optimizer_and_scheduler@3")
    assert last_checkpoint(partial) == str(partial / "checkpoint-2") and not (tmp_path / "killed").exists()
    assert not (partial / "checkpoint-3").exists()  # the torn save never got a checkpoint's name

    assert run_cli(dpo_args(tiny_task_dir, tmp_path / "killed", *SAVE_EVERY_STEP)) == 2  # not started over silently
    assert "holds checkpoints of an unfinished run (newest complete: checkpoint-2)" in capsys.readouterr().err
    log = _resume_matches_the_uninterrupted_run(tiny_task_dir, tmp_path, caplog)
    assert f"Resuming from {partial / 'checkpoint-2'}" in log
    assert "Skipping incomplete checkpoint(s) ['.checkpoint-in-progress/checkpoint-3']" in log


@pytest.mark.slow
@pytest.mark.parametrize("point, resumes_from", [
    ("Trainer.save_model@2", "checkpoint-1"),  # inside a save: weights written
    ("Trainer._save_rng_state@2", "checkpoint-1"),  # inside a save: all but the trainer state written
    ("Trainer._save_checkpoint@2", "checkpoint-1"),  # everything written, not yet renamed into place
    ("Trainer.training_step@2", "checkpoint-2"),  # between two saves
    ("rlhf_lm.stages.dpo:evaluate_against_reference", "checkpoint-4"),  # trained and saved, evaluation starting
    ("rlhf_lm.stages.dpo:write_stage_metrics", "checkpoint-4"),  # evaluated, metrics.json not yet written
    ("rlhf_lm.artifacts:_finish", "checkpoint-4"),  # about to move the finished output into place
])
def test_kill_at_any_moment_then_resume_matches_an_uninterrupted_run(point, resumes_from, tiny_task_dir, tmp_path,
                                                                     caplog):
    partial = _kill(tiny_task_dir, tmp_path, point)
    assert last_checkpoint(partial) == str(partial / resumes_from)
    log = _resume_matches_the_uninterrupted_run(tiny_task_dir, tmp_path, caplog)
    assert f"Resuming from {partial / resumes_from}" in log


def test_ctrl_c_names_the_checkpoint_to_resume_from_and_the_reward_stage_resumes_from_it(tiny_task_dir, tmp_path,
                                                                                         caplog):
    out = tmp_path / "reward"
    argv = ["reward", "--model_name_or_path", str(tiny_task_dir / "base_policy"), "--dataset_name",
            str(tiny_task_dir / "data"), "--dataset_train_split", "pairs_train", "--dataset_eval_split", "pairs_eval",
            "--output_dir", str(out), "--use_cpu", "true", "--max_steps", "4", "--save_strategy", "steps",
            "--save_steps", "1", "--per_device_train_batch_size", "8", "--max_length", "96", "--lora_r", "4",
            "--disable_tqdm", "true"]
    # a real SIGINT in step 3's training step: checkpoint-2 is the newest complete one
    stopped = _interrupt("INT", "Trainer.training_step@2", argv, tmp_path / "run.log")
    err = (tmp_path / "run.log").read_text()
    assert stopped.returncode == 130, err
    assert "Traceback" not in err
    checkpoint = tmp_path / "reward.partial" / "checkpoint-2"
    assert err.rstrip().splitlines()[-1] == (f"rlhf-lm reward: interrupted. Resume from {checkpoint} by running the "
                                             "same command with --resume_from_checkpoint true.")
    with caplog.at_level(logging.INFO, logger="rlhf_lm.artifacts"):
        assert run_cli([*argv, "--resume_from_checkpoint", "true"]) == 0
    assert f"Resuming from {checkpoint}" in caplog.text
    assert (out / "adapter_model.safetensors").is_file() and not list(out.glob("checkpoint-*"))
    assert json.loads((out / METRICS_FILE).read_text())["log_history"][-1]["step"] == 4


# ----------------------------------------------------------------------------------------- train, then judge
def test_an_evaluation_failure_keeps_the_trained_adapter(tiny_task_dir, tmp_path, capsys):
    reward = tmp_path / "flaky_reward.py"
    reward.write_text("calls = [0]\n\n\ndef judge(prompt, completion):\n    calls[0] += 1\n"
                      "    if calls[0] > 2:  # the probe before training passes; the closing evaluation fails\n"
                      "        raise RuntimeError('judge crashed')\n    return 0.0\n")
    out = tmp_path / "dpo"
    assert run_cli(dpo_args(tiny_task_dir, out, "--reward_model", f"{reward}:judge")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"The DPO policy was trained and saved to {out}, but the closing evaluation failed: RuntimeError at " \
           "flaky_reward.py:7: judge crashed." in err
    assert f"rlhf-lm evaluate --policy_path {out} --output_dir {out}-eval" in err
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["metrics"]["train/steps"] == 2 and "judge crashed" in metrics["run"]["evaluation_error"]
    weights = load_file(out / "adapter_model.safetensors")
    assert any(("lora_B" in k) and bool(v.abs().sum() > 0) for k, v in weights.items())  # it trained


# -------------------------------------------------------------------------------------------------- secrets
def test_no_token_in_any_file_a_run_writes(tiny_task_dir, tmp_path, monkeypatch, capsys, caplog):
    """A full fine-tune with a hub_token (training_args.bin in every checkpoint and in the output), a crash that
    leaves checkpoints, the resume, and a pipeline whose recipe holds a token: grep every file and the logs."""
    from rlhf_lm.configs import parse_config
    from rlhf_lm.pipeline import plan_pipeline, run_pipeline
    from rlhf_lm.stages import dpo

    monkeypatch.delenv("HF_TOKEN", raising=False)  # the stage hands hub_token to huggingface_hub through HF_TOKEN
    out, partial = tmp_path / "full", tmp_path / "full.partial"
    argv = dpo_args(tiny_task_dir, out, "--learning_rate", "1e-4", "--save_strategy", "steps", "--save_steps", "1",
                    "--hub_token", FAKE_TOKEN, lora=False)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(KeyboardInterrupt):
            dpo.run(parse_config(dpo.DPOStageConfig, argv[1:]), callbacks=[CrashAfterSave(1)])
        assert (partial / "checkpoint-1" / "training_args.bin").is_file()
        written = {f"partial/{k}": v for k, v in snapshot(partial).items()}
        assert run_cli([*argv, "--resume_from_checkpoint", "true"]) == 0
        assert (out / "training_args.bin").is_file()
        written.update({f"out/{k}": v for k, v in snapshot(out).items()})

        monkeypatch.syspath_prepend(str(TESTS))  # tests/pipeline_stage.py: a stage with a `token` field
        run_pipeline(plan_pipeline({"output_dir": str(tmp_path / "pipe"), "stages": ["score"], "token": FAKE_TOKEN,
                                    "score": {"stage": "pipeline_stage",
                                              "model_name_or_path": str(tiny_task_dir / "base_policy"),
                                              "dataset_name": str(tiny_task_dir / "data" / "pairs_eval.jsonl")}}))
        written.update({f"pipe/{k}": v for k, v in snapshot(tmp_path / "pipe").items()})
    assert len(written) > 20 and any("training_args.bin" in name for name in written)
    assert [name for name, data in written.items() if FAKE_TOKEN.encode() in data] == []
    record = json.loads((tmp_path / "pipe" / "pipeline.json").read_text())
    assert record["stage_plan"][0]["values"]["token"] == "<redacted>"
    assert FAKE_TOKEN not in caplog.text and FAKE_TOKEN not in capsys.readouterr().err


class CrashAfterSave(TrainerCallback):
    """Stands in for a crash right after checkpoint ``step`` is written."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"stopped after checkpoint {self.step}")


# --------------------------------------------------------------------------------------- data and the Hub
def test_single_file_eval_split_with_eval_fraction_holds_out_part_of_the_file(caplog):
    from rlhf_lm.configs import DataArguments
    from rlhf_lm.data import load_preference_data

    args = DataArguments(dataset_name=str(CORPUS / "data" / "good.jsonl"), dataset_eval_split="test",
                         eval_fraction=0.25)
    with caplog.at_level(logging.WARNING, logger="rlhf_lm.data"):
        train, eval_ds, _ = load_preference_data(args)
    assert (len(train), len(eval_ds)) == (90, 30)
    assert not set(train["prompt"]) & set(eval_ds["prompt"])
    assert "dataset_eval_split 'test' ignored" in caplog.text and "eval_fraction=0.25" in caplog.text


def test_a_utf8_bom_is_not_a_mistake(tmp_path):
    from rlhf_lm.data import load_rows

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (CORPUS / "data" / "good.jsonl").read_bytes())
    assert len(load_rows(path).dataset) == 120


def test_push_to_an_unreachable_hub_is_one_line(tmp_path):
    """No network (a closed port as HF_ENDPOINT, offline mode off): one line saying the Hub is unreachable."""
    run = tmp_path / "run"
    _finished_output(run)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0", HF_TOKEN=FAKE_TOKEN, HF_HOME=str(tmp_path),
               PYTHONPATH=str(TESTS.parent))
    proc = subprocess.run([sys.executable, "-m", "rlhf_lm", "push", str(run), "--repo_id", "you/run"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"rlhf-lm push: error: Push to 'you/run' failed: the Hugging Face Hub at http://127.0.0.1:9 is unreachable "
        f"(ConnectError: [Errno 111] Connection refused). Nothing was uploaded; {run} is unchanged. Check the network "
        "(or HF_ENDPOINT / HF_HUB_OFFLINE) and push again."]


def test_an_unfinished_partial_dir_with_nothing_in_it_is_cleaned_up(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError), staged_output(out, stage="dpo"):
        raise RuntimeError("failed before writing anything")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), staged_output(out, stage="dpo") as staged:
        (staged / "checkpoint-1").mkdir()
        raise RuntimeError("failed after writing")
    assert (tmp_path / "run.partial" / "checkpoint-1").is_dir()  # kept for resuming
