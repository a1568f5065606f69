"""Pipeline benchmark: raw broker rate vs end-to-end readings/s, ingest->queryable latency, memory.

    .venv/bin/python tests/bench/bench_pipeline.py [--readings 200000] [--latency-rate 1000]

Runs against the services of `labbus services up` (or the LABBUS_* addresses), in a fresh
namespace and database, with the validator and PostgreSQL projector as separate processes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import asyncpg
import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from labbus.deploy.demo import LABBUS  # noqa: E402 - the installed `labbus` next to this Python
from labbus.deploy.local import kafka as local_kafka  # noqa: E402
from labbus.deploy.local import postgres, services  # noqa: E402
from labbus.events import config, kafka  # noqa: E402
from labbus.events.topics import (  # noqa: E402
    DEVICES,
    MEASUREMENTS_RECORDED,
    TopicSpec,
    group_id,
    topic_name,
)
from labbus.producers import sim  # noqa: E402


class PeakRss(threading.Thread):
    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items() if pid}
        self.peak = dict.fromkeys(self.procs, 0)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            for name, p in self.procs.items():
                try:
                    self.peak[name] = max(self.peak[name], p.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.2)


class CpuMeter:
    """User+system CPU seconds of each process between start() and stop(), with the children of
    those named in `with_children` (PostgreSQL's backends): where the end-to-end budget goes."""

    def __init__(self, pids: dict[str, int | None], with_children: tuple[str, ...] = ()) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items() if pid}
        self.with_children = with_children
        self.used: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        out = {}
        for name, p in self.procs.items():
            try:
                t = p.cpu_times()
                total = t.user + t.system
                if name in self.with_children:
                    # children that ended are in children_*, the live ones are added one by one
                    total += t.children_user + t.children_system
                    for child in p.children(recursive=True):
                        ct = child.cpu_times()
                        total += ct.user + ct.system
                out[name] = total
            except psutil.Error:
                out[name] = 0.0
        return out

    def start(self) -> None:
        self.started = self._now()

    def stop(self) -> None:
        ended = self._now()
        self.used = {name: ended[name] - self.started[name] for name in ended}


async def produce(cfg: config.Config, topic: str, payloads: list[tuple[bytes, bytes]]) -> None:
    """Publish pre-encoded readings the way every labbus producer does (acks=all, idempotent)."""
    producer = kafka.producer(cfg)
    await producer.start()
    pending = []
    for key, value in payloads:
        pending.append(await producer.send(topic, value, key=key))
        if len(pending) >= 5000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    await producer.stop()


async def raw_broker_rate(cfg: config.Config, payloads: list[tuple[bytes, bytes]]) -> float:
    """Produce the readings to a bare topic and consume them back: events/s. Timed on a topic
    whose partition leaders are ready and after an untimed pass, so neither leader election of
    the new topic nor a cold broker is counted against the broker."""
    spec = TopicSpec(f"bench.raw.{uuid.uuid4().hex[:6]}", 6, "device_id", ())
    await kafka.ensure_topics(cfg, (spec,))
    name = topic_name(cfg, spec)
    ready = kafka.producer(cfg)
    await ready.start()
    try:
        for partition in range(spec.partitions):  # retried until the partition has a leader
            await (await ready.send(name, b"ready", partition=partition))
    finally:
        await ready.stop()
    consumer = kafka.consumer(cfg, name, group=None)
    await consumer.start()
    try:
        got, expected = 0, spec.partitions
        for _pass in ("untimed", "timed"):
            expected += len(payloads)
            started = time.perf_counter()
            await produce(cfg, name, payloads)
            while got < expected:
                batch = await consumer.getmany(timeout_ms=1000, max_records=10000)
                got += sum(len(v) for v in batch.values())
        return len(payloads) / (time.perf_counter() - started)
    finally:
        await consumer.stop()


async def count_rows(dsn: str, prefix: str) -> int:
    con = await asyncpg.connect(dsn)
    try:
        if not await con.fetchval("SELECT to_regclass('measurements') IS NOT NULL"):
            return 0
        return await con.fetchval(
            "SELECT count(*) FROM measurements WHERE device_id LIKE $1", prefix + "%")
    finally:
        await con.close()


