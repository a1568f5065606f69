"""What each faust patch of processors/faust_speedups.py buys: the validator stage alone (as
tests/bench/bench_stages.py runs it) on a fresh backlog, with every patch on and with one patch
at a time turned back into stock faust, in paired rounds that alternate the variants.

    .venv/bin/python tests/bench/bench_faust_patches.py [--rounds 4] [--readings 200000]
        [--variants all,-inline_delivery,...,stock]

Each run: a fresh namespace, the same pre-encoded readings published as a backlog, then a
validator process started on it; readings/s and CPU µs per reading are timed from its first
output to its last, as bench_stages.py does. The variant order rotates from round to round, so
load from other users of the machine falls on every variant alike. Reports the median and range of
each variant and, per round, its difference to `all` in the same round.

The validator runs in a child process of this script (`--child`) that sets the chosen patches back
to stock faust before it starts the worker; the `labbus process validate` command itself is
unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from labbus.events import config  # noqa: E402
from labbus.events.topics import (  # noqa: E402
    MEASUREMENTS_RECORDED,
    MEASUREMENTS_REJECTED,
    MEASUREMENTS_VALIDATED,
    topic_name,
)
from labbus.producers import sim  # noqa: E402
from tests.bench.bench_pipeline import (  # noqa: E402
    bench_environment,
    drop_bench_environment,
    ensure_running,
    produce,
    stop_processes,
)
from tests.bench.bench_stages import end_offsets  # noqa: E402


def _stock(name: str) -> None:
    """Turn one patch of processors/faust_speedups.py back into stock faust (in this process)."""
    import faust
    from faust.sensors import Monitor
    from faust.transport.drivers import aiokafka as faust_aiokafka

    from labbus.processors import faust_speedups, validator

    consumer = faust_speedups.Consumer
    stock_consumer = faust_aiokafka.Consumer
    if name == "fetch_wakeup":
        consumer._wait_next_records = stock_consumer._wait_next_records
    elif name == "getmany":
        consumer.getmany = stock_consumer.getmany
    elif name == "on_buffer_drop":
        consumer.on_buffer_drop = stock_consumer.on_buffer_drop
    elif name == "inline_delivery":
        consumer._drain_messages = stock_consumer._drain_messages
    elif name == "wait_for_room":
        consumer._queue_full = lambda self, topic: False
    elif name == "producer_buffer":
        faust_speedups.Transport.Producer = faust_aiokafka.Producer
    elif name == "raw_schema":
        validator.RawSchema = faust.Schema
    elif name == "lean_monitor":
        validator.LeanMonitor = Monitor
    else:
        raise SystemExit(f"unknown patch {name!r}")


def patches() -> list[str]:
    """The patches this script can turn off, as present in processors/faust_speedups.py."""
    from labbus.processors import faust_speedups

    have = {
        "getmany": "getmany" in vars(faust_speedups.Consumer),
        "fetch_wakeup": "_wait_next_records" in vars(faust_speedups.Consumer),
        "on_buffer_drop": "on_buffer_drop" in vars(faust_speedups.Consumer),
        "inline_delivery": "_drain_messages" in vars(faust_speedups.Consumer),
        "wait_for_room": "_queue_full" in vars(faust_speedups.Consumer),
        "producer_buffer": "Producer" in vars(faust_speedups.Transport),
        "raw_schema": hasattr(faust_speedups, "RawSchema"),
        "lean_monitor": hasattr(faust_speedups, "LeanMonitor"),
    }
    return [name for name, present in have.items() if present]


STALLS_FILE = "LABBUS_BENCH_STALLS_FILE"


def count_fetch_stalls(path: str) -> None:
    """Append to `path` how long each fetch waited while back-pressure had paused every partition
    (stock faust sleeps 1 s there): stalls the throughput figures alone hide in their noise."""
    from labbus.processors import faust_speedups

    wait_next_records = faust_speedups.Consumer._wait_next_records

    async def counted(self, timeout: float):
        paused = self.flow_active and not self._get_active_partitions()
        started = time.perf_counter()
        try:
            return await wait_next_records(self, timeout)
        finally:
            if paused:
                with open(path, "a") as out:
                    out.write(f"{time.perf_counter() - started:.3f}\n")

    faust_speedups.Consumer._wait_next_records = counted


def child(without: list[str]) -> None:
    """Run the validator as `labbus process validate --metrics-port -1` does, minus patches."""
    import uvloop

    from labbus.events import logs
    from labbus.processors import validator

    for name in without:
        _stock(name)
    count_fetch_stalls(os.environ[STALLS_FILE])
    uvloop.install()
    cfg = config.load()
    logs.configure("validator", cfg.log_level)
    validator.run(cfg)


def without_of(variant: str, known: list[str]) -> list[str]:
    if variant == "all":
        return []
    if variant == "stock":
        return list(known)
    return [name.lstrip("-") for name in variant.split("+")]


async def one_run(variant: str, known: list[str], payloads) -> tuple[float, float, float]:
    """(readings/s, CPU µs per reading, seconds the fetcher stalled with every partition paused)"""
    base, env, cfg, db = await bench_environment()
    stalls = tempfile.NamedTemporaryFile("r", suffix=".stalls")
    try:
        await produce(cfg, topic_name(cfg, MEASUREMENTS_RECORDED), payloads)
        outputs = (topic_name(cfg, MEASUREMENTS_VALIDATED), topic_name(cfg, MEASUREMENTS_REJECTED))
        cmd = [sys.executable, __file__, "--child", ",".join(without_of(variant, known))]
        proc = subprocess.Popen(cmd, env={**env, STALLS_FILE: stalls.name},
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        ps = psutil.Process(proc.pid)
        n = len(payloads)
        try:
            while (first := await end_offsets(cfg, *outputs)) == 0:
                ensure_running({variant: proc})
                await asyncio.sleep(0.02)
            started, cpu0 = time.perf_counter(), sum(ps.cpu_times()[:2])
            while (got := await end_offsets(cfg, *outputs)) < n:
                ensure_running({variant: proc})
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - started
            cpu = sum(ps.cpu_times()[:2]) - cpu0
        finally:
            stop_processes({variant: proc})
        worked = got - first
        stalled = sum(float(line) for line in stalls.read().split())
        return worked / elapsed, cpu / worked * 1e6, stalled
    finally:
        stalls.close()
        await drop_bench_environment(base, cfg, db)


async def main_async(args) -> None:
    known = patches()
    variants = args.variants.split(",") if args.variants else \
        ["all", *(f"-{name}" for name in known), "stock"]
    fleet_sim = sim.FleetSimulator(sim.make_fleet(100, seed=1, prefix="st"), seed=1)
    payloads = [fleet_sim.reading(i)[:2] for i in range(args.readings)]
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    stalled: dict[str, list[float]] = {v: [] for v in variants}
    for round_no in range(args.rounds):
        shift = round_no % len(variants)
        order = variants[shift:] + variants[:shift]
        if round_no % 2:
            order.reverse()
        for variant in order:
            rate, cpu, stall = await one_run(variant, known, payloads)
            results[variant].append((rate, cpu))
            stalled[variant].append(stall)
            load = psutil.getloadavg()[0]
            print(f"round {round_no + 1} {variant:<22} {rate:>9,.0f} readings/s "
                  f"{cpu:6.1f} CPU µs/reading   fetch stalled {stall:.1f} s   (load {load:.1f})",
                  flush=True)
    print(f"\n{len(payloads):,} readings, {args.rounds} rounds; median [min–max]; "
          "Δ = paired difference to `all` in the same round, median [min–max]")
    base = results.get("all")
    for variant, runs in results.items():
        rates, cpus = [r for r, _ in runs], [c for _, c in runs]
        line = (f"{variant:<22} {statistics.median(rates):>8,.0f} [{min(rates):,.0f}–"
                f"{max(rates):,.0f}] readings/s   {statistics.median(cpus):5.1f} "
                f"[{min(cpus):.1f}–{max(cpus):.1f}] µs   stalled {sum(stalled[variant]):.1f} s")
        if base and variant != "all":
            d_rate = [100 * (r / b[0] - 1) for (r, _), b in zip(runs, base, strict=True)]
            d_cpu = [c - b[1] for (_, c), b in zip(runs, base, strict=True)]
            line += (f"   Δ rate {statistics.median(d_rate):+.0f}% [{min(d_rate):+.0f}–"
                     f"{max(d_rate):+.0f}]   Δ CPU {statistics.median(d_cpu):+.1f} µs "
                     f"[{min(d_cpu):+.1f}–{max(d_cpu):+.1f}]")
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--variants", default="",
                        help="comma-separated: all, stock, -PATCH or -PATCH+-PATCH "
                             "(default: all, each patch off alone, stock)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child([name for name in args.child.split(",") if name])
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
