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


DAY_US = 86_400_000_000
YEAR_1_US = -62_135_596_800_000_000  # 0001-01-01T00:00:00Z
YEAR_10000_US = 253_402_300_800_000_000  # 10000-01-01T00:00:00Z


@pytest.mark.parametrize("at_us", [
    YEAR_1_US,  # year 1: what crashed the PostgreSQL view
    YEAR_1_US - 1,
    -2**62,  # what crashed both views
    -2**63,  # the smallest Avro long
    YEAR_10000_US,  # year 10000
    YEAR_10000_US - 1,  # 9999-12-31T23:59:59.999999Z: no time zone to the east could hold it
    2**62,
    2**63 - 1,  # the largest Avro long
])
def test_timestamps_the_read_models_cannot_hold_are_rejected(at_us):
    """Whatever the clock skew and horizon allow: no setting lets them through."""
    for skew, horizon in ((5, 3650), (1e15, None), (1e15, 3_650_000)):
        why = check(reading(at_us=at_us), NOW_US, skew, horizon)
        assert why is not None and why.code == "unrepresentable_timestamp", (at_us, skew, why)
        assert str(at_us) in why.reason and "read models" in why.reason


def test_the_edges_of_what_the_read_models_hold():
    from labbus.processors.validation import EARLIEST_US, LATEST_US

    assert check(reading(at_us=EARLIEST_US), NOW_US, 1e15, None) is None
    assert check(reading(at_us=LATEST_US), NOW_US, 1e15, None) is None
    assert check(reading(at_us=EARLIEST_US - 1), NOW_US, 1e15, None).code == \
        "unrepresentable_timestamp"
    assert check(reading(at_us=LATEST_US + 1), NOW_US, 1e15, None).code == \
        "unrepresentable_timestamp"
    # what the views do with a timestamp: both hold the edges, in any time zone
    from datetime import UTC, datetime, timedelta, timezone

    for edge in (EARLIEST_US, LATEST_US):
        moment = datetime.fromtimestamp(edge / 1e6, UTC)
        for hours in (-14, 14):
            moment.astimezone(timezone(timedelta(hours=hours)))


def test_readings_older_than_the_horizon_are_rejected():
    just_inside = reading(at_us=NOW_US - 30 * DAY_US + 1)
    assert check(just_inside, NOW_US, 5, 30) is None
    why = check(reading(at_us=NOW_US - 30 * DAY_US - 1), NOW_US, 5, 30)
    assert why.code == "timestamp_too_old"
    assert "30.0 days old" in why.reason and "LABBUS_MAX_READING_AGE_DAYS" in why.reason
    # year 1970 (a device clock reset to the epoch) with the default horizon of ten years
    why = check(reading(at_us=0), NOW_US, 5, 3650)
    assert why.code == "timestamp_too_old" and "1970-01-01T00:00:00+00:00" in why.reason
    assert check(reading(at_us=0), NOW_US, 5, None) is None  # no horizon


def test_the_future_rule_still_wins_for_representable_timestamps():
    why = check(reading(at_us=NOW_US + 400 * 365 * DAY_US), NOW_US, 5, 30)
    assert why.code == "future_timestamp"


def test_a_rejection_carries_no_timestamp_a_reader_cannot_hold():
    """The rejected event itself must decode everywhere (fastavro turns timestamp-micros into a
    datetime): an unrepresentable device timestamp is replaced by the decision time, and the
    reason keeps the device's raw value."""
    codec = default_codec()
    bad = reading(at_us=-2**62)
    why = check(bad, NOW_US, 5, 3650)
    rej = rejected(bad, why, NOW_US, "v")
    assert rej["occurred_at"] == rej["measured_at"] == NOW_US
    event = codec.decode(codec.encode_plain(rej["event_type"], rej))  # datetimes: no ValueError
    assert str(-2**62) in event.reason and event.reason_code == "unrepresentable_timestamp"
    old = reading(at_us=0)
    assert rejected(old, check(old, NOW_US, 5, 3650), NOW_US, "v")["measured_at"] == 0
