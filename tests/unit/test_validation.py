import uuid

import pytest

from labbus.events.codec import default_codec
from labbus.events.model import MeasurementRecorded, derived_id
from labbus.processors.validation import DedupWindow, check, rejected, validated

NOW_US = 1_777_777_777_000_000


def reading(metric="temperature", value=20.0, unit="degC", at_us=NOW_US):
    event = MeasurementRecorded.create(source="s", subject="d", sequence=1, device_id="d",
                                       metric=metric, value=value, unit=unit)
    _, record = default_codec().decode_record(default_codec().encode(event), plain=True)
    record["occurred_at"] = at_us
    return record


def test_good_reading_passes():
    assert check(reading(), NOW_US, 5) is None


@pytest.mark.parametrize("kwargs,code,phrase", [
    ({"metric": "viscosity"}, "unknown_metric", "unknown metric 'viscosity'"),
    ({"unit": "degF"}, "wrong_unit", "must be in 'degC'"),
    ({"value": 1e6}, "out_of_range", "outside"),
    ({"value": float("nan")}, "out_of_range", "outside"),
    ({"value": float("inf")}, "out_of_range", "outside"),
    ({"metric": "ph", "unit": "pH", "value": -0.1}, "out_of_range", "outside [0.0, 14.0]"),
    ({"at_us": NOW_US + 6_000_000}, "future_timestamp", "6.0 s in the future"),
])
def test_bad_readings_are_rejected_with_a_reason(kwargs, code, phrase):
    why = check(reading(**kwargs), NOW_US, 5)
    assert why is not None and why.code == code and phrase in why.reason


def test_clock_skew_within_allowance_is_accepted():
    assert check(reading(at_us=NOW_US + 4_000_000), NOW_US, 5) is None


def test_dedup_window_tells_replays_from_duplicates():
    w = DedupWindow(capacity=3)
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    assert w.first_offset(a, 10) == 10
    assert w.first_offset(a, 10) == 10  # the same message again: a replay, not a duplicate
    assert w.first_offset(a, 42) == 10  # the same id later in the log: a duplicate
    assert w.first_offset(b, 11) == 11
    for i in range(3):
        w.first_offset(str(uuid.uuid4()), 20 + i)
    assert len(w) == 3 and w.first_offset(a, 99) == 99  # forgotten beyond capacity


def test_derived_id_is_uuid5():
    from labbus.events.model import DERIVED_NAMESPACE

    parent = uuid.uuid4()
    assert derived_id(parent, "validated") == str(uuid.uuid5(DERIVED_NAMESPACE,
                                                             f"{parent}/validated"))
    assert derived_id(str(parent), "validated") == derived_id(parent, "validated")


def test_derived_records_encode_and_have_deterministic_ids():
    codec = default_codec()
    r = reading()
    v = validated(r, NOW_US, "v")
    assert v["event_id"] == validated(r, NOW_US, "v")["event_id"] != r["event_id"]
    assert v["measurement_id"] == r["event_id"] == v["causation_id"]
    event = codec.decode(codec.encode_plain(v["event_type"], v))
    assert str(event.measurement_id) == r["event_id"] and event.value == 20.0
    why = check(reading(value=1e6), NOW_US, 5)
    rej = rejected(r, why, NOW_US, "v")
    assert rej["event_id"] != v["event_id"] and rej["reason_code"] == "out_of_range"
    assert codec.decode(codec.encode_plain(rej["event_type"], rej)).reason == why.reason
