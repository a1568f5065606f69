"""Bucket/agg parsing, the bucket grid and the partition plan, as plain functions."""

from datetime import UTC, date, datetime, timedelta

import pytest

from labbus.api import series
from labbus.projections import partitions


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("1s", 1),
        ("30s", 30),
        ("1m", 60),
        ("15m", 900),
        ("1h", 3600),
        ("24h", 86400),
        ("1d", 86400),
        ("7d", 604800),
        ("99999d", 99999 * 86400),
    ],
)
def test_parse_bucket(text, seconds):
    assert series.parse_bucket(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    "text",
    ["", "0m", "01m", "1", "m", "1w", "1M", "1.5m", "-1m", " 1m", "1m ", "100000d", "1mm", "１m"],
)
def test_parse_bucket_refuses(text):
    with pytest.raises(series.SeriesError, match="bucket"):
        series.parse_bucket(text)


def test_parse_agg():
    assert [series.parse_agg(a) for a in ("avg", "min", "max", "count", "p95")] == list(
        series.AGGREGATES
    )
    with pytest.raises(series.SeriesError, match="avg, min, max, count, p95"):
        series.parse_agg("median")


def t(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_grid_is_aligned_to_the_epoch():
    g = series.grid(
        t("2026-03-01T12:00:30+00:00"), t("2026-03-01T12:03:00+00:00"), timedelta(minutes=1)
    )
    assert g.starts() == [
        t("2026-03-01T12:00:00+00:00"),
        t("2026-03-01T12:01:00+00:00"),
        t("2026-03-01T12:02:00+00:00"),
    ]
    # `to` on a bucket edge: that bucket is not included; one microsecond later it is
    assert (
        series.grid(
            t("2026-03-01T12:00:00+00:00"), t("2026-03-01T13:00:00+00:00"), timedelta(minutes=1)
        ).count
        == 60
    )
    assert (
        series.grid(
            t("2026-03-01T12:00:00+00:00"),
            t("2026-03-01T13:00:00.000001+00:00"),
            timedelta(minutes=1),
        ).count
        == 61
    )
    # 7-minute buckets are aligned to the epoch, not to the hour
    g = series.grid(
        t("2026-03-01T12:00:00+00:00"), t("2026-03-01T12:10:00+00:00"), timedelta(minutes=7)
    )
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert all((s - epoch) % timedelta(minutes=7) == timedelta(0) for s in g.starts())
    assert g.first <= t("2026-03-01T12:00:00+00:00") < g.first + g.stride


def test_grid_before_1970_and_empty_range():
    g = series.grid(
        t("1969-12-31T23:59:30+00:00"), t("1970-01-01T00:00:30+00:00"), timedelta(minutes=1)
    )
    assert g.starts() == [t("1969-12-31T23:59:00+00:00"), t("1970-01-01T00:00:00+00:00")]
    assert (
        series.grid(
            t("2026-03-01T12:00:30+00:00"), t("2026-03-01T12:00:30+00:00"), timedelta(minutes=1)
        ).count
        == 0
    )


def test_grid_cap_and_calendar_ends():
    start = t("2026-03-01T00:00:00+00:00")
    assert (
        series.grid(start, start + timedelta(seconds=10_000), timedelta(seconds=1)).count
        == series.MAX_BUCKETS
    )
    with pytest.raises(series.SeriesError, match=r"10,001 buckets of 1s; at most 10,000"):
        series.grid(start, start + timedelta(seconds=10_001), timedelta(seconds=1))
    with pytest.raises(series.SeriesError, match="10,080 buckets of 1m"):
        series.grid(start, start + timedelta(days=7), timedelta(minutes=1))
    with pytest.raises(series.SeriesError, match="beyond the calendar"):
        series.grid(
            datetime.min.replace(tzinfo=UTC), t("0001-01-02T00:00:00+00:00"), timedelta(days=7)
        )
    with pytest.raises(series.SeriesError, match="beyond the calendar"):
        series.grid(
            t("9999-12-31T00:00:00+00:00"), datetime.max.replace(tzinfo=UTC), timedelta(days=2)
        )
    with pytest.raises(series.SeriesError, match="after"):
        series.grid(start + timedelta(seconds=1), start, timedelta(seconds=1))


def test_fill_answers_every_bucket():
    g = series.grid(
        t("2026-03-01T12:00:00+00:00"), t("2026-03-01T12:03:00+00:00"), timedelta(minutes=1)
    )
    rows = [{"start": t("2026-03-01T12:01:00+00:00"), "n": 3, "value": 2.5}]
    assert [(b["count"], b["value"]) for b in series.fill(g, "avg", rows)] == [
        (0, None),
        (3, 2.5),
        (0, None),
    ]
    assert [b["value"] for b in series.fill(g, "count", [])] == [0.0, 0.0, 0.0]


def test_every_aggregate_has_its_query():
    assert set(series.QUERIES) == {"avg", "min", "max", "count", "p95"}
    assert "percentile_cont(0.95)" in series.QUERIES["p95"]


# -- partition plan -----------------------------------------------------------------------------

D = date(2026, 3, 31)


def test_plan_creates_yesterday_today_and_ahead():
    p = partitions.plan(D, existing=set(), default_days=set(), ahead=2, retention_days=30)
    assert p.create == [date(2026, 3, 30), D, date(2026, 4, 1), date(2026, 4, 2)]
    assert p.drop == [] and p.cutoff == date(2026, 3, 2)  # the last 30 days, today included


def test_plan_drops_days_older_than_the_retention_and_splits_the_default():
    existing = {date(2026, 3, 1), date(2026, 3, 2), date(2026, 3, 30), D, date(2026, 4, 1)}
    strays = {date(2026, 2, 1), date(2026, 3, 10), date(2026, 4, 1), date(2026, 6, 1)}
    p = partitions.plan(D, existing, strays, ahead=1, retention_days=30)
    assert p.drop == [date(2026, 3, 1)]
    # Feb 1: past retention (deleted, not split); Jun 1: beyond the days ahead (waits)
    assert p.create == [date(2026, 3, 10)]


def test_plan_with_one_day_of_retention_keeps_only_today():
    p = partitions.plan(
        D, existing={date(2026, 3, 30), D}, default_days=set(), ahead=0, retention_days=1
    )
    assert p.drop == [date(2026, 3, 30)] and p.create == []


def test_partition_names():
    assert partitions.partition_name(date(2026, 3, 1)) == "measurements_p20260301"
    assert partitions.day_of("measurements_p20260301") == date(2026, 3, 1)
    assert partitions.day_of("measurements_default") is None