async def projected_offsets(dsn: str) -> int:
    """Readings the projector has committed: its stored positions, written in the same
    transaction as the rows. Far cheaper to poll than count(*), which would load the database."""
    con = await asyncpg.connect(dsn)
    try:
        if not await con.fetchval("SELECT to_regclass('projection_positions') IS NOT NULL"):
            return 0
        return await con.fetchval(
            "SELECT coalesce(sum(next_offset), 0) FROM projection_positions "
            "WHERE projection = 'postgres' AND topic LIKE '%measurements.validated'")
    finally:
        await con.close()


def stop_processes(procs: dict[str, subprocess.Popen], timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL for any that has not exited after `timeout` (reported: a process
    that does not stop on SIGTERM is a bug worth seeing)."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    for name, proc in procs.items():
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"{name} did not stop within {timeout:.0f} s of SIGTERM; killed", file=sys.stderr)
            proc.kill()
            proc.wait()


def ensure_running(procs: dict[str, subprocess.Popen]) -> None:
    for name, proc in procs.items():
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; run its labbus command "
                               "by hand to see why")


async def wait_rows(dsn: str, prefix: str, n: int, timeout: float, before: int,
                    procs: dict[str, subprocess.Popen]) -> float:
    """Wait until `n` more readings are projected than `before` (read before publishing), then
    until all `n` rows are there: a reading decided twice (a validator restarting or a rebalance
    re-emits the same event) advances the offsets without adding a row. Returns when the last
    row was there."""
    deadline = time.perf_counter() + timeout
    while await projected_offsets(dsn) < before + n:
        ensure_running(procs)
        if time.perf_counter() > deadline:
            raise TimeoutError(f"only {await count_rows(dsn, prefix)} of {n} rows after "
                               f"{timeout} s")
        await asyncio.sleep(0.05)
    while (rows := await count_rows(dsn, prefix)) < n:
        ensure_running(procs)
        if time.perf_counter() > deadline:
            raise TimeoutError(f"only {rows} of {n} rows after {timeout} s")
        await asyncio.sleep(0.05)
    assert rows == n, f"{rows} rows for {prefix!r}, expected {n}"
    return time.perf_counter()


async def latencies(dsn: str, prefix: str) -> list[float]:
    con = await asyncpg.connect(dsn)
    try:
        rows = await con.fetch(
            "SELECT extract(epoch FROM projected_at - measured_at) AS s FROM measurements "
            "WHERE device_id LIKE $1", prefix + "%")
        return sorted(float(r["s"]) for r in rows)
    finally:
        await con.close()


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


async def bench_environment() -> tuple[config.Config, dict, config.Config, str]:
    """Services up, then a fresh namespace and database for one benchmark run:
    (base config, environment for the processes, their config, database to drop at the end)."""
    base = config.load()
    services.up(base, echo=lambda m: print(m, file=sys.stderr))
    run = uuid.uuid4().hex[:6]
    db = f"labbus_bench_{run}"
    env = dict(os.environ, LABBUS_NAMESPACE=f"bench-{run}", LABBUS_LOG_LEVEL="WARNING",
               LABBUS_POSTGRES_DSN=postgres.create_database(base, db),
               LABBUS_POSTGRES_API_DSN=postgres.with_database(base.postgres_api_dsn, db))
    cfg = config.load(env)
    await kafka.ensure_topics(cfg)
    return base, env, cfg, db


async def drop_bench_environment(base: config.Config, cfg: config.Config, db: str) -> None:
    """Leave nothing of a run behind: its database, its topics (the faust apps' changelogs too),
    the data dirs of its faust apps (the validator's, the stateful processors')."""
    postgres.drop_database(base, db)
    await kafka.delete_namespace_topics(base, cfg.namespace)
    for datadir in (cfg.home / "faust").glob(group_id(cfg, "*")):
        shutil.rmtree(datadir, ignore_errors=True)


def load_average() -> str:
    """The machine's load average (1, 5, 15 min), printed with every figure: the machine is
    shared, and a figure taken under load is not one taken on an idle machine."""
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


