import uuid
from datetime import datetime, timedelta, timezone

import pytest

from events.model import MeasurementRecorded
from processors.validation import DedupWindow, check, rejected, validated

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)


def reading(metric="temperature", value=20.0, unit="degC", at=NOW):
    return MeasurementRecorded.create(source="s", subject="d", sequence=1, occurred_at=at,
                                      device_id="d", metric=metric, value=value, unit=unit)


def test_good_reading_passes():
    assert check(reading(), NOW, 5) is None


@pytest.mark.parametrize("kwargs,code,phrase", [
    ({"metric": "viscosity"}, "unknown_metric", "unknown metric 'viscosity'"),
    ({"unit": "degF"}, "wrong_unit", "must be in 'degC'"),
    ({"value": 1e6}, "out_of_range", "outside"),
    ({"value": float("nan")}, "out_of_range", "outside"),
    ({"metric": "ph", "unit": "pH", "value": -0.1}, "out_of_range", "outside [0.0, 14.0]"),
    ({"at": NOW + timedelta(seconds=6)}, "future_timestamp", "in the future"),
])
def test_bad_readings_are_rejected_with_a_reason(kwargs, code, phrase):
    why = check(reading(**kwargs), NOW, 5)
    assert why is not None and why.code == code and phrase in why.reason


def test_clock_skew_within_allowance_is_accepted():
    assert check(reading(at=NOW + timedelta(seconds=4)), NOW, 5) is None


def test_dedup_window_tells_replays_from_duplicates():
    w = DedupWindow(capacity=3)
    a, b = uuid.uuid4(), uuid.uuid4()
    assert w.first_offset(a, 10) == 10
    assert w.first_offset(a, 10) == 10  # the same message again: a replay, not a duplicate
    assert w.first_offset(a, 42) == 10  # the same id later in the log: a duplicate
    assert w.first_offset(b, 11) == 11
    for i in range(3):
        w.first_offset(uuid.uuid4(), 20 + i)
    assert len(w) == 3 and w.first_offset(a, 99) == 99  # forgotten beyond capacity


def test_derived_events_have_deterministic_ids():
    r = reading()
    assert validated(r, "v").event_id == validated(r, "v").event_id != r.event_id
    v = validated(r, "v")
    assert v.measurement_id == r.event_id and v.envelope.causation_id == r.event_id
    why = check(reading(value=1e6), NOW, 5)
    assert rejected(r, why, "v").event_id != v.event_id
