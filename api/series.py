"""Bucketed time series of one device and metric: parameters, bucket grid and the SQL.

`GET /devices/{id}/measurements?metric=&from=&to=&bucket=1m&agg=avg` aggregates in PostgreSQL
(`date_bin` + an aggregate per bucket, `percentile_cont` for p95), reading the index
(device_id, metric, measured_at, ...) INCLUDE (value) of the day partitions the range touches.

Buckets are aligned to the Unix epoch (1970-01-01T00:00:00Z), so `1m` buckets start on whole
minutes and `1d` buckets at UTC midnight whatever `from` is; the same bucket is the same interval
in every request. Rows count when `from` <= measured_at < `to`, so the first and last buckets
may be partial. Every bucket from the one holding `from` to the one holding the last instant
before `to` is answered, in order; an empty one has count 0 and value null (0 for `count`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

MAX_BUCKETS = 10_000  # per request: a week of 1-minute buckets does not fit, a day does
BUCKET_PATTERN = r"^[1-9][0-9]{0,4}(s|m|h|d)$"
_BUCKET = re.compile(BUCKET_PATTERN)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = 1_000_000

# agg -> its SQL over the rows of one bucket (a fixed set: nothing from the request is pasted)
AGGREGATES = {
    "avg": "avg(value)",
    "min": "min(value)",
    "max": "max(value)",
    "count": "count(*)::float8",
    "p95": "percentile_cont(0.95) WITHIN GROUP (ORDER BY value)",
}


class SeriesError(ValueError):
    """Parameters of the declared types that cannot be answered (the API answers 400)."""


def parse_bucket(text: str) -> timedelta:
    """`30s`, `1m`, `15m`, `1h`, `1d`: a positive whole number and a unit (s, m, h, d)."""
    m = _BUCKET.fullmatch(text)
    if m is None:
        raise SeriesError(
            f"bucket {text[:40]!r}: expected a positive whole number and a unit "
            "s, m, h or d, e.g. 30s, 1m, 15m, 1h, 1d"
        )
    return timedelta(seconds=int(text[:-1]) * _UNITS[text[-1]])


def parse_agg(text: str) -> str:
    if text not in AGGREGATES:
        raise SeriesError(f"agg {text[:40]!r}: expected one of {', '.join(AGGREGATES)}")
    return text


def micros(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * _US + delta.microseconds


@dataclass(frozen=True)
class Grid:
    """The buckets of a request: `count` buckets of `stride`, the first starting at `first`."""

    first: datetime
    stride: timedelta
    count: int

    def starts(self) -> list[datetime]:
        return [self.first + i * self.stride for i in range(self.count)]


def grid(from_: datetime, to: datetime, stride: timedelta, max_buckets: int = MAX_BUCKETS) -> Grid:
    """The epoch-aligned buckets covering [from_, to); SeriesError over `max_buckets`."""
    if from_ > to:
        raise SeriesError("'from' must not be after 'to'")
    s = micros(stride)
    lo = micros(from_ - EPOCH) // s  # floor, also before 1970
    hi = -(-micros(to - EPOCH) // s)  # ceil: the bucket holding the last instant before `to`
    count = hi - lo if from_ < to else 0
    if count > max_buckets:
        raise SeriesError(
            f"from..to spans {count:,} buckets of {_label(stride)}; at most "
            f"{max_buckets:,} per request: use a larger bucket or a shorter range"
        )
    try:
        first = EPOCH + timedelta(microseconds=lo * s)
        first + stride * max(count, 1)  # noqa: B018 - the last bucket's end must exist too
    except OverflowError:
        raise SeriesError(
            f"the {_label(stride)} buckets around 'from'..'to' reach beyond the "
            "calendar (years 1 to 9999 UTC)"
        ) from None
    return Grid(first, stride, count)


def _label(stride: timedelta) -> str:
    seconds = int(stride.total_seconds())
    for unit in ("d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def query(agg: str) -> str:
    """The SQL of one aggregate: $1 device, $2 metric, $3 from, $4 to (exclusive), $5 the bucket
    in microseconds. Only buckets with rows come back (`fill` adds the empty ones)."""
    return f"""
SELECT date_bin($5::bigint * interval '1 microsecond', measured_at,
                TIMESTAMPTZ '1970-01-01 00:00:00+00') AS start,
       count(*) AS n, {AGGREGATES[agg]} AS value
FROM measurements
WHERE device_id = $1 AND metric = $2 AND measured_at >= $3 AND measured_at < $4
GROUP BY 1"""


QUERIES = {agg: query(agg) for agg in AGGREGATES}


def fill(g: Grid, agg: str, rows) -> list[dict]:
    """Every bucket of the grid, in order, from the (start, n, value) rows of `query`."""
    found = {r["start"]: r for r in rows}
    items = []
    for start in g.starts():
        r = found.get(start)
        if r is None:
            items.append({"start": start, "count": 0, "value": 0.0 if agg == "count" else None})
        else:
            items.append({"start": start, "count": r["n"], "value": r["value"]})
    return items


def to_json(metric: str, bucket: str, agg: str, g: Grid, rows) -> str:
    """The BucketSeries body (api/models.py), serialized directly."""
    items = [
        {"start": b["start"].isoformat(), "count": b["count"], "value": _finite(b["value"])}
        for b in fill(g, agg, rows)
    ]
    return json.dumps(
        {"metric": metric, "bucket": bucket, "agg": agg, "items": items}, separators=(",", ":")
    )


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: null, as the response models write them."""
    return value if value is None or math.isfinite(value) else None
