"""Never a silent fallback: stop before training when the processes that started are not what the launch asked for.

Two launches that look distributed and are not, both verified with accelerate 1.15 on CPU:

* ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate's simple launcher), and nothing in
  its environment says two were asked for; only the launcher's own command line does.
* a config with ``distributed_type: FSDP`` and ``use_cpu: true`` starts two processes that each report
  ``DistributedType.NO`` and ``num_processes 1``: two independent, unsharded runs (torchrun set ``WORLD_SIZE=2``);
  once the ranks are told they run on CPU (:func:`cpu_ranks_join_one_group`, as the CLI does) they form one gloo
  group, and accelerate drops the FSDP request: plain DDP, unsharded.

Either way the user would pay for N processes' worth of setup and get one unsharded run per process, each writing
the same output directory. :func:`check_launch` turns both into one clear error that names what to change - except
FSDP2 (``fsdp_version: 2``) on CPU ranks, which the stages make real themselves (:mod:`rlhf_lm.fsdp`).
"""

from __future__ import annotations

import os
from pathlib import Path

from rlhf_lm.errors import ConfigError
from rlhf_lm.fsdp import requested_fsdp_version

FIX = ("For several CPU processes use --config_file accelerate_configs/multi_cpu.yaml (DDP, one gloo group) or "
       "accelerate_configs/fsdp_cpu.yaml (FSDP2); DeepSpeed needs GPUs.")


def launcher_num_processes(ppid: int | None = None) -> int | None:
    """``--num_processes N`` from the command line of the process that started this one (Linux /proc), if any."""
    cmdline = Path(f"/proc/{ppid or os.getppid()}/cmdline")
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in args if a]
    if not any(a == "launch" or a.endswith("commands.launch") for a in args):  # `accelerate launch` or `-m ...launch`
        return None
    for i, arg in enumerate(args):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(args) and args[i + 1].isdigit():
                return int(args[i + 1])
            if arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
                return int(value) if value.isdigit() else None
    return None


def check_launch(num_processes: int, distributed_type: str, environ: dict[str, str] | None = None,
                 requested: int | None = None) -> None:
    """Raise a ConfigError when the process group differs from the launch: ``num_processes`` and
    ``distributed_type`` as accelerate's state reports them, ``environ`` the process environment (default
    ``os.environ``), ``requested`` the launcher's ``--num_processes`` (default: read from the parent process)."""
    environ = dict(os.environ if environ is None else environ)
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    if world > num_processes:
        raise ConfigError(f"{world} processes were started (WORLD_SIZE={world}) but each runs alone "
                          f"(num_processes {num_processes}, {distributed_type}): they would train {world} separate "
                          f"copies. {FIX}")
    if environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and "FSDP" not in distributed_type:
        if "MULTI_CPU" in distributed_type and requested_fsdp_version(environ) == 2:
            pass  # CPU ranks of one gloo group: the stages turn FSDP2 on themselves (rlhf_lm.fsdp)
        elif "MULTI_CPU" in distributed_type:
            raise ConfigError(f"The launch asked for FSDP version {requested_fsdp_version(environ)} on CPU, which "
                              "rlhf-lm cannot shard there (accelerate would run it as unsharded DDP). Set "
                              "fsdp_config.fsdp_version: 2 in the accelerate config (accelerate_configs/fsdp_cpu.yaml "
                              "has it).")
        else:
            raise ConfigError(f"The launch asked for FSDP but the processes run as {distributed_type}, unsharded. "
                              f"{FIX}")
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and "DEEPSPEED" not in distributed_type:
        raise ConfigError(f"The launch asked for DeepSpeed but the processes run as {distributed_type}. {FIX}")
    requested = launcher_num_processes() if requested is None else requested
    if requested and requested > num_processes and world == 1:
        raise ConfigError(f"accelerate launch was asked for {requested} processes but started {num_processes} "
                          f"(--cpu starts one). {FIX}")


def cpu_ranks_join_one_group() -> None:
    """Under torchrun on a machine without CUDA, make the ranks one gloo process group.

    Accelerate's multi-process launcher does not tell the ranks they run on CPU, and a Trainer without
    ``use_cpu`` then silently runs N independent single-process copies. ACCELERATE_USE_CPU is what both
    transformers' TrainingArguments and Accelerator read to pick the MULTI_CPU (gloo) setup instead.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "ACCELERATE_USE_CPU" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["ACCELERATE_USE_CPU"] = "true"


def check_current_launch() -> None:
    """:func:`check_launch` for this process, from accelerate's state.

    The state is a process-wide singleton that the first caller configures, so it is built here exactly as the
    stages' TrainingArguments build it (``cpu`` from ACCELERATE_USE_CPU); a bare ``PartialState()`` would fix CPU
    ranks as separate single-process runs for the whole process.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    requested = launcher_num_processes()
    engines = any(os.environ.get(k, "").lower() == "true" for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 and (requested or 1) <= 1 and not engines:
        return  # a plain single-process run: leave the state for the trainer to set up (e.g. use_cpu on a GPU host)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_launch(state.num_processes, str(state.distributed_type), requested=requested or 0)


def leave_process_group() -> None:
    """Retire this process's collectives and destroy its process group before the interpreter shuts down.

    A gloo worker thread drops its reference to a finished collective just after the caller has been woken up. When
    that is the last reference and the collective held Python tensors (an all-gather's outputs), the thread needs the
    GIL to free them; if the main thread has meanwhile begun interpreter shutdown, Python ends the thread inside a
    C++ destructor and the process aborts ("terminate called without an active exception", exit -6) after a run
    that succeeded (seen in about 1 of 8 two-process test runs on a loaded 2-core machine; the core dump shows
    ``AsyncAllgatherWork::~AsyncAllgatherWork`` in ``ProcessGroupGloo::runLoop``). A last barrier gives the workers
    work that holds no Python objects, and destroying the group joins its threads where nothing else holds it (a
    DDP-wrapped model keeps it alive from C++, so its idle threads may remain; idle threads are harmless).
    """
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # trainers left unreachable by the finished run release the group
        dist.barrier()
        dist.destroy_process_group()
