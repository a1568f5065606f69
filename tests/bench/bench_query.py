"""Query benchmark: a one-hour, 1-minute-bucketed series of one device and metric, over 10 million
stored readings, through `labbus api` (one uvicorn worker) driven by `hey`.

    .venv/bin/python tests/bench/bench_query.py [--readings 10000000] [--duration 20]

1. A database of its own (`labbus_bench_query_<run>`, dropped at the end, so the shared one is
   not bloated), migrated; a daily partition for every day of the data.
2. Bulk load, inside PostgreSQL: `INSERT ... SELECT` from `generate_series` (no rows travel
   from Python), in time order across devices as a live fleet writes them, in chunks with
   progress; then VACUUM ANALYZE (the visibility map makes the aggregate an index-only scan).
   Default: 250 devices x 2 metrics, one reading every 10 s per metric, ending now: 20,000
   readings per series over 55.6 hours (3-4 daily partitions).
3. Sizes per partition (table and each index) and the plan of the query (EXPLAIN ANALYZE of the
   API's prepared statement, generic plan: partition pruning at executor start-up).
4. `labbus api` on a free port with the SELECT-only role; `hey` (installed with `go install
   github.com/rakyll/hey@latest` into LABBUS_HOME/bin when missing) warms it up, then runs
   closed-loop at several concurrencies and open-loop at 1,000 requests/s; p50/p99 and
   requests/s of each run. Targets: p99 < 25 ms and >= 1,000 requests/s.
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
from datetime import UTC, datetime, timedelta
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
from labbus.projections.migrate import migrate  # noqa: E402
from tests.conftest import free_port, wait_for  # noqa: E402

LOAD = """
INSERT INTO measurements (measurement_id, device_id, metric, value, unit, measured_at,
                          validated_event_id, source_partition, source_offset, projected_at)
SELECT gen_random_uuid(), 'bench-' || lpad(d::text, 4, '0'), m.metric,
       m.base + 2 * sin(t / 600.0 + d) + random(), m.unit,
       $1::timestamptz + t * interval '1 second', gen_random_uuid(), d % 6, t, now()
FROM generate_series($2::bigint, $3::bigint, $4::bigint) AS t,
     generate_series(0, $5::int - 1) AS d,
     (VALUES ('ph', 'pH', 7.0), ('temperature', 'degC', 25.0)) AS m(metric, unit, base)
"""


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


async def load(dsn: str, readings: int, devices: int, every_s: int, end: datetime) -> datetime:
    """Bulk-load `readings` rows ending at `end`; returns the first reading's time."""
    per_series = readings // (devices * 2)
    start = end - timedelta(seconds=per_series * every_s)
    con = await asyncpg.connect(dsn)
    try:
        await migrate(con)
        day = start.date()
        while day <= end.date():
            await con.fetchrow("SELECT * FROM labbus_measurements_partition($1)", day)
            day += timedelta(days=1)
        await con.execute("SET synchronous_commit = off")
        steps = per_series
        chunk = max(1, 1_000_000 // (devices * 2))  # about a million rows per statement
        began = time.monotonic()
        done = 0
        for first in range(0, steps, chunk):
            last = min(steps, first + chunk) - 1
            await con.execute(LOAD, start, first * every_s, last * every_s, every_s, devices)
            done += (last - first + 1) * devices * 2
            rate = done / (time.monotonic() - began)
            print(
                f"\r  loaded {done:,} / {steps * devices * 2:,} readings ({rate:,.0f}/s)",
                end="",
                flush=True,
            )
        print(f"\n  load took {time.monotonic() - began:.0f} s; VACUUM ANALYZE ...", flush=True)
        began = time.monotonic()
        await con.execute("VACUUM ANALYZE measurements")
        print(f"  VACUUM ANALYZE took {time.monotonic() - began:.0f} s")
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
        help="Measure a database kept by an earlier --keep run (no load); kept.",
    )
    args = ap.parse_args()

    base = config.load()
    hey = hey_binary(base.home)
    name = args.reuse or f"labbus_bench_query_{uuid.uuid4().hex[:6]}"
    dsn = postgres.create_database(base, name)  # no-op for an existing one
    args.keep = args.keep or bool(args.reuse)
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
            start = asyncio.run(load(dsn, args.readings, args.devices, args.every, end))
        table = asyncio.run(sizes(dsn))
        total_rows = sum(r["rows"] for r in table)
        print(f"\n{total_rows:,} rows in {len(table)} partitions (reltuples):")
        index_bytes = 0
        for r in table:
            idx = json.loads(r["indexes"])
            index_bytes += sum(idx.values())
            print(
                f"  {r['partition']:28} {r['rows']:>12,} rows  heap {mib(r['heap']):>12}  "
                + "  ".join(f"{k.split('_', 2)[-1][:40]} {mib(v)}" for k, v in idx.items())
            )
        heap = sum(r["heap"] for r in table)
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
        print("\nEXPLAIN ANALYZE of the bucketed query (generic plan, as the API runs it):")
        print(asyncio.run(explain(dsn, device, q_from, q_to)))

        port = free_port()
        env = dict(
            os.environ,
            LABBUS_POSTGRES_DSN=dsn,
            LABBUS_POSTGRES_API_DSN=api_dsn,
            LABBUS_LOG_LEVEL="WARNING",
        )
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
        body = httpx.get(url).json()
        counts = [b["count"] for b in body["items"]]
        assert len(counts) == 60 and sum(counts) == 3600 // args.every, (len(counts), sum(counts))
        print(f"\nGET {url.removeprefix(base_url)}\n  -> 60 buckets, {sum(counts)} readings")
        run_hey(hey, url, "-z", "5s", "-c", "8")  # warm-up: statement caches, pool, buffers

        def backends() -> list[int]:
            return asyncio.run(backend_pids(dsn, name))

        cpu = {"api_pid": proc.pid, "pg_pids": backends}
        results = []
        for c in (int(x) for x in args.concurrency.split(",")):
            r = run_hey(hey, url, "-z", f"{args.duration}s", "-c", str(c), **cpu)
            results.append((f"closed loop, {c} connections", r))
        r = run_hey(hey, url, "-z", f"{args.duration}s", "-c", "10", "-q", "100", **cpu)
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
