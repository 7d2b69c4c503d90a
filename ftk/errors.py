"""User-facing errors: one line that names the problem and the fix, exit code 2.

Recipes raise `UsageError` for anything the user can correct (bad config, bad data, bad paths);
the CLI prints it as one line and exits 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, List

EXIT_USAGE = 2        # bad input: config, data, paths
EXIT_PREEMPTED = 75   # stopped by SIGTERM/SIGINT after saving a checkpoint (EX_TEMPFAIL: "try again")
EXIT_NUMERIC = 3      # non-finite loss and the run was configured to stop


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name when it has none), at most `limit` characters:
    what a one-line error quotes from a library's multi-line message."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    # torch's "Error(s) in loading state_dict for X:\n\tsize mismatch for ...": the second line says what
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        return lines[1].rstrip(".")[:limit]
    return (lines[0] if lines else type(exc).__name__)[:limit]


class UsageError(Exception):
    """Something the user passed is wrong; the message says what and how to fix it."""

    exit_code = EXIT_USAGE


class NumericError(Exception):
    """Training produced a non-finite loss; the message names the step and a hint."""

    exit_code = EXIT_NUMERIC


class Preempted(Exception):
    """The run was asked to stop (SIGTERM/SIGINT) and saved a checkpoint first."""

    exit_code = EXIT_PREEMPTED


# Errors raised inside a Hydra job, kept for the CLI to report. Catching them inside the job (rather
# than letting Hydra re-raise them) keeps Hydra from printing its own extra lines, and lets the
# other jobs of a multirun sweep go on.
FAILURES: List[BaseException] = []


def reported(task: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap a recipe's Hydra task so user errors are recorded for the CLI instead of raised."""
    from omegaconf.errors import OmegaConfBaseException

    @functools.wraps(task)
    def wrapper(cfg: Any) -> Any:
        try:
            return task(cfg)
        except (UsageError, NumericError, Preempted, OmegaConfBaseException) as exc:
            FAILURES.append(exc)
            return None

    return wrapper
