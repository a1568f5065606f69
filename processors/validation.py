"""Measurement validation rules: plain functions, no I/O.

They work on plain Avro records (see Codec.decode_record(plain=True)): uuids are str and
timestamps int microseconds, because this is the hottest path of the bus.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from labbus.events.model import MeasurementRejected, MeasurementValidated, derived_id

VALIDATED = MeasurementValidated.TYPE
REJECTED = MeasurementRejected.TYPE


@dataclass(frozen=True)
class MetricRule:
    unit: str
    low: float
    high: float


METRICS: dict[str, MetricRule] = {
    "temperature": MetricRule("degC", -90.0, 400.0),
    "ph": MetricRule("pH", 0.0, 14.0),
    "absorbance": MetricRule("AU", 0.0, 6.0),
    "od600": MetricRule("OD", 0.0, 10.0),
    "humidity": MetricRule("%RH", 0.0, 100.0),
    "pressure": MetricRule("kPa", 0.0, 1000.0),
    "weight": MetricRule("g", 0.0, 10000.0),
}


@dataclass(frozen=True)
class Rejection:
    code: str
    reason: str


# Device timestamps the read models can hold, in µs since the epoch. The narrowest holder is
# Python's datetime (years 1-9999: the Mongo view, the API, any fastavro reader that decodes
# timestamp-micros); PostgreSQL's timestamptz reaches 4713 BC-294276 AD. A day of margin at each
# end keeps a conversion to any time zone in range too.
DAY_US = 86_400_000_000
EARLIEST_US = -62_135_596_800_000_000 + DAY_US  # 0001-01-02T00:00:00Z
LATEST_US = 253_402_300_800_000_000 - DAY_US - 1  # 9999-12-30T23:59:59.999999Z


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _iso(micros: int) -> str:
    return (_EPOCH + timedelta(microseconds=micros)).isoformat()


_HOLDABLE = f"{_iso(EARLIEST_US)} to {_iso(LATEST_US)}"


def representable(micros: int) -> bool:
    """True when every read model (and any Avro reader turning it into a datetime) can hold
    this timestamp."""
    return EARLIEST_US <= micros <= LATEST_US


def check(reading: dict, now_us: int, max_skew_s: float,
          max_age_days: float | None = None) -> Rejection | None:
    """The first rule a MeasurementRecorded record breaks, or None when it is good.
    `max_age_days`: readings whose device timestamp is older than this are rejected (None: no
    horizon, only what the read models cannot hold)."""
    metric, value, unit = reading["metric"], reading["value"], reading["unit"]
    rule = METRICS.get(metric)
    if rule is None:
        return Rejection("unknown_metric", f"unknown metric {metric!r}; known: "
                         + ", ".join(sorted(METRICS)))
    if unit != rule.unit:
        return Rejection("wrong_unit", f"{metric} must be in {rule.unit!r}, got {unit!r}")
    if math.isnan(value) or not rule.low <= value <= rule.high:
        return Rejection("out_of_range", f"{metric}={value} {unit} "
                         f"outside [{rule.low}, {rule.high}]")
    at = reading["occurred_at"]
    if not EARLIEST_US <= at <= LATEST_US:
        return Rejection("unrepresentable_timestamp",
                         f"device timestamp {at} µs since 1970-01-01 is outside what the read "
                         f"models can hold ({_HOLDABLE})")
    skew_us = at - now_us
    if skew_us > max_skew_s * 1e6:
        return Rejection("future_timestamp", f"device timestamp {_iso(at)} "
                         f"is {skew_us / 1e6:.1f} s in the future (allowed skew {max_skew_s} s)")
    if max_age_days is not None and -skew_us > max_age_days * DAY_US:
        return Rejection("timestamp_too_old",
                         f"device timestamp {_iso(at)} is {-skew_us / DAY_US:,.1f} days old "
                         f"(horizon {max_age_days:g} days, LABBUS_MAX_READING_AGE_DAYS)")
    return None


class DedupWindow:
    """Remembers the offset at which each recent event id was first seen on one partition.

    Seeing an id again at the *same* offset is a replay after a restart (process it again: its
    outputs carry derived ids, so consumers drop the repeat); at a later offset it is a duplicate.
    """

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._first_seen: OrderedDict[str, int] = OrderedDict()

    def first_offset(self, event_id: str, offset: int) -> int:
        """Record the id at this offset if new; return the offset where it was first seen."""
        first = self._first_seen.get(event_id)
        if first is None:
            self._first_seen[event_id] = offset
            if len(self._first_seen) > self.capacity:
                self._first_seen.popitem(last=False)
            return offset
        return first

    def __len__(self) -> int:
        return len(self._first_seen)


def _derived(reading: dict, event_type: str, purpose: str, now_us: int, source: str) -> dict:
    return {
        "event_id": derived_id(reading["event_id"], purpose),
        "event_type": event_type,
        "schema_version": 0,  # Codec.encode_plain writes the current schema's version
        "occurred_at": reading["occurred_at"],
        "recorded_at": now_us,
        "source": source,
        "subject": reading["subject"],
        "correlation_id": reading["correlation_id"] or reading["event_id"],
        "causation_id": reading["event_id"],
        "sequence": reading["sequence"],
        "measurement_id": reading["event_id"],
        "device_id": reading["device_id"],
        "metric": reading["metric"],
        "value": reading["value"],
        "unit": reading["unit"],
        "measured_at": reading["occurred_at"],
    }


def validated(reading: dict, now_us: int, source: str, quality: str | None = None,
              rule: str | None = None) -> dict:
    """The MeasurementValidated record for a reading that passed validation, with its quality
    and the rule that set it (processors/quality.py)."""
    record = _derived(reading, VALIDATED, "validated", now_us, source)
    record["quality"] = quality
    record["quality_rule"] = rule
    return record


def rejected(reading: dict, why: Rejection, now_us: int, source: str,
             purpose: str = "rejected") -> dict:
    """The MeasurementRejected record; `purpose` keeps ids of distinct rejections distinct.
    A device timestamp no reader can hold is not copied into it (the rejection would poison
    every consumer that decodes timestamps): its occurred_at and measured_at are then the time
    of the decision, and the reason gives the device's raw value."""
    record = _derived(reading, REJECTED, purpose, now_us, source)
    if not EARLIEST_US <= record["measured_at"] <= LATEST_US:
        record["occurred_at"] = record["measured_at"] = now_us
    record["reason_code"] = why.code
    record["reason"] = why.reason
    return record
