"""Our models' custom metrics without Triton: metrics.Metrics over a stand-in for
pb_utils.MetricFamily (the integration tests read the real series off the metrics port)."""

from __future__ import annotations

from csm_triton.triton.metrics import Metrics


class FakeFamily:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    made: list = []

    def __init__(self, name, description, kind):
        self.name, self.kind, self.metrics = name, kind, []
        FakeFamily.made.append(self)

    def Metric(self, labels, **options):
        metric = FakeMetric(labels, options)
        self.metrics.append(metric)
        return metric


class FakeMetric:
    def __init__(self, labels, options):
        self.labels, self.options, self.value = labels, options, 0

    def increment(self, by):
        self.value += by


def test_every_metric_carries_the_model_and_extra_labels_and_its_kind():
    FakeFamily.made.clear()
    metrics = Metrics(FakeFamily, "csm_lm", device="cuda:0")
    metrics.gauge("csm_kv_slots_in_use", "slots")
    metrics.histogram("csm_ttfa_seconds", "first audio", buckets=(0.1, 0.5))
    assert [(f.name, f.kind) for f in FakeFamily.made] == [
        ("csm_kv_slots_in_use", "gauge"),
        ("csm_ttfa_seconds", "histogram"),
    ]
    histogram = FakeFamily.made[1].metrics[0]
    assert histogram.labels == {"model": "csm_lm", "device": "cuda:0"} and histogram.options == {"buckets": [0.1, 0.5]}


def test_labelled_counters_export_every_value_from_the_start_and_count_only_their_own():
    FakeFamily.made.clear()
    counters = Metrics(FakeFamily, "csm_generate").labelled_counters(
        "csm_segments_total", "segments", "reason", ("end_of_speech", "max_frames")
    )
    (family,) = FakeFamily.made
    assert [m.labels["reason"] for m in family.metrics] == ["end_of_speech", "max_frames"]  # both series exist at 0
    counters.count(["max_frames", "max_frames", "end_of_speech"])
    assert {m.labels["reason"]: m.value for m in family.metrics} == {"end_of_speech": 1, "max_frames": 2}


def test_a_running_total_adds_only_what_grew():
    FakeFamily.made.clear()
    total = Metrics(FakeFamily, "csm_lm").running_total("csm_frames_total", "frames")
    for seen in (5, 5, 3, 9):  # a total read twice, or read back lower, adds nothing
        total.update(seen)
    assert FakeFamily.made[0].metrics[0].value == 9
