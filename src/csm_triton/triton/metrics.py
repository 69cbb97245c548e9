"""Our models' custom metrics (served on the metrics port beside Triton's own).

Kept out of adapter.py (the one module that imports triton_python_backend_utils):
Metrics is handed Triton's MetricFamily class (adapter.Metrics does that), and the
bookkeeping on top (counters by label, running totals) wraps metric objects that only
have `increment`, so all of it is tested with stand-ins.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

__all__ = ["LabelledCounters", "Metrics", "RunningTotal"]


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


class Metrics:
    """Counters, gauges and histograms labelled with the model's name (and e.g. its
    device, so that the engines of several GPUs keep separate series)."""

    def __init__(self, metric_family, model_name: str, **labels: str):
        self._family = metric_family  # pb_utils.MetricFamily in a stub (adapter.Metrics)
        self._labels = {"model": model_name, **labels}
        self._families = []

    def _metric(self, name: str, description: str, kind, **options):
        family = self._family(name=name, description=description, kind=kind)
        self._families.append(family)
        return family.Metric(labels=self._labels, **options)

    def counter(self, name: str, description: str):
        return self._metric(name, description, self._family.COUNTER)

    def gauge(self, name: str, description: str):
        return self._metric(name, description, self._family.GAUGE)

    def histogram(self, name: str, description: str, buckets: Sequence[float]):
        """`observe(value)`; exported as name_bucket{le=...}, name_sum and name_count."""
        return self._metric(name, description, self._family.HISTOGRAM, buckets=list(buckets))

    def labelled_counters(self, name: str, description: str, label: str, values) -> LabelledCounters:
        """One family, a counter per value of `label` (e.g. reason), each exported from
        the start (at 0), so dashboards and alerts find every series."""
        family = self._family(name=name, description=description, kind=self._family.COUNTER)
        self._families.append(family)
        return LabelledCounters({value: family.Metric(labels={**self._labels, label: value}) for value in values})

    def running_total(self, name: str, description: str) -> RunningTotal:
        return RunningTotal(self.counter(name, description))
