"""Time partitions of `measurements` (migration 0003): created ahead, dropped after the retention.

One partition per UTC day, `measurements_pYYYYMMDD`, plus `measurements_default` for readings of
days without one. Why daily: a day is the retention's unit, so a whole partition is dropped
(no DELETE, no bloat); a bucketed range query of minutes or hours touches one partition (two
across midnight); at 1,000 readings/s a day is 86 million rows, the size at which one partition's
indexes still fit a few GiB; and a year is 365 partitions, few enough for the planner when a query
cannot prune (weekly partitions would make a one-hour query scan a week's index, hourly ones
8,760 partitions a year).

`maintain` does, under the writer role:
- create the partitions of yesterday, today and `ahead` days ahead (a late reading of yesterday
  and a week of maintenance outage land in a partition, not in the default);
- give a partition of its own to every day of the retention window that holds rows in the
  default partition (moving them; a reading of a day not yet created, far ahead, waits there);
- drop the partitions of days wholly older than the retention, and delete such rows from the
  default partition.

The PostgreSQL projector runs it at start and every hour; `labbus db partitions` runs it by hand.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import asyncpg

PREFIX = "measurements_p"
DEFAULT = "measurements_default"
AHEAD_DAYS = 7
INTERVAL_S = 3600.0  # how often the projector runs maintenance
_NAME = re.compile(PREFIX + r"(\d{8})")
log = logging.getLogger(__name__)


def partition_name(day: date) -> str:
    return f"{PREFIX}{day:%Y%m%d}"


def day_of(name: str) -> date | None:
    m = _NAME.fullmatch(name)
    return datetime.strptime(m[1], "%Y%m%d").date() if m else None


@dataclass(frozen=True)
class Plan:
    create: list[date] = field(default_factory=list)
    drop: list[date] = field(default_factory=list)
    cutoff: date | None = None  # readings before this day's midnight (UTC) are past retention


def plan(
    today: date, existing: set[date], default_days: set[date], ahead: int, retention_days: int
) -> Plan:
    """What maintenance does, as a pure function of what exists.

    `existing`: days that have a partition; `default_days`: days with rows in the default
    partition. Keeps the last `retention_days` days (today counts as one): with 30, on March 31
    the partitions from March 2 on stay."""
    cutoff = today - timedelta(days=retention_days - 1)
    wanted = {today + timedelta(days=i) for i in range(-1, ahead + 1)}
    wanted |= {d for d in default_days if d <= today + timedelta(days=ahead)}
    create = sorted(d for d in wanted - existing if d >= cutoff)
    drop = sorted(d for d in existing if d < cutoff)
    return Plan(create=create, drop=drop, cutoff=cutoff)


@dataclass
class Report:
    created: list[tuple[str, int]] = field(default_factory=list)  # (partition, rows moved)
    dropped: list[tuple[str, int]] = field(default_factory=list)  # (partition, rows it held)
    deleted_from_default: int = 0
    partitions: int = 0  # day partitions after maintenance


async def existing_days(con: asyncpg.Connection) -> set[date]:
    rows = await con.fetch("""SELECT c.relname FROM pg_inherits i
                              JOIN pg_class c ON c.oid = i.inhrelid
                              WHERE i.inhparent = 'measurements'::regclass""")
    return {d for r in rows if (d := day_of(r["relname"])) is not None}


def midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


async def default_days(con: asyncpg.Connection, first: date, last: date) -> set[date]:
    """Days from `first` to `last` (inclusive) with rows in the default partition."""
    rows = await con.fetch(
        f"""SELECT DISTINCT (measured_at AT TIME ZONE 'UTC')::date AS day
                               FROM {DEFAULT} WHERE measured_at >= $1 AND measured_at < $2""",
        midnight(first),
        midnight(last + timedelta(days=1)),
    )
    return {r["day"] for r in rows}


async def maintain(
    con: asyncpg.Connection,
    retention_days: int,
    ahead: int = AHEAD_DAYS,
    today: date | None = None,
    dry_run: bool = False,
    echo: Callable[[str], None] = lambda _m: None,
) -> Report:
    """Create, split out and drop partitions (see the module docstring); each step is its own
    short transaction, so inserts wait at most for one partition's move."""
    today = today or datetime.now(UTC).date()
    window = plan(today, set(), set(), ahead, retention_days)
    strays = await default_days(con, window.cutoff, today + timedelta(days=ahead))
    p = plan(today, await existing_days(con), strays, ahead, retention_days)
    report = Report()
    verb = "would " if dry_run else ""
    for i, day in enumerate(p.create, 1):
        name = partition_name(day)
        moved = 0
        if not dry_run:
            async with con.transaction():
                row = await con.fetchrow("SELECT * FROM labbus_measurements_partition($1)", day)
            if row["created"] is None:  # another maintainer made it meanwhile
                continue
            moved = row["moved"]
        report.created.append((name, moved))
        echo(
            f"[{i}/{len(p.create)}] {verb}create {name}"
            + (f" (moved {moved:,} rows out of {DEFAULT})" if moved else "")
        )
    for i, day in enumerate(p.drop, 1):
        name = partition_name(day)
        rows = (
            await con.fetchval(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1)", name
            )
            or 0
        )
        if rows < 0:  # never analyzed (so recently filled and small): count it
            rows = await con.fetchval(f'SELECT count(*) FROM "{name}"')
        if not dry_run:
            async with con.transaction():
                await con.execute("LOCK TABLE measurements IN SHARE UPDATE EXCLUSIVE MODE")
                await con.execute(f'DROP TABLE IF EXISTS "{name}"')
        report.dropped.append((name, rows))
        echo(
            f"[{i}/{len(p.drop)}] {verb}drop {name} (about {rows:,} rows, "
            f"older than {retention_days} days)"
        )
    cutoff = midnight(p.cutoff)
    if dry_run:
        report.deleted_from_default = await con.fetchval(
            f"SELECT count(*) FROM {DEFAULT} WHERE measured_at < $1", cutoff
        )
    else:
        status = await con.execute(f"DELETE FROM {DEFAULT} WHERE measured_at < $1", cutoff)
        report.deleted_from_default = int(status.split()[-1])
    if report.deleted_from_default:
        echo(
            f"{verb}delete {report.deleted_from_default:,} rows older than {p.cutoff} "
            f"from {DEFAULT}"
        )
    report.partitions = len(await existing_days(con))
    return report


async def run_periodically(
    pool: asyncpg.Pool,
    retention_days: int,
    interval_s: float = INTERVAL_S,
    first_delay: float = 0.0,
) -> None:
    """The projector's maintenance loop: after `first_delay`, then every `interval_s`. A failure
    is logged and retried at the next round (partitions exist `AHEAD_DAYS` ahead, and the
    default partition takes whatever has none meanwhile)."""
    await asyncio.sleep(first_delay)
    while True:
        try:
            async with pool.acquire() as con:
                report = await maintain(con, retention_days)
            if report.created or report.dropped or report.deleted_from_default:
                log.info(
                    "measurement partitions maintained",
                    extra={
                        "created": [n for n, _ in report.created],
                        "dropped": [n for n, _ in report.dropped],
                        "deleted_from_default": report.deleted_from_default,
                    },
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the projector must go on; the next round retries
            log.warning(
                "measurement partition maintenance failed; retrying in %.0f s",
                interval_s,
                extra={"error": repr(exc)},
            )
        await asyncio.sleep(interval_s)
