"""Measurement validation rules: plain functions, no I/O."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from events.model import MeasurementRecorded, MeasurementRejected, MeasurementValidated, derived_id


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


def check(reading: MeasurementRecorded, now: datetime, max_skew_s: float) -> Rejection | None:
    """The first rule a reading breaks, or None when it is good."""
    rule = METRICS.get(reading.metric)
    if rule is None:
        return Rejection("unknown_metric", f"unknown metric {reading.metric!r}; known: "
                         + ", ".join(sorted(METRICS)))
    if reading.unit != rule.unit:
        return Rejection("wrong_unit", f"{reading.metric} must be in {rule.unit!r}, "
                         f"got {reading.unit!r}")
    if not rule.low <= reading.value <= rule.high:  # also false for NaN
        return Rejection("out_of_range", f"{reading.metric}={reading.value} {reading.unit} "
                         f"outside [{rule.low}, {rule.high}]")
    skew = reading.envelope.occurred_at - now
    if skew > timedelta(seconds=max_skew_s):
        when = reading.envelope.occurred_at.isoformat()
        return Rejection("future_timestamp", f"device timestamp {when} is "
                         f"{skew.total_seconds():.1f} s in the future "
                         f"(allowed skew {max_skew_s} s)")
    return None


class DedupWindow:
    """Remembers the offset at which each recent event id was first seen on one partition.

    Seeing an id again at the *same* offset is a replay after a restart (process it again: its
    outputs carry derived ids, so consumers drop the repeat); at a later offset it is a duplicate.
    """

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._first_seen: OrderedDict[UUID, int] = OrderedDict()

    def first_offset(self, event_id: UUID, offset: int) -> int:
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


def validated(reading: MeasurementRecorded, source: str) -> MeasurementValidated:
    return MeasurementValidated.create(
        event_id=derived_id(reading.event_id, "validated"),
        source=source, subject=reading.envelope.subject, sequence=reading.envelope.sequence,
        occurred_at=reading.envelope.occurred_at,
        correlation_id=reading.envelope.correlation_id or reading.event_id,
        causation_id=reading.event_id,
        measurement_id=reading.event_id, device_id=reading.device_id, metric=reading.metric,
        value=reading.value, unit=reading.unit, measured_at=reading.envelope.occurred_at,
    )


def rejected(reading: MeasurementRecorded, why: Rejection, source: str,
             purpose: str = "rejected") -> MeasurementRejected:
    return MeasurementRejected.create(
        event_id=derived_id(reading.event_id, purpose),
        source=source, subject=reading.envelope.subject, sequence=reading.envelope.sequence,
        occurred_at=reading.envelope.occurred_at,
        correlation_id=reading.envelope.correlation_id or reading.event_id,
        causation_id=reading.event_id,
        measurement_id=reading.event_id, device_id=reading.device_id, metric=reading.metric,
        value=reading.value, unit=reading.unit, measured_at=reading.envelope.occurred_at,
        reason_code=why.code, reason=why.reason,
    )