async def main_async(args) -> None:
    base, env, cfg, db = await bench_environment()
    print(f"at start: {load_average()}")

    fleet = sim.make_fleet(100, seed=1, prefix="tp")
    fleet_sim = sim.FleetSimulator(fleet, seed=1)
    payloads = [fleet_sim.reading(i)[:2] for i in range(args.readings)]
    registrations = [(r.key, fleet_sim.codec.encode(r)) for r in fleet_sim.registrations()]
    raw = await raw_broker_rate(cfg, payloads)
    print(f"raw broker rate (produce+consume, no processing): {raw:,.0f} events/s")

    procs = {name: subprocess.Popen([LABBUS, *cmd, "--metrics-port", "-1"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, cmd in (*((f"validator {i + 1}" if args.validators > 1 else "validator",
                                  ("process", "validate")) for i in range(args.validators)),
                               ("projector-postgres", ("project", "postgres")))}
    pids = {n: p.pid for n, p in procs.items()}
    pids["kafka (JVM)"] = None if base.explicitly_set("kafka_bootstrap") else \
        local_kafka.running_pid(base)
    rss = PeakRss(pids)
    rss.start()
    cpu = CpuMeter({**pids, "postgres (server)": None if base.explicitly_set("postgres_dsn")
                    else postgres.running_pid(base), "bench publisher": os.getpid()},
                   with_children=("postgres (server)",))
    try:
        # warm-up: processes join their groups and the projector migrates its schema
        await sim.publish(cfg, sim.FleetSimulator(sim.make_fleet(10, 2, "warm"), 2), 500)
        await wait_rows(cfg.postgres_dsn, "warm", 500, 120, 0, procs)

        await produce(cfg, topic_name(cfg, DEVICES), registrations)
        before = await projected_offsets(cfg.postgres_dsn)
        cpu.start()
        started = time.perf_counter()
        await produce(cfg, topic_name(cfg, MEASUREMENTS_RECORDED), payloads)  # the same events
        published = time.perf_counter()
        done = await wait_rows(cfg.postgres_dsn, "tp", args.readings, 600, before, procs)
        cpu.stop()
        e2e = args.readings / (done - started)
        print(f"end to end (publish -> validator -> projector -> queryable in PostgreSQL): "
              f"{e2e:,.0f} readings/s  ({args.readings:,} readings in {done - started:.1f} s; "
              f"publishing took {published - started:.1f} s)")
        print(f"ratio end-to-end / raw broker: {e2e / raw:.2f}")
        cores = psutil.cpu_count()
        print(f"CPU per reading during that run (µs; {cores} cores give "
              f"{cores * 1e6 / e2e:.0f} µs of CPU per reading at this rate):")
        for name, seconds in sorted(cpu.used.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<20} {seconds / args.readings * 1e6:6.1f}")
        print(f"  {'all':<20} {sum(cpu.used.values()) / args.readings * 1e6:6.1f}")

        n_lat = int(args.latency_rate * args.latency_seconds)
        before = await projected_offsets(cfg.postgres_dsn)
        await sim.publish(cfg, sim.FleetSimulator(sim.make_fleet(20, 4, "lat"), 4), n_lat,
                          rate=args.latency_rate)
        await wait_rows(cfg.postgres_dsn, "lat", n_lat, 120, before, procs)
        lat = await latencies(cfg.postgres_dsn, "lat")
        print(f"ingest -> queryable latency at {args.latency_rate:,.0f} readings/s "
              f"({len(lat):,} readings): p50 {pct(lat, 0.5) * 1000:.0f} ms, "
              f"p99 {pct(lat, 0.99) * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms")
    finally:
        rss.stopped.set()
        stop_processes(procs)
        await drop_bench_environment(base, cfg, db)
    for name, peak in rss.peak.items():
        print(f"peak RSS {name}: {peak / 2**20:,.0f} MiB")
    print(f"machine: {platform.machine()}, {psutil.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}; "
          f"{load_average()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=200_000)
    parser.add_argument("--latency-rate", type=float, default=1000.0)
    parser.add_argument("--validators", type=int, default=1,
                        help="validator processes sharing the partitions (scale-out)")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
