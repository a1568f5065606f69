"""Stage benchmark: each pipeline process alone, on a backlog, with its CPU cost per reading.

    .venv/bin/python tests/bench/bench_stages.py [--readings 200000]

Publishes the readings first, then starts one process at a time on the backlog and times how long
it takes to work through it: the validator (recorded -> validated) and the PostgreSQL projector
(validated -> rows). CPU µs per reading is the process's user+system time over the readings,
which tells where the end-to-end budget goes on a small machine.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from labbus.deploy.demo import LABBUS  # noqa: E402
from labbus.events import config, kafka  # noqa: E402
from labbus.events.topics import (  # noqa: E402
    DEVICES,
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
    projected_offsets,
    stop_processes,
)


async def end_offsets(cfg: config.Config, *topics: str) -> int:
    from aiokafka import TopicPartition

    reader = kafka.consumer(cfg, group=None)
    await reader.start()
    try:
        await reader._client.force_metadata_update()  # noqa: SLF001 - fresh topics
        tps = [TopicPartition(t, p) for t in topics for p in reader.partitions_for_topic(t) or ()]
        return sum((await reader.end_offsets(tps)).values())
    finally:
        await reader.stop()


async def timed_stage(name: str, cmd: tuple[str, ...], env: dict, done, n: int) -> None:
    """Start `cmd`, wait until `done()` reports n, print readings/s and CPU µs per reading. The
    clock starts when the process has done its first piece of work, so startup is left out."""
    proc = subprocess.Popen([LABBUS, *cmd, "--metrics-port", "-1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid)
    try:
        while (first := int(await done())) == 0:
            ensure_running({name: proc})
            await asyncio.sleep(0.02)
        started, cpu0 = time.perf_counter(), sum(ps.cpu_times()[:2])
        while (got := int(await done())) < n:
            ensure_running({name: proc})
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        cpu = sum(ps.cpu_times()[:2]) - cpu0
        worked = got - first
        print(f"{name:<22} {worked / elapsed:>9,.0f} readings/s   "
              f"{cpu / worked * 1e6:>6.1f} CPU µs/reading   "
              f"peak RSS {ps.memory_info().rss / 2**20:,.0f} MiB")
    finally:
        stop_processes({name: proc})


async def main_async(args) -> None:
    base, env, cfg, db = await bench_environment()
    fleet_sim = sim.FleetSimulator(sim.make_fleet(100, seed=1, prefix="st"), seed=1)
    payloads = [fleet_sim.reading(i)[:2] for i in range(args.readings)]
    # registered with specs, so every reading goes through all the quality rules
    await produce(cfg, topic_name(cfg, DEVICES),
                  [(r.key, fleet_sim.codec.encode(r)) for r in fleet_sim.registrations()])
    await produce(cfg, topic_name(cfg, MEASUREMENTS_RECORDED), payloads)
    outputs = (topic_name(cfg, MEASUREMENTS_VALIDATED), topic_name(cfg, MEASUREMENTS_REJECTED))
    try:
        await timed_stage("validator", ("process", "validate"), env,
                          lambda: end_offsets(cfg, *outputs), args.readings)
        if not args.validator_only:
            await timed_stage("projector postgres", ("project", "postgres"), env,
                              lambda: projected_offsets(cfg.postgres_dsn), args.readings)
    finally:
        await drop_bench_environment(base, cfg, db)
    print(f"machine: {psutil.cpu_count()} cores, {args.readings:,} readings")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=200_000)
    parser.add_argument("--validator-only", action="store_true")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
