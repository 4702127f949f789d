"""Graceful stop on SIGTERM / SIGUSR1 / SIGINT: finish the current step, save collectively, exit 0.

Clusters warn before they take a job away: Kubernetes and SLURM send SIGTERM, SLURM's ``--signal`` sends SIGUSR1
ahead of the time limit; Ctrl-C in a terminal sends SIGINT to every process of the job at once (and a launcher
forwards it again). The handler only records the signal; after every step the ranks agree (one tiny
all-reduce, shared with the loss) whether any of them was signalled, so they all stop after the same step. A
second signal while the checkpoint is being written changes nothing: the save goes on, and a step is committed
whole or not at all. Nor does one that comes after it, while the process leaves: a rank that was asked to stop keeps
absorbing stop signals until it exits, so that a signal repeated then (a launcher forwarding each signal it gets, a
cluster repeating its warning) cannot turn a saved, clean stop into a rank killed by the signal.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

KEPT_AFTER_A_STOP = (signal.SIGTERM, signal.SIGUSR1)
"""The signals whose handler stays after a stop, while the process leaves (launchers and clusters repeat them).
SIGINT's previous handler comes back: a process that goes on after training (a notebook's kernel) can be
interrupted again."""


class StopRequest:
    """Records stop signals while installed (main thread only); ``requested`` says whether one arrived. Leaving the
    block restores the previous handlers, unless a stop was requested: then the process is on its way out, and its
    SIGTERM and SIGUSR1 handlers stay, recording (and logging) any further signal instead of letting its default
    action kill it. A SIGINT the process was started ignoring (a background job of a script) stays ignored."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        first, self.received = self.received is None, sig  # (set before logging: a signal may arrive within it)
        if first:
            ctrl_c = " (another Ctrl-C changes nothing; kill -9 stops at once, without the save)"
            log.warning(
                "%s received: finishing this step, saving a checkpoint, then exiting%s",
                sig.name,
                ctrl_c if sig == signal.SIGINT else "",
            )
        else:
            log.warning("%s received again: already stopping (a checkpoint commits whole or not at all)", sig.name)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in list(self._previous.items()):
            if self.requested and sig in KEPT_AFTER_A_STOP:
                continue
            signal.signal(sig, previous)  # type: ignore[arg-type]
            del self._previous[sig]


@dataclass
class JobClock:
    """Saves and stops by the clock: ``checkpoint.every_minutes`` (a save that many minutes after the last one) and
    ``train.stop_after_minutes`` (a stop that many minutes into the job), both counted from :meth:`start` (training's
    first step: the load is not counted). Only rank 0 answers yes: one clock decides, and the caller's all-reduce
    tells every rank (the trainer's per-step consensus, the HF callback's own)."""

    every_minutes: float | None = None
    stop_after_minutes: float | None = None
    read: Callable[[], float] = time.monotonic
    started_at: float | None = None
    saved_at: float | None = None

    def start(self) -> None:
        self.started_at = self.saved_at = self.read()

    def saved(self) -> None:
        self.saved_at = self.read()

    def save_due(self, rank: int) -> bool:
        return rank == 0 and _passed(self.read, self.saved_at, self.every_minutes)

    def out_of_time(self, rank: int) -> bool:
        return rank == 0 and _passed(self.read, self.started_at, self.stop_after_minutes)


def _passed(read: Callable[[], float], since: float | None, minutes: float | None) -> bool:
    """Whether ``minutes`` have passed since ``since`` (no limit or no start: no)."""
    if not minutes or since is None:
        return False
    return read() - since >= minutes * 60
