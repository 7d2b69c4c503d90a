"""One run per run directory, and nothing in it changed by a command that is refused.

* Lock: `<run>/.lock` is held with fcntl.flock for the whole command. The OS releases it when the process ends,
  however it ends (SIGKILL included), so a stale lock never blocks a resume. A second command on the same
  directory stops with one line naming the process that holds it, before touching anything.
* Config: Hydra writes the composed config before any recipe code runs. The CLI points it at
  `<run>/.hydra-pending-<pid>/` (see PENDING_PREFIX in ftk.cli.hydra_errors); the recipe moves it to
  `<run>/.hydra/` only once every check has passed (`adopt_config`). A refused or locked-out command removes
  its pending copy, so the run's own `.hydra/config.yaml` keeps describing the run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

from ftk.errors import UsageError

LOCK_NAME = ".lock"
PENDING_PREFIX = ".hydra-pending-"


def pending_name(pid: Optional[int] = None) -> str:
    return f"{PENDING_PREFIX}{os.getpid() if pid is None else pid}"


def _main_rank() -> bool:
    """Under torchrun/accelerate every rank runs the recipe in the same directory: rank 0 holds it."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def held(run_dir: Path) -> Iterator[None]:
    """Hold run_dir for this command; refuse (one line) when another live process holds it."""
    handle = None
    try:
        if _main_rank():
            run_dir.mkdir(parents=True, exist_ok=True)
            handle = open(run_dir / LOCK_NAME, "a+")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                handle = None
                raise UsageError(f"{run_dir} is in use by process {holder} (a run is going on there); wait for it "
                                 "to end, or pick another hydra.run.dir") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        yield
    finally:
        _drop_pending(run_dir)  # not adopted: the command was refused or failed before its checks passed
        if handle is not None:
            handle.close()  # closing the descriptor releases the flock


def _drop_pending(run_dir: Path) -> None:
    shutil.rmtree(run_dir / pending_name(), ignore_errors=True)


def adopt_config(run_dir: Path) -> None:
    """Every check passed: the composed config this command runs with becomes the run's .hydra/."""
    pending = run_dir / pending_name()
    if not pending.is_dir():
        return  # Hydra wrote .hydra/ itself (hydra.output_subdir given by the user), or wrote nothing
    if not _main_rank():
        _drop_pending(run_dir)
        return
    target = run_dir / ".hydra"
    old = run_dir / f".hydra-old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(pending, target)
    shutil.rmtree(old, ignore_errors=True)
    for stale in run_dir.glob(PENDING_PREFIX + "*"):  # left by processes killed before their checks ended
        pid = stale.name[len(PENDING_PREFIX):]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
