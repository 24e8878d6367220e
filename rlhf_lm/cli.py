"""``rlhf-lm`` / ``python -m rlhf_lm``: one subcommand per stage, plus pipeline, quickstart and push.

Works the same under ``accelerate launch -m rlhf_lm <command> ...``. Mistakes we can detect (``RlhfError``) print
one clear line and exit 2, and so do the machine's refusals a user can fix (permission denied, read-only or full
disk). Ctrl-C prints one line naming the checkpoint to resume from and exits 130. Anything else keeps its traceback
because it is a bug.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys

from rlhf_lm.errors import RlhfError, suggest
from rlhf_lm.launch import check_current_launch, cpu_ranks_join_one_group, leave_process_group
from rlhf_lm.stages import STAGES

# OSErrors that are the machine saying no to the user's paths, not bugs.
USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG}

# command -> (module with main(argv), one-line help); the stages' commands come from their table
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("rlhf_lm.quickstart", "The whole pipeline on the built-in task, offline on CPU, in minutes."),
    **{name: (stage.module, stage.help) for name, stage in STAGES.items()},
    "pipeline": ("rlhf_lm.pipeline", "Run the stages of a pipeline recipe in order, each using the last's output."),
    "push": ("rlhf_lm.hub", "Push a run's adapters, reward model and a model card to the Hugging Face Hub."),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rlhf-lm <command> [--config recipe.yaml] [--key value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`rlhf-lm <command> --help` lists every config key of that command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"rlhf-lm: unknown command '{command}'.{suggest(command, COMMANDS)}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    _setup_logging()
    try:
        if command not in ("push",):  # everything that trains or samples runs in the launched process group
            cpu_ranks_join_one_group()
            check_current_launch()
        module = importlib.import_module(COMMANDS[command][0])
        code = module.main(rest)
        leave_process_group()
    except RlhfError as e:
        _fail(command, str(e))
    except OSError as e:
        if e.errno not in USER_OS_ERRORS:
            raise
        where = f": {e.filename}" if e.filename else ""
        _fail(command, f"{e.strerror}{where}. Check the path and its permissions (or free disk space).")
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"rlhf-lm {command}: interrupted. {_resume_hint(command)}", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def _setup_logging() -> None:
    from rlhf_lm.redaction import ScrubSecrets

    logging.basicConfig(level=os.environ.get("RLHF_LM_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ScrubSecrets) for f in handler.filters):
            handler.addFilter(ScrubSecrets())


def _fail(command: str, message: str) -> None:
    """One line on stderr (a message with line breaks from a library is joined), exit code 2."""
    from rlhf_lm.redaction import scrub_text

    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    _close_progress_bars()
    print(f"rlhf-lm {command}: error: {scrub_text(line)}", file=sys.stderr)
    sys.exit(2)


def _close_progress_bars() -> None:
    """Finish the progress bars a failing run left open, so our line starts on a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def _resume_hint(command: str) -> str:
    from rlhf_lm.artifacts import interrupted_run

    run = interrupted_run()
    if run is None:
        return "Nothing was written; run the command again to start."
    partial, checkpoint = run
    if checkpoint is None:
        return (f"No checkpoint was written yet ({partial} holds the work in progress); run the command again to "
                "start over.")
    flag = "--resume_from_checkpoint true"
    if command in ("pipeline", "quickstart"):  # a pipeline stage's output dir is named after the stage
        flag = f"--{partial.name.removesuffix('.partial')}.resume_from_checkpoint true"
    return f"Resume from {checkpoint} by running the same command with {flag}."
