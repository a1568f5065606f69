"""Quality rules (processors/quality.py) one by one, and their place in the validator."""

from __future__ import annotations

import time

import pytest

from labbus.events import config
from labbus.events.codec import default_codec
from labbus.events.model import DeviceRegistered, MeasurementRecorded, MeasurementValidated
from labbus.events.runtime import Record
from labbus.processors import quality
from labbus.processors.validator import Validator

NOW = 1_800_000_000_000_000
SPECS = {"temperature": ("degC", 15.0, 30.0), "ph": ("pH", None, 9.0)}
FUTURE, HORIZON = 1_000_000, 3_600_000_000


def reading(**changes) -> dict:
    r = {"metric": "temperature", "value": 21.0, "unit": "degC", "occurred_at": NOW - 1000,
         "sequence": 10}
    r.update(changes)
    return r


def judge(r: dict, specs=SPECS, last=9) -> tuple[str, str | None]:
    return quality.judge(r, specs, last, NOW, FUTURE, HORIZON)


def test_a_reading_within_its_spec_is_good():
    assert judge(reading()) == ("good", None)
    assert judge(reading(value=15.0)) == judge(reading(value=30.0)) == ("good", None)  # inclusive
    assert judge(reading(metric="ph", value=-3.0, unit="pH")) == ("good", None)  # no lower bound


def test_unit_other_than_the_spec_is_bad():
    assert judge(reading(unit="K")) == ("bad", "unit")


@pytest.mark.parametrize("value", [14.99, 30.01, 1e6])
def test_value_outside_the_spec_range_is_bad(value):
    assert judge(reading(value=value)) == ("bad", "range")
    assert judge(reading(metric="ph", unit="pH", value=9.5)) == ("bad", "range")


def test_unregistered_device_or_metric_without_spec_is_suspect():
    assert judge(reading(), specs=None) == ("suspect", "no_spec")
    assert judge(reading(), specs={}) == ("suspect", "no_spec")
    assert judge(reading(metric="humidity", unit="%RH")) == ("suspect", "no_spec")


def test_device_time_in_the_future_is_suspect():
    assert judge(reading(occurred_at=NOW + FUTURE)) == ("good", None)
    assert judge(reading(occurred_at=NOW + FUTURE + 1)) == ("suspect", "future_time")


def test_device_time_beyond_the_horizon_is_suspect():
    assert judge(reading(occurred_at=NOW - HORIZON)) == ("good", None)
    assert judge(reading(occurred_at=NOW - HORIZON - 1)) == ("suspect", "stale")


def test_sequence_not_above_the_last_one_is_suspect():
    assert judge(reading(sequence=10), last=9) == ("good", None)
    assert judge(reading(sequence=10), last=None) == ("good", None)
    assert judge(reading(sequence=9), last=9) == ("suspect", "sequence")
    assert judge(reading(sequence=3), last=9) == ("suspect", "sequence")


def test_bad_rules_win_over_suspect_ones():
    r = reading(value=99.0, occurred_at=NOW + 10 * FUTURE, sequence=1)
    assert judge(r) == ("bad", "range")
    assert judge(reading(occurred_at=NOW + 10 * FUTURE, sequence=1)) == ("suspect", "future_time")


def test_config_errors_name_the_variable():
    for env, raw in [("LABBUS_QUALITY_FUTURE_S", "-1"), ("LABBUS_QUALITY_HORIZON_S", "soon"),
                     ("LABBUS_ANOMALY_THRESHOLD", "0"), ("LABBUS_ANOMALY_WARMUP", "1"),
                     ("LABBUS_ANOMALY_ALPHA", "1")]:
        with pytest.raises(config.ConfigError, match=env):
            config.load({env: raw})
    cfg = config.load({})
    assert (cfg.quality_future_s, cfg.quality_horizon_s) == (1.0, 3600.0)
    assert (cfg.anomaly_threshold, cfg.anomaly_warmup, cfg.anomaly_alpha) == (4.0, 20, 0.05)


def test_the_validator_puts_quality_and_rule_on_validated_events():
    """Through Validator.handle: specs as read from lab.devices, sequences per device."""
    codec = default_codec()
    v = Validator(config.load({}), codec)
    reg = DeviceRegistered.create(
        source="gw", subject="q1", sequence=1, device_id="q1", device_type="thermometer",
        model="m", location="lab", metrics=["temperature"], spec_version=2,
        specs=[{"metric": "temperature", "unit": "degC", "min": 15.0, "max": 30.0,
                "expected_interval_s": 1.0}])
    v.specs.read(b"q1", codec.encode(reg))
    now_us = time.time_ns() // 1000
    got = []
    for offset, (device, seq, value) in enumerate(
            [("q1", 5, 21.0), ("q1", 6, 35.0), ("q1", 6, 22.0), ("q2", 1, 21.0)]):
        e = MeasurementRecorded.create(source="s", subject=device, sequence=seq,
                                       device_id=device, metric="temperature", value=value,
                                       unit="degC")
        topic, data, code = v.handle(Record("t", 0, offset, device.encode(), codec.encode(e)),
                                     now_us)
        assert code is None and topic == v.validated_topic
        out = codec.decode(data)
        assert isinstance(out, MeasurementValidated)
        assert out.envelope.schema_version == codec.schema(out.TYPE).version
        got.append((out.quality, out.quality_rule))
    assert got == [("good", None), ("bad", "range"), ("suspect", "sequence"),
                   ("suspect", "no_spec")]
