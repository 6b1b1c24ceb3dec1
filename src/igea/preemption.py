"""Preemption: SIGTERM or SIGUSR1 (what SLURM and Kubernetes send before they stop a job) saves a complete
checkpoint at the end of the current optimizer step and stops the run, which then exits non-zero saying how
to resume. A run stopped early is never marked finished.

Every process of a multi-process run stops at the same step: the signals are gathered from all processes at
each step.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import TrainerCallback

from igea.errors import IgeaError

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(IgeaError):
    """The run was asked to stop by a signal; a checkpoint of its last step was saved."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # as a shell reports a process ended by that signal


class StopRequest:
    """The first stop signal received while it is installed (None until then)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            logger.warning("received %s: saving a checkpoint at the end of this step, then stopping",
                           signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Catch SIGTERM and SIGUSR1 for the duration of the block (from the main thread; elsewhere, a no-op)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        logger.debug("not in the main thread: stop signals are not caught")
        yield request
        return
    previous = {s: signal.signal(s, request.handle) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class CheckpointOnStop(TrainerCallback):
    """At each step end, if any process received a stop signal, ask the Trainer to save and stop."""

    def __init__(self, request: StopRequest, accelerator) -> None:
        self.request = request
        self.accelerator = accelerator

    def on_step_end(self, args, state, control, **kwargs):
        signum = self.request.signum or 0
        if self.accelerator.num_processes > 1:  # every process stops at the same step, naming the same signal
            signum = int(self.accelerator.gather(torch.tensor([signum], device=self.accelerator.device)).max())
        if signum:
            self.request.signum = signum
            control.should_save = True
            control.should_training_stop = True
        return control
