"""Peak memory of one job, measured while it runs (a sweep runs several jobs in one process).

On CUDA: torch's peak allocated bytes since the job started (what the memory planner estimates), and the peak
reserved by its caching allocator (`reserved`: what nvidia-smi shows and what an out-of-memory error is about,
allocated plus cached free blocks and fragmentation). On CPU: the peak resident set size
sampled every 20 ms by a background thread, minus the size at the start, so a job is not charged for
the memory earlier jobs of the same process left behind. ru_maxrss cannot do that: it never falls.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the (monotonic) high-water mark
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    def __init__(self, device: str = "cpu", interval: float = 0.02):
        self.device, self.interval = device, interval
        self.start = self.peak = 0
        self.reserved: Optional[int] = None  # CUDA only
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "PeakMemory":
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            # Counted from zero: QLoRA's 4-bit base is loaded straight to the GPU before this starts, the other
            # regimes' weights move there inside it (accelerate's prepare); both are the job's memory. (An
            # earlier job of the same sweep has been collected by ftk.hardware.configure_cuda.)
            self.start = 0
        else:
            self.start = self.peak = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            import torch

            self.peak = torch.cuda.max_memory_allocated()
            self.reserved = torch.cuda.max_memory_reserved()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    @property
    def added(self) -> int:
        """Bytes above the level at the start of the job."""
        return max(0, self.peak - self.start)
