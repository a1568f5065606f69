"""Bucketed series and time partitions of `measurements`, against the real PostgreSQL.

Rows go in through the real projection code; aggregates come out of the real API and are compared
with a brute-force computation in Python over the same rows. Partition maintenance and the
migration from the unpartitioned table each run in a database of their own, so their drops and
dates do not touch the session's database.
"""

from __future__ import annotations

import asyncio
import math
import random
import shutil
import tempfile
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from aiokafka import TopicPartition

from labbus.api import models, series
from labbus.deploy.local import postgres
from labbus.events import config
from labbus.events.codec import default_codec
from labbus.events.model import DeviceRegistered, MeasurementValidated
from labbus.events.runtime import Positioned
from labbus.projections import partitions
from labbus.projections.migrate import MIGRATIONS, migrate
from labbus.projections.postgres import PostgresProjection
from tests.conftest import run

DEVICE = "series-dev-1"
OTHER = "series-dev-2"  # same metric, other device: must never leak into DEVICE's buckets
T0 = datetime(2026, 3, 1, 22, 30, tzinfo=UTC)  # the readings span midnight: two partitions
SPAN_S = 3 * 3600
PAST = datetime(2026, 1, 5, 8, 0, 0, 123456, tzinfo=UTC)  # no partition: in the default one
FUTURE = datetime(2300, 6, 1, 12, 0, tzinfo=UTC)  # far beyond the partitions created ahead


