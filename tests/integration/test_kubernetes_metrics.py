"""The autoscaler's metrics are the server's: the prometheus-adapter rules the Helm chart
ships name only metrics (and models) a scrape of the test server has, as the Grafana
dashboard's are checked in test_monitoring.py (whose scrape this reuses), and the
slot-demand expression the HPA scales on evaluates on that scrape."""

from __future__ import annotations

import pytest

from tests.deploy.test_kubernetes import adapter_metric_names, adapter_models, adapter_rules, kserve, render

from .test_monitoring import exported, samples

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def chart_objects() -> list[dict]:
    return render({"autoscaling": {"enabled": True, "queueTime": {"enabled": True}}})


def test_every_metric_the_adapter_rules_name_is_exported(chart_objects, exported):
    names = adapter_metric_names(chart_objects)
    assert names, "the adapter rules name no metric"
    missing = sorted(name for name in names if name not in exported)
    assert not missing, f"adapter rules name metrics the server does not export: {missing}"


def test_the_models_the_rules_select_carry_those_metrics(chart_objects, exported):
    for model in adapter_models(chart_objects):
        for name in ("nv_inference_queue_duration_us", "nv_inference_request_success"):
            assert any(labels.get("model") == model for labels in exported[name]), (name, model)


def test_the_hpa_metric_is_a_rule_over_exported_series(chart_objects, exported):
    rules = {rule["name"]["as"]: rule for rule in adapter_rules(chart_objects)}
    (hpa,) = [o for o in chart_objects if o["kind"] == "HorizontalPodAutoscaler"]
    for metric in [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] + [
        m["pods"]["metric"]["name"] for m in kserve("hpa.yaml")["spec"]["metrics"]
    ]:
        series = rules[metric]["seriesQuery"].split("{")[0].strip("'")
        assert series in exported, (metric, series)


def test_slot_demand_evaluates_on_the_scrape(triton_server, exported):
    # The rule's expression, summed over the pod's series: (in use + waiting) / total.
    values = {"csm_kv_slots_in_use": 0.0, "csm_requests_waiting": 0.0, "csm_kv_slots_total": 0.0}
    for name, _labels, value in samples(triton_server):
        if name in values:
            values[name] += value
    assert values["csm_kv_slots_total"] > 0
    demand = (values["csm_kv_slots_in_use"] + values["csm_requests_waiting"]) / values["csm_kv_slots_total"]
    assert 0.0 <= demand <= 1.0  # idle after the fixture's request: nothing waits
