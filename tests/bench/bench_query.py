"""Query benchmark: a one-hour, 1-minute-bucketed series of one device and metric, over 10 million
stored readings, through `labbus api` (one uvicorn worker) driven by `hey`.

    .venv/bin/python tests/bench/bench_query.py [--readings 10000000] [--duration 20]
        [--devices 250] [--every 10] [--load live|bulk]
    nice -n 10 .venv/bin/python tests/bench/bench_query.py --readings 100000000 --devices 5000 \
        --load bulk

1. A database of its own (`labbus_bench_query_<run>`, dropped at the end, so the shared one is
   not bloated), migrated. Before loading, the free space of the PostgreSQL data directory's
   disk is checked: the bench refuses to start when the estimated size (420 B a row, as written
   live at 10 M rows, plus twice max_wal_size) would leave less than 10 GiB free, and stops (and
   drops its database) when the free space falls under 5 GiB while loading.
2. Bulk load, inside PostgreSQL: `INSERT ... SELECT` from `generate_series` (no rows travel
   from Python), in time order across devices as a live fleet writes them, in chunks with
   progress; then VACUUM ANALYZE (the visibility map makes the aggregate an index-only scan).
   Default: 250 devices x 2 metrics, one reading every 10 s per metric, ending now: 20,000
   readings per series over 55.6 hours (3-4 daily partitions). Two ways (`--load`):
   - `live` (default): into `measurements` with its indexes, a daily partition created first
     for every day of the data: the indexes grow as a live fleet's inserts grow them;
   - `bulk`: how an import of closed days is done: per day, a table like `measurements` (no
     indexes) filled in time order, then the parent's indexes and primary key created on it
     (sorted builds, packed leaves), then ATTACHed as that day's partition (a CHECK constraint
     proves its range, so ATTACH does not scan it; the indexes are matched, not rebuilt).
   The table definition is the API's either way (migrations; the attach checks every index).
   The bench's PostgreSQL backends get the bench's niceness (under `nice -n 10` the SQL work
   yields to other users too, when the server runs on this machine and we may renice it).
3. Sizes per partition (table and each index) and the plan of the query (EXPLAIN ANALYZE of the
   API's prepared statement, generic plan: partition pruning at executor start-up), twice: the
   first run reads what the load left out of PostgreSQL's buffers.
4. `labbus api` on a free port with the SELECT-only role, trusting a stand-in OpenID provider on
   loopback (tests/support/idp.py) whose viewer's token every request carries (the token check
   costs these reads nothing measurable: tests/bench/bench_auth.py); `hey` (installed with
   `go install github.com/rakyll/hey@latest` into LABBUS_HOME/bin when missing) warms it up,
   then runs closed-loop at several concurrencies and open-loop at 1,000 requests/s; p50/p99
   and requests/s of each run. Targets: p99 < 25 ms and >= 1,000 requests/s.
5. Unless the database is kept: the retention at that size, the projector's partition
   maintenance (`projections/partitions.py`) with a retention that drops the oldest day, timed,
   with the disk space it gives back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from labbus.api import series  # noqa: E402
from labbus.deploy.demo import LABBUS  # noqa: E402
from labbus.deploy.local import postgres  # noqa: E402
from labbus.events import config  # noqa: E402
from labbus.projections import partitions  # noqa: E402
from labbus.projections.migrate import migrate  # noqa: E402
from tests.conftest import free_port, wait_for  # noqa: E402
from tests.support.idp import Tokens  # noqa: E402

LOAD = """
INSERT INTO {table} (measurement_id, device_id, metric, value, unit, measured_at,
                          validated_event_id, source_partition, source_offset, projected_at)
SELECT gen_random_uuid(), 'bench-' || lpad(d::text, 4, '0'), m.metric,
       m.base + 2 * sin(t / 600.0 + d) + random(), m.unit,
       $1::timestamptz + t * interval '1 second', gen_random_uuid(), d % 6, t, now()
FROM generate_series($2::bigint, $3::bigint, $4::bigint) AS t,
     generate_series(0, $5::int - 1) AS d,
     (VALUES ('ph', 'pH', 7.0), ('temperature', 'degC', 25.0)) AS m(metric, unit, base)
