"""Rolling statistics and the anomaly handler (processors/anomaly.py), without services."""

from __future__ import annotations

import json
import random
import statistics
import uuid
from datetime import UTC, datetime

import pytest

from labbus.events.codec import default_codec
from labbus.events.model import AnomalyDetected, MeasurementValidated, derived_id
from labbus.events.runtime import Record
from labbus.processors import anomaly


def test_the_young_window_is_the_plain_running_mean_and_variance():
    xs = [3.0, 5.0, 4.0, 8.0, 1.0, 6.0]
    s = None
    for x in xs:
        s = anomaly.update(s, x, alpha=0.05)  # 1/n > alpha for the first 20
    assert s[0] == len(xs)
    assert s[1] == pytest.approx(statistics.fmean(xs))
    assert s[2] == pytest.approx(statistics.pvariance(xs))


def test_the_window_then_follows_the_series_exponentially():
    s = None
    for _ in range(100):
        s = anomaly.update(s, 10.0, alpha=0.1)
    for _ in range(60):  # a level shift: absorbed after a few 1/alpha
        s = anomaly.update(s, 20.0, alpha=0.1)
    assert s[1] == pytest.approx(20.0, abs=0.05)


def test_a_spike_is_flagged_after_the_warm_up_and_normal_readings_are_not():
    rng = random.Random(1)
    s, flagged = None, []
    for i in range(200):
        x = rng.gauss(37.0, 0.2)
        s, z = anomaly.observe(s, x, 0.05, 20, 4.0)
        if z is not None:
            flagged.append(i)
    assert flagged == []
    s2, z = anomaly.observe(s, 45.0, 0.05, 20, 4.0)
    assert z is not None and z > 4.0
    assert z == pytest.approx(abs(45.0 - s[1]) / anomaly.stddev(s))
    # the spike entered clipped: the next spike is flagged too, and the mean barely moved
    assert abs(s2[1] - s[1]) < 0.1
    _, z2 = anomaly.observe(s2, 45.0, 0.05, 20, 4.0)
    assert z2 is not None and z2 > 4.0


def test_nothing_is_judged_during_the_warm_up():
    s = None
    for x in [1.0, 1.0, 1.0, 100.0]:  # the 4th would be far out, but the window holds 3 < 5
        s, z = anomaly.observe(s, x, 0.05, 5, 4.0)
        assert z is None


def test_a_constant_series_gives_a_finite_score():
    s = None
    for _ in range(30):
        s, _ = anomaly.observe(s, 5.0, 0.05, 20, 4.0)
    _, z = anomaly.observe(s, 5.001, 0.05, 20, 4.0)
    assert z is not None and z < float("inf")


def _validated(value: float, i: int, quality: str | None = "good", metric: str = "temperature"):
    return MeasurementValidated.create(
        source="validator", subject="dev-1", sequence=i, measurement_id=uuid.uuid4(),
        device_id="dev-1", metric=metric, value=value, unit="degC",
        measured_at=datetime.now(UTC), quality=quality)


def _run(events, state=None, start=0, **opts):
    alerts = []
    for i, e in enumerate(events):
        before = json.dumps(state)
        given = state
        state, out = anomaly.handle(state, e, Record("t", 0, start + i, b"dev-1", b""), None,
                                    **opts)
        assert json.dumps(given) == before  # the given value is not modified
        assert json.loads(json.dumps(state)) == state  # JSON-able
        alerts += out
    return state, alerts


def test_handler_flags_a_spike_with_a_deterministic_alert_and_keeps_metrics_apart():
    rng = random.Random(2)
    normal = [_validated(rng.gauss(21.0, 0.1), i) for i in range(40)]
    ph = [_validated(rng.gauss(7.0, 0.01), 100 + i, metric="ph") for i in range(40)]
    state, alerts = _run([e for pair in zip(normal, ph, strict=True) for e in pair])
    assert alerts == [] and set(state["metrics"]) == {"temperature", "ph"}
    spike = _validated(30.0, 999)
    state2, alerts = _run([spike], state, start=80)
    (alert,) = alerts
    assert isinstance(alert, AnomalyDetected)
    assert str(alert.event_id) == derived_id(spike.measurement_id, "anomaly")
    assert alert.measurement_id == spike.measurement_id and alert.rule == "zscore"
    assert alert.score > alert.threshold == 4.0 and alert.window_count == 40
    assert alert.window_mean == pytest.approx(21.0, abs=0.1)
    assert state2["metrics"]["ph"] == state["metrics"]["ph"]
    default_codec().decode(default_codec().encode(alert))  # fits its schema
    # handled again (a redelivery at the same offset): nothing new
    again, out = anomaly.handle(state2, spike, Record("t", 0, 80, b"dev-1", b""), None)
    assert again is state2 and out == []


def test_bad_readings_are_neither_judged_nor_counted():
    state, _ = _run([_validated(21.0 + 0.1 * (i % 3), i) for i in range(30)])
    state2, alerts = _run([_validated(1e4, 50, quality="bad")], state, start=30)
    assert alerts == [] and state2["metrics"] == state["metrics"]
    assert state2["offset"] == 30
