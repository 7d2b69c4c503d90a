"""Preemption: SIGTERM/SIGINT ask the loop to stop after the current step and checkpoint.

A second SIGINT exits at once (the default action), for a user at a terminal who really means it; the atomic
checkpoint writer guarantees that even then the previous checkpoint stays intact. A second SIGTERM does not:
schedulers and launchers deliver it more than once by design (SLURM signals every process of a job step and
torchrun forwards the SIGTERM it received to its workers, so each worker gets two within milliseconds), and
exiting on it would throw away the checkpoint the first one asked for. What ends a run that ignores SIGTERM
is the launcher's SIGKILL (torchrun --shutdown_timeout, SLURM's KillWait).
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Optional


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self.repeats = 0  # further signals received after the first
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.requested:
            self.repeats += 1
            if signum == signal.SIGINT:  # second Ctrl-C: restore the default action and deliver it again
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some launchers): no handler
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