"""

GIB = 2**30
ROW_BYTES = 420  # heap 130 + indexes 287 B a row, measured at 10 M rows loaded `live`
MIN_FREE = 10 * GIB  # free space the bench must leave on the disk of PostgreSQL's data
STOP_FREE = 5 * GIB  # the load stops (and the database is dropped) under this


def data_directory(base: config.Config, dsn: str) -> Path | None:
    """PostgreSQL's data directory when it is on this machine: the local server's (`labbus
    services`), else `SHOW data_directory` when the role may read it and the path exists here."""
    if not base.explicitly_set(postgres.SETTING):
        local = postgres.server_dir(base.home) / "data"
        if local.exists():
            return local

    async def show() -> str | None:
        con = await asyncpg.connect(dsn)
        try:
            return await con.fetchval("SHOW data_directory")
        except asyncpg.InsufficientPrivilegeError:
            return None
        finally:
            await con.close()

    shown = asyncio.run(show())
    return Path(shown) if shown and Path(shown).exists() else None


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_disk(base: config.Config, readings: int, skip: bool) -> Path | None:
    """Refuses to start (exits naming the need) when loading `readings` rows would leave less
    than MIN_FREE on the disk of PostgreSQL's data. The estimate: ROW_BYTES a row (the `live`
    load's; `bulk` packs its indexes to ~60 % of that, which covers its index builds' temporary
    sort files) plus twice max_wal_size (WAL outgrows it between checkpoints)."""
    data = data_directory(base, base.postgres_dsn)
    if data is None:
        if skip:
            print("free space NOT checked (--no-disk-check): PostgreSQL's data is not here")
            return None
        sys.exit(
            "cannot check the free space for the load: PostgreSQL's data directory is not on "
            "this machine (or not readable); check it by hand, then rerun with --no-disk-check"
        )

    async def wal() -> int:
        con = await asyncpg.connect(base.postgres_dsn)
        try:
            return await con.fetchval("SELECT pg_size_bytes(current_setting('max_wal_size'))")
        finally:
            await con.close()

    max_wal = asyncio.run(wal())
    need = readings * ROW_BYTES + 2 * max_wal
    free = free_bytes(data)
    print(
        f"disk of {data}: {free / GIB:,.1f} GiB free; the load needs about {need / GIB:,.1f} "
        f"GiB ({readings:,} x {ROW_BYTES} B + 2 x max_wal_size {max_wal / GIB:.1f} GiB), "
        f"leaving {(free - need) / GIB:,.1f} GiB (at least {MIN_FREE / GIB:.0f} GiB must stay free)"
    )
    if free - need < MIN_FREE:
        sys.exit(
            f"refusing to load {readings:,} readings: they need about {need / GIB:,.1f} GiB on "
            f"the disk of {data} and only {free / GIB:,.1f} GiB are free; at least "
            f"{(need + MIN_FREE) / GIB:,.1f} GiB free are needed (the estimate plus "
            f"{MIN_FREE / GIB:.0f} GiB left for everyone else). Free space, or load fewer "
            "--readings."
        )
    return data


def share_niceness(pids: list[int]) -> list[int]:
    """Give PostgreSQL backends of this bench (a local server's processes) this process's
    niceness, so that `nice -n 10` covers the SQL work too; returns the pids reniced."""
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    done = []
    for pid in pids:
        try:
            if "postgres" not in psutil.Process(pid).name():
                continue
            if os.getpriority(os.PRIO_PROCESS, pid) < mine:
                os.setpriority(os.PRIO_PROCESS, pid, mine)
                done.append(pid)
        except (psutil.Error, OSError):  # not here, gone, or not ours to renice
            pass
    return done


def hey_binary(home: Path) -> str:
    """`hey` on PATH or in LABBUS_HOME/bin; installed there with `go install` when missing."""
    found = shutil.which("hey") or (
        str(home / "bin" / "hey") if (home / "bin" / "hey").exists() else None
    )
    if found:
        return found
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not Path(go).exists():
        sys.exit(
            "hey is not installed and there is no Go toolchain to install it: install Go, "
            "or put hey (https://github.com/rakyll/hey) on PATH"
        )
    (home / "bin").mkdir(parents=True, exist_ok=True)
    print(f"installing hey into {home / 'bin'} (go install github.com/rakyll/hey@latest)")
    subprocess.run(
        [go, "install", "github.com/rakyll/hey@latest"],
        check=True,
        env={**os.environ, "GOBIN": str(home / "bin")},
    )
    return str(home / "bin" / "hey")


def parse_hey(output: str) -> dict:
    def seconds(label: str) -> float:
        m = re.search(rf"\b{label}%+ in ([0-9.]+) secs", output)
        return float(m[1]) * 1000 if m else float("nan")

    rps = re.search(r"Requests/sec:\s+([0-9.]+)", output)
    codes = dict(re.findall(r"\[(\d{3})\]\s+(\d+) responses", output))
    errors = re.search(r"Error distribution:(.*)", output, re.S)
    return {
        "rps": float(rps[1]) if rps else 0.0,
        "p50": seconds("50"),
        "p90": seconds("90"),
        "p99": seconds("99"),
        "codes": codes,
        "errors": errors[1].strip() if errors else "",
    }


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_hey(hey: str, url: str, *args: str, api_pid: int = 0, pg_pids=lambda: []) -> dict:
    """One hey run; with the CPU seconds the API worker and the PostgreSQL backends of the
    bench database spent per request (a figure other users of the machine move less)."""
    pids = pg_pids()
    before = cpu_seconds([api_pid]), cpu_seconds(pids)
    out = subprocess.run([hey, *args, url], capture_output=True, text=True, check=True).stdout
    pids_after = pg_pids()
    after = cpu_seconds([api_pid]), cpu_seconds(pids_after)
    r = parse_hey(out)
    n = sum(int(v) for v in r["codes"].values()) or 1
    r["api_us"] = (after[0] - before[0]) / n * 1e6
    r["pg_us"] = (after[1] - before[1]) / n * 1e6 if pids == pids_after else float("nan")
    return r


def day_steps(start: datetime, steps: int, every_s: int) -> list[tuple[date, int, int]]:
    """The readings' time steps (step i at start + i * every_s, 0 <= i < steps) grouped by UTC
    day: (day, first step, last step)."""
    out = []
    first = 0
    while first < steps:
        at = start + timedelta(seconds=first * every_s)
        after = partitions.midnight(at.date() + timedelta(days=1))
        last = min(steps, -(-int((after - start).total_seconds()) // every_s)) - 1
        out.append((at.date(), first, last))
        first = last + 1
    return out


class Progress:
    def __init__(self, total: int, free_of: Path | None) -> None:
        self.total, self.done, self.free_of = total, 0, free_of
        self.began = time.monotonic()

    def add(self, rows: int, what: str) -> None:
        self.done += rows
        rate = self.done / (time.monotonic() - self.began)
        print(
            f"\r  {what}: loaded {self.done:,} / {self.total:,} readings ({rate:,.0f}/s)",
            end="",
            flush=True,
        )
        if self.free_of is not None and (free := free_bytes(self.free_of)) < STOP_FREE:
            sys.exit(
                f"\nstopping the load: {free / GIB:.1f} GiB free on the disk of {self.free_of}, "
                f"under {STOP_FREE / GIB:.0f} GiB (other users' files grow too)"
            )


async def fill(
    con: asyncpg.Connection,
    table: str,
    start: datetime,
    first: int,
    last: int,
    every_s: int,
    devices: int,
    progress: Progress,
    what: str,
) -> None:
    """Steps first..last of every series into `table`, in time order, ~a million rows a chunk."""
    chunk = max(1, 1_000_000 // (devices * 2))
    sql = LOAD.format(table=table)
    for lo in range(first, last + 1, chunk):
        hi = min(last, lo + chunk - 1)
        await con.execute(sql, start, lo * every_s, hi * every_s, every_s, devices)
        progress.add((hi - lo + 1) * devices * 2, what)


async def parent_indexes(con: asyncpg.Connection, table: str) -> list[str]:
    """The statements that give `table` the indexes and primary key of `measurements`, as the
    migrations defined them (so ATTACH PARTITION finds and attaches them)."""
    rows = await con.fetch("""
        SELECT pg_get_indexdef(x.indexrelid) AS index, pg_get_constraintdef(c.oid) AS constraint
        FROM pg_index x
        LEFT JOIN pg_constraint c ON c.conindid = x.indexrelid AND c.conrelid = x.indrelid
        WHERE x.indrelid = 'measurements'::regclass ORDER BY x.indexrelid""")
    out = []
    for r in rows:
        if r["constraint"]:
            out.append(f'ALTER TABLE "{table}" ADD {r["constraint"]}')
        else:
            sql, n = re.subn(
                r"^CREATE (UNIQUE )?INDEX \S+ ON ONLY \S+ ",
                lambda m: f'CREATE {m[1] or ""}INDEX ON "{table}" ',
                r["index"],
            )
            assert n == 1, r["index"]
            out.append(sql)
    return out


async def bulk_day(
    con: asyncpg.Connection,
    day: date,
    start: datetime,
    first: int,
    last: int,
    every_s: int,
    devices: int,
    progress: Progress,
) -> None:
    """One closed day as a bulk import does it: heap in time order, then the indexes (sorted
    builds), then ATTACH as the day's partition."""
    name = partitions.partition_name(day)
    lo = partitions.midnight(day)
    hi = partitions.midnight(day + timedelta(days=1))
    began = time.monotonic()
    await con.execute(f'CREATE TABLE "{name}" (LIKE measurements INCLUDING DEFAULTS)')
    # the load's own VACUUM does autovacuum's work; reset when the load is done
    await con.execute(f'ALTER TABLE "{name}" SET (autovacuum_enabled = off)')
    await fill(con, f'"{name}"', start, first, last, every_s, devices, progress, str(day))
    took = [f"heap {time.monotonic() - began:.0f} s"]
    for sql in await parent_indexes(con, name):
        t = time.monotonic()
        await con.execute(sql)
        what = "primary key" if " ADD " in sql else "index (" + sql.split(" (", 1)[1]
        took.append(f"{what} {time.monotonic() - t:.0f} s")
    t = time.monotonic()
    range_ = f"measured_at >= '{lo.isoformat()}' AND measured_at < '{hi.isoformat()}'"
    await con.execute(f'ALTER TABLE "{name}" ADD CONSTRAINT "{name}_range" CHECK ({range_})')
    await con.execute(
        f'ALTER TABLE measurements ATTACH PARTITION "{name}" '
        f"FOR VALUES FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')"
    )
    await con.execute(f'ALTER TABLE "{name}" DROP CONSTRAINT "{name}_range"')
    # every index of the partition is one of the parent's (none built anew by ATTACH)
    mine, attached, wanted = await con.fetchrow(
        """SELECT (SELECT count(*) FROM pg_index WHERE indrelid = $1::regclass),
                  (SELECT count(*) FROM pg_index x JOIN pg_inherits i ON i.inhrelid = x.indexrelid
                   WHERE x.indrelid = $1::regclass),
                  (SELECT count(*) FROM pg_index WHERE indrelid = 'measurements'::regclass)""",
        name,
    )
    assert mine == attached == wanted, (name, mine, attached, wanted)
    took.append(f"attach {time.monotonic() - t:.1f} s")
    print(f"\n  {name}: " + ", ".join(took), flush=True)


async def vacuum(con: asyncpg.Connection) -> None:
    """VACUUM ANALYZE, until every partition's pages are all-visible (index-only scans without
    heap fetches): a page stays not all-visible while a snapshot older than its rows is held in
    the database (an autovacuum ANALYZE, for one) or their asynchronous commit is not flushed."""
    await con.execute("VACUUM ANALYZE measurements")
    for _ in range(6):
        lagging = await con.fetch("""
            SELECT c.relname, c.relpages, c.relallvisible FROM pg_inherits i
            JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'measurements'::regclass AND c.relallvisible < c.relpages""")
        if not lagging:
            break
        print(
            "  not all-visible yet: "
            + ", ".join(f"{r['relname']} {r['relallvisible']}/{r['relpages']}" for r in lagging)
            + "; VACUUM again in 10 s"
        )
        await asyncio.sleep(10)
        for r in lagging:
            await con.execute(f'VACUUM "{r["relname"]}"')
    for r in await con.fetch("""
            SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'measurements'::regclass
              AND 'autovacuum_enabled=off' = ANY(c.reloptions)"""):
        await con.execute(f'ALTER TABLE "{r["relname"]}" RESET (autovacuum_enabled)')


async def load(
    dsn: str,
    readings: int,
    devices: int,
    every_s: int,
    end: datetime,
    mode: str = "live",
    free_of: Path | None = None,
) -> datetime:
    """Bulk-load `readings` rows ending at `end` (`mode`: see the module docstring); returns the
    first reading's time."""
    per_series = readings // (devices * 2)
    start = end - timedelta(seconds=per_series * every_s)
    days = day_steps(start, per_series, every_s)
    con = await asyncpg.connect(dsn)
    try:
        await migrate(con)
        reniced = share_niceness([await con.fetchval("SELECT pg_backend_pid()")])
        nice = f"reniced to {os.getpriority(os.PRIO_PROCESS, 0)}" if reniced else "not reniced"
        print(
            f"  load: {mode}, {len(days)} days, {devices} devices x 2 metrics every {every_s} s; "
            f"its PostgreSQL backend {nice}"
        )
        await con.execute("SET synchronous_commit = off")
        progress = Progress(per_series * devices * 2, free_of)
        began = time.monotonic()
        if mode == "live":
            for day, _, _ in days:
                await con.fetchrow("SELECT * FROM labbus_measurements_partition($1)", day)
            await fill(con, "measurements", start, 0, per_series - 1, every_s, devices, progress,
                       "measurements")
        else:
            # the index builds in this backend only (no parallel workers: they would not share
            # its niceness; the machine's other users keep their core)
            await con.execute("SET max_parallel_maintenance_workers = 0")
            await con.execute("SET maintenance_work_mem = '1GB'")
            for day, first, last in days:
                await bulk_day(con, day, start, first, last, every_s, devices, progress)
        took = time.monotonic() - began
        print(
            f"\n  load took {took:.0f} s ({progress.done / took:,.0f} readings/s); "
            f"VACUUM ANALYZE ...",
            flush=True,
        )
        began = time.monotonic()
        await vacuum(con)
        print(
            f"  VACUUM ANALYZE took {time.monotonic() - began:.0f} s; load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
    finally:
        await con.close()
    return start


async def backend_pids(dsn: str, database: str) -> list[int]:
    """The PostgreSQL backends serving the bench database, except this query's own."""
    con = await asyncpg.connect(dsn)
    try:
        rows = await con.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
        return sorted(r["pid"] for r in rows)
    finally:
        await con.close()


async def stored_range(dsn: str) -> tuple[datetime, datetime]:
    con = await asyncpg.connect(dsn)
    try:
        row = await con.fetchrow("SELECT min(measured_at), max(measured_at) FROM measurements")
        return row[0], row[1]
    finally:
        await con.close()


async def sizes(dsn: str) -> list[dict]:
    con = await asyncpg.connect(dsn)
    try:
        return [
            dict(r)
            for r in await con.fetch("""
            SELECT c.relname AS partition, c.reltuples::bigint AS rows,
                   pg_relation_size(c.oid) AS heap,
                   (SELECT coalesce(json_object_agg(ic.relname, pg_relation_size(ic.oid)), '{}')
                    FROM pg_index x JOIN pg_class ic ON ic.oid = x.indexrelid
                    WHERE x.indrelid = c.oid)::text AS indexes
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'measurements'::regclass ORDER BY c.relname""")
        ]
    finally:
        await con.close()


async def explain(dsn: str, device: str, from_: datetime, to: datetime) -> str:
    con = await asyncpg.connect(dsn)
    try:
        await con.execute("SET plan_cache_mode = force_generic_plan")
        await con.execute(
            "PREPARE q(text, text, timestamptz, timestamptz, bigint) AS " + series.QUERIES["avg"]
        )
        rows = await con.fetch(
            f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE q('{device}', 'ph', "
            f"'{from_.isoformat()}', '{to.isoformat()}', 60000000)"
        )
        return "\n".join(r[0] for r in rows)
    finally:
        await con.close()


async def probe(dsn: str, at: datetime, stop: asyncio.Event) -> list[float]:
    """A reader meanwhile: one minute of one series (a later day's partition) every 20 ms;
    the latency of each query in seconds."""
    con = await asyncpg.connect(dsn)
    out = []
    try:
        while not stop.is_set():
            t = time.monotonic()
            await con.fetchval(
                "SELECT count(*) FROM measurements WHERE device_id = 'bench-0007' AND metric = "
                "'ph' AND measured_at >= $1 AND measured_at < $1 + interval '1 minute'",
                at,
            )
            out.append(time.monotonic() - t)
            await asyncio.sleep(0.02)
    finally:
        await con.close()
    return out


async def retention(dsn: str, end: datetime, table: list[dict], free_of: Path | None) -> None:
    """The projector's partition maintenance with a retention that drops the oldest day: what
    the retention setting does at this size (before the database is dropped anyway), and how
    long a reader of the table waits meanwhile."""
    today = end.date()
    con = await asyncpg.connect(dsn)
    try:
        oldest = min(await partitions.existing_days(con))
        if oldest >= today:
            return
        days = (today - oldest).days  # keeps oldest + 1 .. today
        victim = partitions.partition_name(oldest)
        size = next(
            (r["heap"] + sum(json.loads(r["indexes"]).values()) for r in table
             if r["partition"] == victim),
            0,
        )
        free = free_bytes(free_of) if free_of else None
        print(f"\nretention: partitions.maintain(retention_days={days}), today {today}:")
        stop = asyncio.Event()
        reader = asyncio.create_task(probe(dsn, end - timedelta(hours=1), stop))
        await asyncio.sleep(1)
        began = time.monotonic()
        report = await partitions.maintain(
            con, days, today=today, echo=lambda m: print(f"  {time.monotonic() - began:6.2f} s {m}")
        )
        took = time.monotonic() - began
        await asyncio.sleep(1)
        stop.set()
        waits = sorted(await reader)
        print(
            f"  a reader meanwhile (one series' minute, every 20 ms): {len(waits)} queries, "
            f"median {waits[len(waits) // 2] * 1000:.1f} ms, longest {waits[-1] * 1000:,.0f} ms"
        )
        dropped = ", ".join(f"{n} ({rows:,} rows)" for n, rows in report.dropped)
        print(f"  took {took:.2f} s in all; dropped {dropped}: {mib(size)} of table and indexes")
        if free is not None:
            print(f"  disk free {free / GIB:,.1f} -> {free_bytes(free_of) / GIB:,.1f} GiB")
    finally:
        await con.close()


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readings", type=int, default=10_000_000)
    ap.add_argument("--devices", type=int, default=250)
    ap.add_argument("--every", type=int, default=10, help="Seconds between readings per metric.")
    ap.add_argument("--duration", type=int, default=20, help="Seconds per hey run.")
    ap.add_argument("--concurrency", default="4,8,16", help="hey -c values (closed loop).")
    ap.add_argument("--keep", action="store_true", help="Keep the database (for EXPLAIN by hand).")
    ap.add_argument(
        "--reuse",
        metavar="DATABASE",
        help="Measure a database kept by an earlier --keep run (no load); kept unless --drop.",
    )
    ap.add_argument(
        "--drop",
        action="store_true",
        help="With --reuse: the retention step, then drop the database.",
    )
    ap.add_argument(
        "--load",
        choices=("live", "bulk"),
        default="live",
        help="live: into the partitioned table with its indexes; bulk: per day, heap, then "
        "indexes, then ATTACH (see the module docstring).",
    )
    ap.add_argument(
        "--no-disk-check",
        action="store_true",
        help="Load even when PostgreSQL's free space cannot be checked from here.",
    )
    args = ap.parse_args()

    base = config.load()
    hey = hey_binary(base.home)
    free_of = (
        data_directory(base, base.postgres_dsn)
        if args.reuse
        else check_disk(base, args.readings, args.no_disk_check)
    )
    name = args.reuse or f"labbus_bench_query_{uuid.uuid4().hex[:6]}"
    dsn = postgres.create_database(base, name)  # no-op for an existing one
    args.keep = args.keep or (bool(args.reuse) and not args.drop)
    api_dsn = postgres.with_database(base.postgres_api_dsn, name)
    print(
        f"database {name}; cpu count {os.cpu_count()}, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    proc = None
    try:
        if args.reuse:
            start, end = asyncio.run(stored_range(dsn))
        else:
            end = datetime.now(UTC).replace(second=0, microsecond=0)
            start = asyncio.run(
                load(dsn, args.readings, args.devices, args.every, end, args.load, free_of)
            )
        table = asyncio.run(sizes(dsn))
        total_rows = sum(r["rows"] for r in table)
        print(f"\n{total_rows:,} rows in {len(table)} partitions (reltuples):")
        index_bytes = 0
        for r in table:
            idx = json.loads(r["indexes"])
            index_bytes += sum(idx.values())
            print(
                f"  {r['partition']:28} {r['rows']:>12,} rows  heap {mib(r['heap']):>12}  "
                f"indexes {mib(sum(idx.values())):>12}: "
                + "  ".join(f"{k.split('_', 2)[-1][:40]} {mib(v)}" for k, v in idx.items())
            )
        heap = sum(r["heap"] for r in table)
        print(
            f"  {'total':28} {total_rows:>12,} rows  heap {mib(heap):>12}  "
            f"indexes {mib(index_bytes):>12}  (together {heap + index_bytes:,} B)"
        )
        if total_rows:
            print(
                f"per row: heap {heap / total_rows:.0f} B, indexes {index_bytes / total_rows:.0f} "
                f"B; at 100 million rows: heap {mib(heap / total_rows * 1e8)}, indexes "
                f"{mib(index_bytes / total_rows * 1e8)}"
            )

        device = "bench-0007"
        if end - start < timedelta(hours=2):
            sys.exit("the data spans under two hours: more --readings or a larger --every")
        q_from = (start + (end - start) / 2).replace(second=0, microsecond=0)  # mid-data hour
        q_to = q_from + timedelta(hours=1)
        for when in ("first run, after the load", "second run"):
            print(f"\nEXPLAIN ANALYZE of the bucketed query (generic plan, as the API runs it; "
                  f"{when}):")
            print(asyncio.run(explain(dsn, device, q_from, q_to)))

        port = free_port()
        tokens = Tokens()
        env = dict(
            os.environ,
            LABBUS_POSTGRES_DSN=dsn,
            LABBUS_POSTGRES_API_DSN=api_dsn,
            LABBUS_LOG_LEVEL="WARNING",
            **tokens.env,
        )
        bearer = f"Authorization: Bearer {tokens.token('bench-viewer', ('viewer',))}"
        log = open(Path("/tmp") / f"{name}-api.log", "w")
        proc = subprocess.Popen(
            [LABBUS, "api", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        base_url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ready(base_url), 60, "the API")
        url = (
            f"{base_url}/devices/{device}/measurements?metric=ph&bucket=1m&agg=avg"
            f"&from={q_from.strftime('%Y-%m-%dT%H:%M:%SZ')}"
            f"&to={q_to.strftime('%Y-%m-%dT%H:%M:%SZ')}"
        )
        body = httpx.get(url, headers=[tuple(bearer.split(": ", 1))]).json()
        counts = [b["count"] for b in body["items"]]
        assert len(counts) == 60 and sum(counts) == 3600 // args.every, (len(counts), sum(counts))
        print(f"\nGET {url.removeprefix(base_url)}\n  -> 60 buckets, {sum(counts)} readings")
        # warm-up: statement caches, pool, buffers
        run_hey(hey, url, "-z", "5s", "-c", "8", "-H", bearer)

        def backends() -> list[int]:
            return asyncio.run(backend_pids(dsn, name))

        reniced = share_niceness(backends())
        if reniced:
            print(f"  the API's PostgreSQL backends {reniced} reniced to the bench's niceness "
                  f"{os.getpriority(os.PRIO_PROCESS, 0)} (the API and hey inherit it)")
        cpu = {"api_pid": proc.pid, "pg_pids": backends}
        results = []
        for c in (int(x) for x in args.concurrency.split(",")):
            r = run_hey(hey, url, "-z", f"{args.duration}s", "-c", str(c), "-H", bearer, **cpu)
            results.append((f"closed loop, {c} connections", r))
        r = run_hey(hey, url, "-z", f"{args.duration}s", "-c", "10", "-q", "100", "-H", bearer,
                    **cpu)
        results.append(("open loop, 1,000 req/s (10 x 100)", r))
        print(
            f"\nhey, {args.duration} s each, one uvicorn worker "
            f"(load average now {os.getloadavg()[0]:.2f}):"
        )
        print(
            f"  {'run':38} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
            f"{'API µs':>8} {'PG µs':>7}  statuses (CPU per request)"
        )
        for label, r in results:
            print(
                f"  {label:38} {r['rps']:8,.0f} {r['p50']:8.1f} {r['p90']:8.1f} "
                f"{r['p99']:8.1f} {r['api_us']:8.0f} {r['pg_us']:7.0f}  {r['codes']} "
                f"{r['errors'][:80]}"
            )
        best = max(r["rps"] for _, r in results)
        met = [label for label, r in results if r["rps"] >= 1000 and r["p99"] < 25]
        verdict = "met by " + ", ".join(met) if met else "NOT met"
        print(f"\ntarget p99 < 25 ms at >= 1,000 req/s: {verdict} (best {best:,.0f} req/s)")
        if not args.keep:
            proc.terminate()
            proc.wait(15)
            proc = None
            asyncio.run(retention(dsn, end, table, free_of))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(15)
        if args.keep:
            print(f"kept database {name}: {dsn}")
        else:
            postgres.drop_database(base, name)
            print(f"dropped database {name}")


def _ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health/live", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
