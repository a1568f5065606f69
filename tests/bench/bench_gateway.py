"""gRPC gateway benchmark: N concurrent device streams (mutual TLS, one certificate each) from
one simulator process (or --sim-processes P sharing them), R readings/s each, through
`labbus gateway grpc` to Kafka (acks=all), and on through `labbus process validate` and
`labbus project postgres` into the `measurements` read model.

    .venv/bin/python tests/bench/bench_gateway.py [--devices 1000] [--rate 5] [--seconds 30]
        [--sim-processes 1] [--sample-every 20] [--poll-ms 25] [--without-pipeline]

Runs in a fresh namespace and PostgreSQL database against `labbus services up`'s services.
Measures, over the window after a warm-up:

- readings/s acknowledged by the gateway (an ack is sent only once the broker acknowledged the
  event) and device send -> gateway ack latency p50/p99 (the device's own clock, per reading);
- device send -> queryable in PostgreSQL, p50/p99, two ways, all on this machine's one clock
  (CLOCK_REALTIME: the simulator's time.time_ns(), PostgreSQL's clock_timestamp() and this
  process's time.time() read the same clock):
  * **visible** (the headline figure), for a sample — every `--sample-every`-th device (50 of
    1,000 by default, their every reading in the window): a poller in this process asks
    PostgreSQL every `--poll-ms` for those devices' rows newer than the newest it has seen of
    each (one index range scan per device). A row first returned by a query was committed before
    that query's snapshot and not yet at the previous one's, so latency = the time this query was
    sent - the reading's measured_at (the device's clock when it made and sent the reading; the
    gateway keeps it as the event time and the projector as measured_at). That over-states by
    up to one poll period (the measured mean period is printed); it never under-states, except
    by the microseconds between sending the query and PostgreSQL taking its snapshot;
  * **inserted**, for every reading made in the window: the row's projected_at (the
    projector's clock_timestamp() when the row was inserted) - measured_at. The row becomes
    visible only when the projector's transaction commits, a little later: a lower bound.
- readings/s that reached PostgreSQL (rows projected during the window, per second), the peak
  RSS of the gateway, validator and projector, their CPU, and the machine's load average.

`--without-pipeline` leaves the validator and projector out (the gateway -> broker figures
alone, as measured before they were added).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from labbus.events import kafka  # noqa: E402
from labbus.producers.gateway import devices as dev  # noqa: E402
from labbus.producers.gateway import gctune  # noqa: E402
from tests.bench.gwfleet import (  # noqa: E402
    Namespace,
    PeakRss,
    Simulators,
    cpu_s,
    machine,
    pct,
)


def _worker(conn, args, pki_dir: str, target: str, part: int, parts: int) -> None:
    """One simulator process driving every `parts`-th device from `part` (spawned)."""
    import uvloop

    uvloop.install()
    asyncio.run(_drive(conn, args, Path(pki_dir), target, part, parts))


async def _drive(conn, args, pki_dir: Path, target: str, part: int, parts: int) -> None:
    loop = asyncio.get_running_loop()
    stats = dev.Stats()
    fleet = dev.make_fleet(args.devices, args.rate, stats, prefix="bench",
                           heartbeat_s=5.0)[part::parts]
    creds = {d.device_id: dev.credentials(pki_dir, d.device_id) for d in fleet}
    gctune.tune()  # as run_fleet (labbus agent sim --grpc) does
    stop = asyncio.Event()
    runners = [asyncio.create_task(d.run(target, pki_dir, stop, creds=creds[d.device_id]))
               for d in fleet]
    me = psutil.Process()
    try:
        while sum(d.connected.is_set() for d in fleet) < len(fleet):
            await asyncio.sleep(0.2)
        conn.send("connected")
        await loop.run_in_executor(None, conn.recv)  # the window starts
        stats.latencies_s.clear()
        acked0, sent0, cpu0 = stats.acked, stats.readings, me.cpu_times()
        await loop.run_in_executor(None, conn.recv)  # the window ends
        cpu1 = me.cpu_times()
        conn.send({"latencies": list(stats.latencies_s), "acked": stats.acked - acked0,
                   "sent": stats.readings - sent0,
                   "cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)})
        for d in fleet:
            d.paused = True
        deadline = time.monotonic() + 60
        while stats.unacked(fleet) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        left = stats.unacked(fleet)  # (heartbeats go on while paused: count before stopping)
    finally:
        stop.set()
        await asyncio.gather(*runners, return_exceptions=True)
        conn.send({"errors": dict(stats.errors), "reconnects": stats.reconnects,
                   "left_unacked": left if "left" in locals() else stats.unacked(fleet)})


NEW_ROWS = """
SELECT w.device_id, m.measured_at
FROM unnest($1::text[], $2::timestamptz[]) AS w(device_id, after)
CROSS JOIN LATERAL (SELECT measured_at FROM measurements
                    WHERE device_id = w.device_id AND measured_at > w.after) AS m
