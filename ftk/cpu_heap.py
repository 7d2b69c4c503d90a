"""CPU heap policy at run time (not planning): glibc's mallopt.

On a CPU, glibc keeps freed heap memory for reuse, and with its default dynamic mmap threshold a
training process's resident size peaks 1.2-1.8x above its live tensors. `release_freed_cpu_memory()`
(mallopt M_MMAP_THRESHOLD = 1 MiB) makes large tensors go back to the OS when freed; the planner's figures
are for that mode. It costs time: every large tensor is then fresh pages from the kernel, zeroed and
faulted in page by page. `set_cpu_allocator` therefore keeps freed memory for reuse (fast) whenever the
planned peak fits the budget with room for glibc's overhead, and returns it (tight) only when it does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Tuple

if TYPE_CHECKING:
    from ftk.planner.costs import Estimate


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
# The resident size a process that keeps freed memory reaches, over its live tensors (measured 1.2-1.8x).
REUSE_OVERHEAD = 1.8


def _mallopt(*settings: Tuple[int, int]) -> bool:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return all(bool(libc.mallopt(param, int(value))) for param, value in settings)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False


def release_freed_cpu_memory(threshold: int = 1 << 20) -> bool:
    """Make glibc return freed tensors of `threshold` bytes or more to the OS (mallopt M_MMAP_THRESHOLD, which
    also stops glibc from raising the threshold as it goes). Without it a CPU training process's resident
    size peaks 1.2-1.8x above its live tensors (freed activations stay in the heap); with it, within a few
    percent - but every large tensor is then fresh zeroed pages: a training step of the 14M GPT-2 of
    scripts/bench_throughput.py took 1.7x as long (1.30 s against 0.76 s with reuse_freed_cpu_memory, 866 MiB
    against 1,020 MiB resident). Returns whether it took effect (glibc only)."""
    return _mallopt((_M_MMAP_THRESHOLD, threshold))


def reuse_freed_cpu_memory() -> bool:
    """Keep freed memory in the heap for the next step's tensors: glibc's largest mmap threshold (32 MiB, so
    only larger tensors are mapped and unmapped each time), no trimming of the heap's top below 2 GiB and
    64 MiB of padding per heap extension. Faster than glibc's defaults too (0.76 s against 0.91 s a step
    above), whose dynamic threshold starts at 128 KiB and trims the heap's top as it shrinks."""
    return _mallopt((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, (1 << 31) - 1), (_M_TOP_PAD, 64 << 20))


def set_cpu_allocator(result: Optional["Estimate"], say: Callable[[str], None]) -> str:
    """Reuse freed memory (fast) unless the planned peak, with glibc's reuse overhead, exceeds the budget;
    then return it to the OS (the planner's figures hold, steps are slower). Returns "reuse" or "release"."""
    tight = result is not None and result.budget is not None and result.total * REUSE_OVERHEAD > result.budget
    if tight:
        release_freed_cpu_memory()
        say(f"memory: the planned peak x{REUSE_OVERHEAD} (the heap's overhead when freed memory is kept for "
            "reuse) exceeds the budget, so freed tensors go back to the OS: slower steps, resident size close "
            "to the plan")
        return "release"
    trim_cpu_heap()  # start from what is live now: a sweep's previous job must not lend this one its memory
    reuse_freed_cpu_memory()
    return "reuse"


def trim_cpu_heap() -> bool:
    """Give the heap's free memory back to the OS now (glibc malloc_trim)."""
    import ctypes
    import ctypes.util

    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
