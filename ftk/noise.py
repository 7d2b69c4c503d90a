"""Library output a user should not have to read, silenced narrowly: by logger, warning category and
origin, never globally (a warning from elsewhere, or a load report that shows a real problem, still shows).

Called once per process by the CLI before a recipe runs."""

from __future__ import annotations

import logging
import re
import warnings

LIBRARIES = r"(torch|transformers|peft|accelerate|datasets)(\.|$)"  # origins whose deprecations are not ours
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Heads a fine-tuning or evaluation run adds on purpose; transformers reports them as MISSING on every load.
NEW_HEAD = re.compile(r"^(score|classifier|cls|lm_head|qa_outputs|pooler)\.")


class LoadReportFilter(logging.Filter):
    """transformers' LOAD REPORT: dropped when it lists only the new task head as MISSING (expected: ftk says
    it adds the head); otherwise kept, minus its raw colour codes, which a log file shows as ^[[1m."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = [line.split("|") for line in message.splitlines() if line.count("|") >= 2]
        keyed = [(r[0].strip(), r[1].strip()) for r in rows if r[0].strip() not in ("Key", "") and "---" not in r[0]]
        if keyed and all(status == "MISSING" and NEW_HEAD.match(key) for key, status in keyed):
            return False
        record.msg, record.args = ANSI.sub("", message), None
        return True


_LOAD_REPORT = LoadReportFilter()


def quiet_libraries() -> None:
    """Idempotent: a process that runs several recipes (tests, a sweep) calls it before each."""
    # bitsandbytes' CPU backend tries an optional kernel package at import (peft imports bitsandbytes for any
    # adapter) and warns "No module named 'kernels'" when it is absent; the fallback it then uses is fine.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("transformers.modeling_utils").addFilter(_LOAD_REPORT)  # no-op when already there
    # Deprecations inside the libraries (transformers' is_gradient_checkpointing called by peft, torch.jit) are for
    # their maintainers, not for ftk's users; warnings from other origins still show.
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
    # peft switches fan_in_fan_out on by itself for GPT-2's Conv1D layers and says so on every LoRA run.
    warnings.filterwarnings("ignore", message=r"fan_in_fan_out is set to False but the target module is `Conv1D`",
                            category=UserWarning)
