"""Memory of a block: CUDA allocator peak on GPU; on CPU, the peak RSS increase over the block's start, sampled
every few milliseconds in a thread (CPU allocations are not tracked by torch). The samples also give the mean and
99th percentile (on GPU, of the allocated bytes), as PEFT's method comparison reports them."""
from __future__ import annotations

import os
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: report the lifetime peak instead
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """``with PeakMemory(device) as pm: ...``; then ``pm.peak_bytes`` and ``pm.stats()``."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.samples: list[int] = []

    def _now(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else _rss()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start = self._peak = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = self._now()
            self.samples.append(now - self._start)
            self._peak = max(self._peak, now)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self.peak_bytes = max(self._peak, _rss()) - self._start

    def stats(self) -> dict[str, float]:
        """Mean, 99th percentile and maximum in MB over the block (the maximum is the true peak on GPU)."""
        xs = sorted(self.samples) or [0]
        return {"mean_mb": sum(xs) / len(xs) / 2**20, "p99_mb": xs[min(len(xs) - 1, int(0.99 * len(xs)))] / 2**20,
                "max_mb": self.peak_bytes / 2**20}