def readings(rng: random.Random) -> list[tuple[str, str, datetime, float]]:
    """(device, metric, measured_at, value): irregular times, some shared, some on bucket
    edges, some with microseconds."""
    out = []
    for i in range(1500):
        if i % 10 == 0:
            at = T0 + timedelta(minutes=rng.randrange(SPAN_S // 60))  # on a minute edge
        else:
            at = T0 + timedelta(microseconds=rng.randrange(SPAN_S * 1_000_000))
        metric = "ph" if i % 4 else "temperature"
        out.append((DEVICE, metric, at, round(rng.uniform(-5, 20), 6)))
    for i in range(200):
        at = T0 + timedelta(seconds=rng.randrange(SPAN_S))
        out.append((OTHER, "ph", at, 1000.0 + i))
    out += [(DEVICE, "ph", PAST, 4.25), (DEVICE, "ph", FUTURE, 6.5)]
    return out


async def project(cfg, rows) -> None:
    projection = PostgresProjection(cfg)
    await projection.start()
    codec = default_codec()
    tp = TopicPartition("series-test", 0)
    events = [
        DeviceRegistered.create(
            source="t",
            subject=d,
            sequence=0,
            device_id=d,
            device_type="ph-meter",
            model="m",
            location="l",
            metrics=["ph", "temperature"],
        )
        for d in (DEVICE, OTHER)
    ]
    events += [
        MeasurementValidated.create(
            source="t",
            subject=d,
            sequence=i,
            measurement_id=uuid.uuid4(),
            device_id=d,
            metric=m,
            value=v,
            unit="pH" if m == "ph" else "degC",
            measured_at=at,
        )
        for i, (d, m, at, v) in enumerate(rows)
    ]
    batch = [
        Positioned(tp, i, *codec.decode_record(codec.encode(e), plain=True))
        for i, e in enumerate(events)
    ]
    try:
        async with projection.pool.acquire() as con:  # the days of T0's range get partitions
            for day in (date(2026, 3, 1), date(2026, 3, 2)):
                await con.fetchrow("SELECT * FROM labbus_measurements_partition($1)", day)
        await projection.apply(batch, {})
        await projection.apply(batch, {})  # a replay changes nothing
    finally:
        await projection.stop()


@pytest.fixture(scope="module")
def seeded(cfg, query_api):
    rows = readings(random.Random(9))
    run(project(cfg, rows))
    with query_api(cfg) as client:
        yield client, rows


# -- brute force ----------------------------------------------------------------------------


def percentile_cont(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    if low + 1 >= len(ordered):
        return ordered[low]
    return ordered[low] + (pos - low) * (ordered[low + 1] - ordered[low])


BRUTE = {
    "avg": lambda v: sum(v) / len(v),
    "min": min,
    "max": max,
    "count": lambda v: float(len(v)),
    "p95": lambda v: percentile_cont(v, 0.95),
}


def brute_force(rows, device, metric, from_, to, stride: timedelta, agg: str) -> list[dict]:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    first = epoch + stride * math.floor((from_ - epoch) / stride)
    buckets = []
    start = first
    while start < to:
        values = [
            v
            for d, m, at, v in rows
            if d == device and m == metric and from_ <= at < to and start <= at < start + stride
        ]
        if not values:
            value = 0.0 if agg == "count" else None
        else:
            value = BRUTE[agg](values)
        buckets.append({"start": start, "count": len(values), "value": value})
        start += stride
    return buckets


def fetch(api, device, **params) -> dict:
    r = api.get(f"/devices/{device}/measurements", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def same(answer: list[dict], expected: list[dict]) -> None:
    assert len(answer) == len(expected), (len(answer), len(expected))
    for got, want in zip(answer, expected, strict=True):
        assert datetime.fromisoformat(got["start"]) == want["start"], (got, want)
        assert got["count"] == want["count"], (got, want)
        if want["value"] is None:
            assert got["value"] is None, (got, want)
        else:
            assert math.isclose(got["value"], want["value"], rel_tol=1e-9, abs_tol=1e-9), (
                got,
                want,
            )


RANGES = [
    # whole span, bucket-aligned
    (T0, T0 + timedelta(seconds=SPAN_S)),
    # unaligned edges: partial first and last buckets, across midnight
    (T0 + timedelta(minutes=7, seconds=13, microseconds=5), T0 + timedelta(hours=2, seconds=1)),
    # an hour starting before the first reading: leading empty buckets
    (T0 - timedelta(minutes=30), T0 + timedelta(minutes=30)),
]


@pytest.mark.parametrize("agg", ["avg", "min", "max", "count", "p95"])
@pytest.mark.parametrize("bucket", ["1s", "30s", "1m", "7m", "1h", "1d"])
def test_bucketed_aggregates_equal_brute_force(seeded, agg, bucket):
    api, rows = seeded
    stride = series.parse_bucket(bucket)
    for from_, to in RANGES:
        if (to - from_) / stride > series.MAX_BUCKETS:
            continue  # 1s over three hours: refused, see test_bucket_cap
        body = fetch(
            api,
            DEVICE,
            metric="ph",
            bucket=bucket,
            agg=agg,
            **{"from": from_.isoformat(), "to": to.isoformat()},
        )
        assert body["metric"] == "ph" and body["bucket"] == bucket and body["agg"] == agg
        expected = brute_force(rows, DEVICE, "ph", from_, to, stride, agg)
        assert sum(b["count"] for b in expected) > 0
        same(body["items"], expected)


def test_the_bucketed_body_is_the_declared_bucket_series(seeded):
    """The bucketed answer is written without the response model (api/series.to_json): it must
    still be exactly the BucketSeries the OpenAPI declares."""
    api, _ = seeded
    r = api.get(f"/devices/{DEVICE}/measurements",
                params={"metric": "ph", "bucket": "1m", **H})
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == set(models.BucketSeries.model_fields)
    assert body["agg"] == "avg"  # the default
    assert all(set(b) == set(models.Bucket.model_fields) for b in body["items"])
    assert models.BucketSeries.model_validate(body).model_dump(mode="json")["items"][0]["start"]


def test_from_is_inclusive_and_to_exclusive_at_a_reading(seeded):
    api, rows = seeded
    times = sorted(
        at
        for d, m, at, _ in rows
        if d == DEVICE and m == "ph" and at.year == 2026 and at.month == 3
    )
    from_, to = times[100], times[400]  # both exactly on readings
    for bucket in ("1m", "1s"):
        body = fetch(
            api,
            DEVICE,
            metric="ph",
            bucket=bucket,
            agg="count",
            **{"from": from_.isoformat(), "to": to.isoformat()},
        )
        counted = sum(b["count"] for b in body["items"])
        assert counted == sum(1 for t in times if from_ <= t < to)
        same(
            body["items"],
            brute_force(rows, DEVICE, "ph", from_, to, series.parse_bucket(bucket), "count"),
        )


def test_empty_buckets_are_answered_with_count_zero(seeded):
    api, _ = seeded
    body = fetch(
        api,
        DEVICE,
        metric="ph",
        bucket="1m",
        agg="avg",
        **{"from": "2026-02-01T00:00:00Z", "to": "2026-02-01T01:00:00Z"},
    )
    assert len(body["items"]) == 60
    assert {(b["count"], b["value"]) for b in body["items"]} == {(0, None)}
    body = fetch(
        api,
        DEVICE,
        metric="ph",
        bucket="1m",
        agg="count",
        **{"from": "2026-02-01T00:00:00Z", "to": "2026-02-01T00:00:00Z"},
    )
    assert body["items"] == []  # an empty range has no bucket


def test_readings_far_in_the_past_and_future_land_in_the_default_partition(seeded, cfg):
    api, _ = seeded

    async def where():
        con = await asyncpg.connect(cfg.postgres_api_dsn)
        try:
            return {
                r["measured_at"]: r["part"]
                for r in await con.fetch(
                    "SELECT measured_at, tableoid::regclass::text AS part FROM measurements "
                    "WHERE device_id = $1 AND measured_at = ANY($2::timestamptz[])",
                    DEVICE,
                    [PAST, FUTURE],
                )
            }
        finally:
            await con.close()

    placed = run(where())
    assert placed == {PAST: "measurements_default", FUTURE: "measurements_default"}
    for at, value in ((PAST, 4.25), (FUTURE, 6.5)):
        day = at.replace(hour=0, minute=0, second=0, microsecond=0)
        body = fetch(
            api,
            DEVICE,
            metric="ph",
            bucket="1d",
            agg="max",
            **{"from": day.isoformat(), "to": (day + timedelta(days=1)).isoformat()},
        )
        assert [(b["count"], b["value"]) for b in body["items"]] == [(1, value)]
        raw = fetch(api, DEVICE, metric="ph", **{"from": at.isoformat()}, limit=5)
        assert raw["items"][0]["value"] == value


def test_raw_pages_are_unchanged_without_bucket(seeded):
    api, rows = seeded
    body = fetch(
        api,
        DEVICE,
        metric="temperature",
        limit=1000,
        **{"from": T0.isoformat(), "to": (T0 + timedelta(hours=1)).isoformat()},
    )
    assert "next_cursor" in body and "bucket" not in body
    assert len(body["items"]) == sum(
        1
        for d, m, at, _ in rows
        if d == DEVICE and m == "temperature" and T0 <= at < T0 + timedelta(hours=1)
    )


H = {"from": "2026-03-01T22:00:00Z", "to": "2026-03-01T23:00:00Z"}


@pytest.mark.parametrize(
    "params,status,phrase",
    [
        ({"bucket": "1m", "agg": "median", "metric": "ph", **H}, 422, "agg"),
        ({"bucket": "0m", "metric": "ph", **H}, 422, "bucket"),
        ({"bucket": "1w", "metric": "ph", **H}, 422, "bucket"),
        ({"bucket": "1.5m", "metric": "ph", **H}, 422, "bucket"),
        ({"bucket": "-1m", "metric": "ph", **H}, 422, "bucket"),
        ({"bucket": "1m", **H}, 400, "needs metric"),
        ({"bucket": "1m", "metric": "ph", "from": H["from"]}, 400, "needs to"),
        ({"bucket": "1m", "metric": "ph"}, 400, "needs from and to"),
        ({"agg": "p95", "metric": "ph", **H}, 400, "needs bucket"),
        ({"bucket": "1m", "metric": "ph", "cursor": "abc", **H}, 400, "cursor"),
        ({"bucket": "1m", "metric": "ph", "from": H["to"], "to": H["from"]}, 400, "after"),
        (
            {
                "bucket": "1s",
                "metric": "ph",
                "from": "2026-03-01T00:00:00Z",
                "to": "2026-03-02T00:00:00Z",
            },
            400,
            "at most 10,000 per request",
        ),
        (
            {
                "bucket": "7d",
                "metric": "ph",
                "from": "0001-01-01T00:00:00Z",
                "to": "0001-01-02T00:00:00Z",
            },
            400,
            "beyond the calendar",
        ),
    ],
)
def test_bad_bucket_parameters_get_4xx_with_the_error_body(seeded, params, status, phrase):
    api, _ = seeded
    r = api.get(f"/devices/{DEVICE}/measurements", params=params)
    assert r.status_code == status, r.text
    assert phrase in r.json()["detail"], r.json()
    assert set(r.json()) == {"detail", "errors"}
    assert bool(r.json()["errors"]) == (status == 422)


def test_bucket_cap_allows_exactly_the_maximum(seeded):
    api, _ = seeded
    start = datetime(2026, 3, 1, tzinfo=UTC)
    body = fetch(
        api,
        DEVICE,
        metric="ph",
        bucket="1s",
        agg="count",
        **{
            "from": start.isoformat(),
            "to": (start + timedelta(seconds=series.MAX_BUCKETS)).isoformat(),
        },
    )
    assert len(body["items"]) == series.MAX_BUCKETS


def test_unknown_device_is_404_also_bucketed(seeded):
    api, _ = seeded
    r = api.get("/devices/no-such/measurements", params={"bucket": "1m", "metric": "ph", **H})
    assert r.status_code == 404 and "no-such" in r.json()["detail"]


# -- partitions: maintenance and migration, each in a database of its own ----------------------


@pytest.fixture
def scratch_db(base_env):
    base = config.load(base_env)
    name = f"labbus_series_{uuid.uuid4().hex[:8]}"
    dsn = postgres.create_database(base, name)
    yield dsn
    postgres.drop_database(base, name)


async def _partition_days(con) -> list[date]:
    return sorted(await partitions.existing_days(con))


def test_maintenance_creates_ahead_splits_the_default_and_drops_old_days(scratch_db):
    async def go():
        con = await asyncpg.connect(scratch_db)
        try:
            await migrate(con)
            today = date(2031, 5, 10)
            lines = []
            report = await partitions.maintain(
                con, retention_days=30, ahead=3, today=today, echo=lines.append
            )
            assert await _partition_days(con) == [today + timedelta(days=i) for i in range(-1, 4)]
            assert [n for n, _ in report.created] == [
                "measurements_p20310509",
                "measurements_p20310510",
                "measurements_p20310511",
                "measurements_p20310512",
                "measurements_p20310513",
            ]
            assert lines[0] == "[1/5] create measurements_p20310509" and len(lines) == 5
            # readings of days without a partition: in the retention window, 40 days ago, far
            # ahead; all land in the default partition
            at = {
                "in_window": datetime(2031, 4, 20, 6, tzinfo=UTC),
                "too_old": datetime(2031, 3, 1, 6, tzinfo=UTC),
                "far_ahead": datetime(2031, 9, 1, tzinfo=UTC),
                "today": datetime(2031, 5, 10, 23, 59, 59, 999999, tzinfo=UTC),
            }
            for label, t in at.items():
                await con.execute(
                    "INSERT INTO measurements (measurement_id, device_id, metric, value, unit,"
                    " measured_at, validated_event_id, source_partition, source_offset) "
                    "VALUES ($1, 'd', $2, 1, 'u', $3, $1, 0, 0)",
                    uuid.uuid4(),
                    label,
                    t,
                )

            async def placed():
                return dict(
                    await con.fetch("SELECT metric, tableoid::regclass::text FROM measurements")
                )

            assert await placed() == {
                "in_window": "measurements_default",
                "too_old": "measurements_default",
                "far_ahead": "measurements_default",
                "today": "measurements_p20310510",
            }
            lines.clear()
            report = await partitions.maintain(
                con, retention_days=30, ahead=3, today=today, echo=lines.append
            )
            assert report.created == [("measurements_p20310420", 1)]
            assert report.deleted_from_default == 1  # the reading 70 days old
            assert await placed() == {
                "in_window": "measurements_p20310420",
                "far_ahead": "measurements_default",
                "today": "measurements_p20310510",
            }
            # a week later: partitions older than 30 days go, new ones come
            later = today + timedelta(days=27)
            report = await partitions.maintain(con, retention_days=30, ahead=3, today=later)
            assert [n for n, _ in report.dropped] == ["measurements_p20310420"]
            days = await _partition_days(con)
            assert days[0] == date(2031, 5, 9) and days[-1] == later + timedelta(days=3)
            assert await placed() == {
                "far_ahead": "measurements_default",
                "today": "measurements_p20310510",
            }
            later = today + timedelta(days=30)  # June 9: keeps May 11 on, so May 9 and 10 go
            report = await partitions.maintain(con, retention_days=30, ahead=3, today=later)
            assert [n for n, _ in report.dropped] == [
                "measurements_p20310509",
                "measurements_p20310510",
            ]
            assert report.dropped[1][1] == 1  # it held one row
            # idempotent: nothing left to do
            again = await partitions.maintain(con, retention_days=30, ahead=3, today=later)
            assert (again.created, again.dropped, again.deleted_from_default) == ([], [], 0)
        finally:
            await con.close()

    run(go())


def test_dry_run_changes_nothing(scratch_db):
    async def go():
        con = await asyncpg.connect(scratch_db)
        try:
            await migrate(con)
            report = await partitions.maintain(
                con, 30, ahead=2, today=date(2031, 1, 1), dry_run=True
            )
            assert len(report.created) == 4 and await _partition_days(con) == []
        finally:
            await con.close()

    run(go())


def test_maintenance_while_the_projector_inserts_loses_nothing(scratch_db):
    """Partitions are created (rows moved out of the default) while inserts run: every row
    stays, each exactly once."""

    async def go():
        pool = await asyncpg.create_pool(scratch_db, min_size=2, max_size=2)
        try:
            async with pool.acquire() as con:
                await migrate(con)
            start = datetime(2032, 1, 1, tzinfo=UTC)
            ids = []

            async def insert():
                for i in range(200):
                    mid = uuid.uuid4()
                    ids.append(mid)
                    await pool.execute(
                        "INSERT INTO measurements (measurement_id, device_id, metric, value, "
                        "unit, measured_at, validated_event_id, source_partition, source_offset)"
                        " VALUES ($1, 'd', 'm', $2, 'u', $3, $1, 0, $4)"
                        " ON CONFLICT (measurement_id, measured_at) DO NOTHING",
                        mid,
                        float(i),
                        start + timedelta(hours=i),
                        i,
                    )
                    await asyncio.sleep(0)

            async def maintain():
                for d in range(9):
                    async with pool.acquire() as con:
                        await partitions.maintain(
                            con, 36_500, ahead=0, today=date(2032, 1, 1) + timedelta(days=d)
                        )

            await asyncio.gather(insert(), maintain())
            async with pool.acquire() as con:
                await partitions.maintain(con, 36_500, ahead=0, today=date(2032, 1, 9))
                got = await con.fetch("SELECT measurement_id FROM measurements")
                in_default = await con.fetchval("SELECT count(*) FROM measurements_default")
            assert sorted(r["measurement_id"] for r in got) == sorted(ids)
            assert in_default == 0  # every day of the 200 hours has its partition now
        finally:
            await pool.close()

    run(go())


def test_migration_from_the_unpartitioned_table_keeps_every_row(scratch_db):
    async def go():
        old = Path(tempfile.mkdtemp())
        for path in sorted(MIGRATIONS.glob("*.sql")):
            if path.stem < "0003":
                shutil.copy(path, old)
        con = await asyncpg.connect(scratch_db)
        try:
            assert await migrate(con, old) == ["0001_measurements", "0002_experiments"]
            await con.execute("""
                INSERT INTO measurements (measurement_id, device_id, metric, value, unit,
                    measured_at, validated_event_id, source_partition, source_offset)
                SELECT gen_random_uuid(), 'dev-' || (i % 3), 'ph', i, 'pH',
                       '2026-02-27T20:00:00Z'::timestamptz + i * interval '37 minutes',
                       gen_random_uuid(), i % 6, i
                FROM generate_series(1, 500) AS i""")
            before = await con.fetch("SELECT * FROM measurements ORDER BY measurement_id")
            assert (await migrate(con))[0] == "0003_measurements_by_time"  # then any later ones
            after = await con.fetch("SELECT * FROM measurements ORDER BY measurement_id")
            assert [dict(r) for r in after] == [dict(r) for r in before]
            assert (
                await con.fetchval(
                    "SELECT relkind::text FROM pg_class WHERE relname = 'measurements'"
                )
                == "p"
            )
            days = await _partition_days(con)
            assert days == [date(2026, 2, 27) + timedelta(days=i) for i in range(len(days))]
            assert (
                len(days) == 14
                and await con.fetchval("SELECT count(*) FROM measurements_default") == 0
            )
            assert await con.fetchval("SELECT to_regclass('measurements_unpartitioned')") is None
        finally:
            await con.close()
            shutil.rmtree(old)

    run(go())


def test_the_bucket_query_reads_only_the_partitions_of_its_range(seeded, cfg):
    """Partition pruning as the API runs the query: a prepared statement whose generic plan
    prunes at executor start-up (`Subplans Removed`), only the range's day partition scanned."""

    async def go():
        con = await asyncpg.connect(cfg.postgres_api_dsn)
        try:
            await con.execute("SET plan_cache_mode = force_generic_plan")
            await con.execute(
                f"PREPARE q(text, text, timestamptz, timestamptz, bigint) AS "
                f"{series.QUERIES['p95']}"
            )
            lo, hi = T0 + timedelta(minutes=40), T0 + timedelta(minutes=80)  # 23:10 to 23:50
            return "\n".join(
                r[0]
                for r in await con.fetch(
                    f"EXPLAIN (ANALYZE, COSTS OFF) EXECUTE q('{DEVICE}', 'ph', '{lo.isoformat()}', "
                    f"'{hi.isoformat()}', 60000000)"
                )
            )
        finally:
            await con.close()

    plan = run(go())
    scanned = {
        p
        for p in ("measurements_p20260301", "measurements_p20260302", "measurements_default")
        if p in plan
    }
    assert scanned == {"measurements_p20260301"}, plan
    assert "Subplans Removed" in plan and "Index Only Scan" in plan, plan
