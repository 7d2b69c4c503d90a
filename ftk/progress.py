"""What a user watches during training: a rich live bar on a terminal, plain lines in a batch log.

Only the main process displays anything; other ranks get a silent instance.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainingProgress:
    def __init__(self, total_steps: int, first_step: int, enabled: bool = True, console: Optional[Console] = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.total = total_steps
        self.live = enabled and self.console.is_terminal
        self._progress: Optional[Progress] = None
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} tok/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
                refresh_per_second=4)
            self._task = self._progress.add_task("train", total=total_steps, completed=first_step,
                                                 loss="-", lr="-", speed="-")
            self._progress.start()

    def update(self, step: int, loss: Optional[float], lr: float, tokens_per_s: float, eta_s: float) -> None:
        if not self.enabled:
            return
        loss_text = f"{loss:.4f}" if loss is not None else "-"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=loss_text, lr=f"{lr:.2e}",
                                  speed=f"{tokens_per_s:,.0f}")
        else:  # batch jobs: one parseable line per logging step
            print(f"step {step}/{self.total}  loss {loss_text}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  "
                  f"ETA {time.strftime('%H:%M:%S', time.gmtime(max(0.0, eta_s)))}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
