"""Measurement validation rules: plain functions, no I/O.

They work on plain Avro records (see Codec.decode_record(plain=True)): uuids are str and
timestamps int microseconds, because this is the hottest path of the bus.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

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


def _iso(micros: int) -> str:
    return datetime.fromtimestamp(micros / 1e6, UTC).isoformat()


def check(reading: dict, now_us: int, max_skew_s: float) -> Rejection | None:
    """The first rule a MeasurementRecorded record breaks, or None when it is good."""
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
    skew_us = reading["occurred_at"] - now_us
    if skew_us > max_skew_s * 1e6:
        return Rejection("future_timestamp", f"device timestamp {_iso(reading['occurred_at'])} "
                         f"is {skew_us / 1e6:.1f} s in the future (allowed skew {max_skew_s} s)")
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
        "schema_version": 1,
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


def validated(reading: dict, now_us: int, source: str) -> dict:
    """The MeasurementValidated record for a good reading."""
    return _derived(reading, VALIDATED, "validated", now_us, source)


def rejected(reading: dict, why: Rejection, now_us: int, source: str,
             purpose: str = "rejected") -> dict:
    """The MeasurementRejected record; `purpose` keeps ids of distinct rejections distinct."""
    record = _derived(reading, REJECTED, purpose, now_us, source)
    record["reason_code"] = why.code
    record["reason"] = why.reason
    return record