"""


class Visibility:
    """Polls PostgreSQL for the sampled devices' rows as they become visible (see the module
    docstring): per device the newest measured_at seen so far, and for each new row the time
    the query that first returned it was sent."""

    def __init__(self, dsn: str, devices: list[str], poll_s: float) -> None:
        self.dsn = dsn
        self.devices = devices
        self.poll_s = poll_s
        self.after = {d: datetime.now(UTC) for d in devices}
        self.seen: list[tuple[float, float]] = []  # (measured_at, visible), epoch seconds
        self.polls = 0
        self.first_poll = self.last_poll = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        con = await asyncpg.connect(self.dsn)
        try:
            while not await con.fetchval("SELECT to_regclass('measurements') IS NOT NULL"):
                await asyncio.sleep(0.5)  # the projector has not migrated yet
            stmt = await con.prepare(NEW_ROWS)
            while not stop.is_set():
                sent = time.time()
                rows = await stmt.fetch(self.devices, [self.after[d] for d in self.devices])
                self.polls += 1
                self.first_poll = self.first_poll or sent
                self.last_poll = sent
                for device, measured_at in rows:
                    self.seen.append((measured_at.timestamp(), sent))
                    if measured_at > self.after[device]:
                        self.after[device] = measured_at
                await asyncio.sleep(max(0.0, self.poll_s - (time.time() - sent)))
        finally:
            await con.close()

    def latencies(self, start: float, end: float) -> list[float]:
        return [v - m for m, v in self.seen if start <= m < end]


def at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


async def inserted(dsn: str, start: float, end: float, sample: list[str]) -> dict:
    """Every reading made in the window: projected_at - measured_at percentiles (in
    PostgreSQL), how many rows, and how many of the sampled devices'."""
    con = await asyncpg.connect(dsn)
    try:
        r = await con.fetchrow(
            """SELECT count(*) AS n, count(*) FILTER (WHERE device_id = ANY($3)) AS sampled,
                      percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (
                          ORDER BY extract(epoch FROM projected_at - measured_at)) AS p,
                      max(extract(epoch FROM projected_at - measured_at)) AS mx
               FROM measurements WHERE measured_at >= $1 AND measured_at < $2""",
            at(start), at(end), sample)
        return {"rows": r["n"], "sampled_rows": r["sampled"],
                "p50": float(r["p"][0]) if r["p"] else None,
                "p99": float(r["p"][1]) if r["p"] else None,
                "max": float(r["mx"]) if r["mx"] is not None else None}
    finally:
        await con.close()


async def projected_between(dsn: str, start: float, end: float) -> int:
    """Rows the projector inserted during [start, end) (projected_at has no index: one scan)."""
    con = await asyncpg.connect(dsn)
    try:
        return await con.fetchval("SELECT count(*) FROM measurements "
                                  "WHERE projected_at >= $1 AND projected_at < $2",
                                  at(start), at(end))
    finally:
        await con.close()


