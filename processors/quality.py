"""Quality of a validated reading against its device's registered specs: plain functions, no I/O.

The validator calls `judge` for every reading that passed validation (the hot path: plain Avro
records, uuids str and timestamps int µs). A reading is `bad` when it breaks the device's spec for
its metric, `suspect` when it cannot be trusted as it stands, else `good`; the rule that set a
suspect or bad quality goes with it (None when good). Bad rules are checked first, then the
suspect ones, each in the order below; the first that fires decides.

| rule | quality | fires when |
|---|---|---|
| `unit` | bad | the reading's unit is not the spec's unit for the metric |
| `range` | bad | the value is outside the spec's [min, max] (a missing bound does not limit) |
| `no_spec` | suspect | the device is not registered, or registered without a spec for the metric |
| `future_time` | suspect | device time more than LABBUS_QUALITY_FUTURE_S ahead of the clock |
| `stale` | suspect | the device time is more than LABBUS_QUALITY_HORIZON_S behind it |
| `sequence` | suspect | sequence not above the highest seen before from that device |
"""

from __future__ import annotations

from collections.abc import Mapping

GOOD = ("good", None)
BAD_UNIT = ("bad", "unit")
BAD_RANGE = ("bad", "range")
NO_SPEC = ("suspect", "no_spec")
FUTURE = ("suspect", "future_time")
STALE = ("suspect", "stale")
SEQUENCE = ("suspect", "sequence")
RULES = ("unit", "range", "no_spec", "future_time", "stale", "sequence")

# metric -> (unit, min or None, max or None)
Specs = Mapping[str, tuple[str, float | None, float | None]]


def judge(reading: Mapping, specs: Specs | None, last_sequence: int | None, now_us: int,
          future_us: int, horizon_us: int) -> tuple[str, str | None]:
    """(quality, rule) of one reading (a plain MeasurementRecorded record). `specs`: the
    device's, None when it is not registered; `last_sequence`: the highest sequence seen before
    from the device (None: none)."""
    spec = specs.get(reading["metric"]) if specs is not None else None
    if spec is not None:
        unit, low, high = spec
        if reading["unit"] != unit:
            return BAD_UNIT
        value = reading["value"]
        if (low is not None and value < low) or (high is not None and value > high):
            return BAD_RANGE
    else:
        return NO_SPEC
    at = reading["occurred_at"]
    if at - now_us > future_us:
        return FUTURE
    if now_us - at > horizon_us:
        return STALE
    if last_sequence is not None and reading["sequence"] <= last_sequence:
        return SEQUENCE
    return GOOD


class Sequences:
    """The highest sequence seen per device, per input partition (a device's readings are on
    one partition: they are keyed by device)."""

    def __init__(self) -> None:
        self.by_partition: dict[int, dict[str, int]] = {}

    def partition(self, partition: int) -> dict[str, int]:
        last = self.by_partition.get(partition)
        if last is None:
            last = self.by_partition[partition] = {}
        return last

    def clear(self) -> None:
        self.by_partition.clear()
