"""One start time for all processes of a launch, so `${ftk_now:...}` names one run folder for every rank.

Hydra's `${now:...}` reads each process's own clock. Under torchrun the ranks start a few milliseconds
apart, and when they straddle a second each rank gets its own timestamped run folder: the other ranks then
read best/ and checkpoints from a folder rank 0 never wrote (early stopping restores nothing), and their
files scatter. Rank 0 publishes its time in the store torchrun's agent already hosts for the job (the one
the process group connects to), and the other ranks read it. Outside torchrun it is the local clock.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Optional

_AGREED: Optional[datetime] = None
KEY = "ftk/launch_time"


def _launched_by_torchrun() -> bool:
    return (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(os.environ.get("WORLD_SIZE", "1")) > 1
            and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ)


def _agreed_time() -> datetime:
    from torch.distributed import TCPStore

    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     timeout=timedelta(minutes=10))
    # A restarted worker group (torchrun --max-restarts) agrees afresh, never on the previous attempt's time.
    key = f"{KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if int(os.environ.get("RANK", "0")) == 0:
        store.set(key, datetime.now().isoformat())
    return datetime.fromisoformat(store.get(key).decode())


def started() -> datetime:
    """When this launch started: rank 0's clock under torchrun (agreed once per process), else now (a
    process running several commands, e.g. tests or a sweep, gets one folder per command)."""
    global _AGREED
    if not _launched_by_torchrun():
        return datetime.now()
    if _AGREED is None:
        _AGREED = _agreed_time()
    return _AGREED


def now(pattern: str) -> str:
    """`${ftk_now:%Y-%m-%d_%H-%M-%S}` in configs/*.yaml: the launch's start time, formatted."""
    return started().strftime(pattern)