async def settle(dsn: str, timeout: float) -> int:
    """Wait until the row count stops growing (the pipeline has drained), at most `timeout`."""
    con = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout
        last, still = -1, 0
        while time.monotonic() < deadline and still < 3:
            n = await con.fetchval("SELECT count(*) FROM measurements")
            still = still + 1 if n == last else 0
            last = n
            await asyncio.sleep(1)
        return last
    finally:
        await con.close()


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def main(args) -> dict:
    pipeline = not args.without_pipeline
    load_before = os.getloadavg()  # other work on the machine, before this run adds its own
    ns = Namespace.create("bench-gw", args.devices, database=pipeline)
    cfg = ns.cfg
    await kafka.ensure_topics(cfg)
    workers = {}
    if pipeline:
        workers = {"validator": ns.start("process", "validate"),
                   "projector-postgres": ns.start("project", "postgres")}
    gw, target = ns.start_gateway()
    rss = {name: PeakRss(p.pid) for name, p in {"gateway": gw, **workers}.items()}
    for r in rss.values():
        r.start()
    all_devices = [d.device_id for d in dev.make_fleet(args.devices, 0, dev.Stats(),
                                                       prefix="bench")]
    sample = all_devices[::args.sample_every]
    poller = Visibility(cfg.postgres_dsn, sample, args.poll_ms / 1000)
    poll_stop = asyncio.Event()
    polling = asyncio.create_task(poller.run(poll_stop)) if pipeline else None
    sims = Simulators(_worker, (args, str(ns.pki_dir), target), args.sim_processes)
    each = sims.each
    pipes = sims.pipes

    finals: list = []
    try:
        t0 = time.perf_counter()
        await asyncio.wait_for(each(), 120)  # every process: all its streams connected
        connect_s = time.perf_counter() - t0
        print(f"{args.devices} streams connected in {connect_s:.1f} s from "
              f"{args.sim_processes} simulator process(es); warming up {args.warmup} s",
              file=sys.stderr)
        await asyncio.sleep(args.warmup)
        if pipeline:  # the validator and the projector are running and rows arrive
            deadline = time.monotonic() + 120
            while not poller.seen:
                for name, p in workers.items():
                    if p.poll() is not None:
                        raise RuntimeError(f"{name} exited with {p.returncode}; see "
                                           f"{ns.pki_dir}")
                if time.monotonic() > deadline:
                    raise TimeoutError("no reading reached PostgreSQL within 120 s")
                await asyncio.sleep(0.5)
        pids = {"gateway": gw.pid, **{n: p.pid for n, p in workers.items()}}
        cpu0 = {n: cpu_s(pid) for n, pid in pids.items()}
        load0 = os.getloadavg()
        start = time.perf_counter()
        wall_start = time.time()
        polls0 = poller.polls
        for p in pipes:
            p.send("start")
        await asyncio.sleep(args.seconds)
        window = time.perf_counter() - start
        wall_end = wall_start + window
        cpu1 = {n: cpu_s(pid) for n, pid in pids.items()}
        load1 = os.getloadavg()
        polls = poller.polls - polls0
        parts = await each("end")
        finals = await asyncio.wait_for(each(), 120)
        pg: dict = {}
        if pipeline:
            total_rows = await settle(cfg.postgres_dsn, args.drain_timeout)
            await asyncio.sleep(1)  # the poller's last round
            poll_stop.set()
            await polling
            pg = await inserted(cfg.postgres_dsn, wall_start, wall_end, sample)
            pg["projected_in_window"] = await projected_between(cfg.postgres_dsn, wall_start,
                                                                wall_end)
            pg["total_rows"] = total_rows
    finally:
        poll_stop.set()
        if polling and not polling.done():
            polling.cancel()
        sims.join()
        for r in rss.values():
            r.stopped.set()
        for p in (gw, *workers.values()):
            p.terminate()
        for p in (gw, *workers.values()):
            try:
                p.wait(30)
            except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: kill it
                p.kill()
        await ns.drop()
    lat = [x for part in parts for x in part["latencies"]]
    acked = sum(part["acked"] for part in parts)
    sent = sum(part["sent"] for part in parts)
    errors: dict = {}
    for f in finals:
        for k, v in f["errors"].items():
            errors[k] = errors.get(k, 0) + v
    result = {
        "devices": args.devices, "rate_per_device": args.rate,
        "simulator_processes": args.sim_processes, "window_s": round(window, 1),
        "connect_all_s": round(connect_s, 1),
        "readings_sent_per_s": round(sent / window),
        "readings_acked_per_s": round(len(lat) / window),
        "messages_acked_per_s": round(acked / window),  # readings + heartbeats
        "send_to_broker_ack_ms": {"p50": ms(pct(lat, 0.5)), "p99": ms(pct(lat, 0.99)),
                                  "max": ms(max(lat)) if lat else None,
                                  "mean": ms(statistics.fmean(lat)) if lat else None},
    }
    if pipeline:
        vis = poller.latencies(wall_start, wall_end)
        result |= {
            "send_to_visible_in_postgres_ms": {
                "sample": f"1 device in {args.sample_every} ({len(sample)} devices), each of "
                          "its readings made in the window",
                "readings": len(vis), "rows_of_the_sample_in_postgres": pg["sampled_rows"],
                "p50": ms(pct(vis, 0.5)), "p99": ms(pct(vis, 0.99)),
                "max": ms(max(vis)) if vis else None,
                "poll_period_ms": ms(window / polls) if polls else None},
            "send_to_row_inserted_ms": {"readings": pg["rows"], "p50": ms(pg["p50"]),
                                        "p99": ms(pg["p99"]), "max": ms(pg["max"])},
            "readings_into_postgres_per_s": round(pg["projected_in_window"] / window),
            "rows_in_postgres_after_drain": pg["total_rows"],
        }
    result |= {
        "peak_rss_mb": {n: round(r.peak / 2**20) for n, r in rss.items()},
        "cpu_percent": {**{n: round(100 * (cpu1[n] - cpu0[n]) / window) for n in cpu0},
                        "simulators": round(100 * sum(part["cpu_s"] for part in parts)
                                            / window)},
        "errors": errors, "reconnects": sum(f["reconnects"] for f in finals),
        "left_unacked": sum(f["left_unacked"] for f in finals),
        "load_average_1m": {"before_the_run": round(load_before[0], 1),
                            "window_start": round(load0[0], 1),
                            "window_end": round(load1[0], 1)},
        "load_average_at_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "machine": machine(),
    }
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=5.0, help="readings/s per device")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--sim-processes", type=int, default=1,
                        help="simulator processes sharing the devices (1 = one process drives "
                             "them all)")
    parser.add_argument("--sample-every", type=int, default=20,
                        help="the visibility poller follows every n-th device")
    parser.add_argument("--poll-ms", type=float, default=25.0,
                        help="the visibility poller's period")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="after the window, wait at most this long for PostgreSQL to "
                             "hold every reading")
    parser.add_argument("--without-pipeline", action="store_true",
                        help="no validator and projector: gateway -> broker only")
    a = parser.parse_args()
    import uvloop

    uvloop.install()
    print(json.dumps(asyncio.run(main(a)), indent=2))
