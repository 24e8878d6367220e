"""Run an ``rlhf-lm`` command in this process and stop it with a real signal at a chosen moment (SIGKILL: no Python
cleanup runs, as with ``kill -9``; SIGINT: Ctrl-C). Used by tests/test_reliability.py.

    python tests/interrupt_run.py KILL|INT POINT -- dpo --output_dir ... [flags]

POINT is where the signal is sent:

* ``Trainer.<method>@<step>``: right after transformers' ``Trainer.<method>`` returns while the trainer is at global
  step ``step``. Inside a checkpoint save: ``save_model`` (weights written, optimizer not),
  ``_save_optimizer_and_scheduler`` (no RNG or trainer state yet), ``_save_rng_state``, ``_save_checkpoint``
  (everything written, not yet renamed into place); between saves: ``training_step``.
* ``<module>:<function>``: when that function is entered, e.g. ``rlhf_lm.stages.dpo:evaluate_against_reference``
  (training done and saved, the closing evaluation starting) or ``rlhf_lm.artifacts:_finish`` (about to move the
  finished output into place).
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys

import transformers

from rlhf_lm.cli import main


def signal_at(point: str, signum: int) -> None:
    if point.startswith("Trainer."):
        method, step = point.removeprefix("Trainer.").split("@")
        original = getattr(transformers.Trainer, method)

        @functools.wraps(original)
        def after(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            if self.state.global_step == int(step):
                os.kill(os.getpid(), signum)
            return result

        setattr(transformers.Trainer, method, after)
        return
    module_name, name = point.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, name)

    @functools.wraps(original)
    def before(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    setattr(module, name, before)


if __name__ == "__main__":
    kind, point, separator, *argv = sys.argv[1:]
    assert separator == "--", "usage: interrupt_run.py KILL|INT POINT -- <rlhf-lm arguments>"
    # A process started with SIGINT ignored (inherited from a parent that ignores it: a background job, or something
    # in the test process) gets no KeyboardInterrupt handler from Python, and Ctrl-C does nothing. Ctrl-C is what is
    # tested here, so install Python's own (seen: the full suite once ran this test with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal_at(point, signal.SIGKILL if kind == "KILL" else signal.SIGINT)
    main(argv)
