"""The machine's side: the memory budget per device (GPU memory, or a share of the RAM on a CPU).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

from ftk.planner.setup import Setup
from ftk.planner.shapes import GB, gb


CPU_BUDGET_SHARE = 0.8                     # hardware.memory_budget_gb unset on a CPU: 80% of the RAM


def ram_bytes() -> Optional[int]:
    """Physical memory, or the cgroup's limit when that is lower (containers)."""
    total = None
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and (total is None or int(text) < total):
            total = int(text)
    return total


def detect_budget(hw: Any, device: str) -> Tuple[Optional[int], str]:
    """(bytes per device, where the figure comes from): hardware.memory_budget_gb, else the GPU's memory,
    else 80% of the RAM on a CPU; None when it cannot be known here (a CUDA profile on a machine without one)."""
    if hw.memory_budget_gb is not None:
        return int(hw.memory_budget_gb * GB), "hardware.memory_budget_gb"
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            smallest = min(torch.cuda.get_device_properties(d).total_memory for d in range(torch.cuda.device_count()))
            return int(smallest), f"{torch.cuda.get_device_name(0)}: {gb(smallest)}"
        return None, "no CUDA device visible to detect it"
    ram = ram_bytes()
    if ram is None:
        return None, "RAM size unknown"
    return int(CPU_BUDGET_SHARE * ram), f"{CPU_BUDGET_SHARE:.0%} of {gb(ram)} RAM"


def budget_for(hw: Any, setup: Setup) -> Tuple[Optional[int], str]:
    """detect_budget for a planned run: processes on one CPU share its RAM, so a detected CPU budget is split."""
    budget, source = detect_budget(hw, setup.device)
    if budget is not None and setup.device == "cpu" and setup.devices > 1 and hw.memory_budget_gb is None:
        budget, source = budget // setup.devices, f"{source}, shared by {setup.devices} processes"
    return budget, source
