"""What the Metrics of adapter.py hand out beyond a bare Triton metric.

Kept out of adapter.py (the one module that imports triton_python_backend_utils)
because this bookkeeping needs no Triton: it wraps metric objects that only have
`increment`, so it is tested with stand-ins.
"""

from __future__ import annotations

import threading

__all__ = ["LabelledCounters", "RunningTotal"]


class LabelledCounters:
    """Metrics.labelled_counters' counters, by label value."""

    def __init__(self, counters: dict):
        self._counters = counters

    def count(self, values) -> None:
        """One more for each value (a value without a series is not counted)."""
        for value in values:
            if value in self._counters:
                self._counters[value].increment(1)


class RunningTotal:
    """A counter that follows a total kept elsewhere (e.g. the engine's prefix-cache
    hits): Triton counters only increment, so each update adds what is new. Updates
    come from Triton's threads and the engine's, hence the lock."""

    def __init__(self, counter):
        self._counter = counter
        self._counted = 0
        self._lock = threading.Lock()

    def update(self, total: int) -> None:
        with self._lock:
            if total > self._counted:
                self._counter.increment(total - self._counted)
                self._counted = total
