"""Stage benchmark: each pipeline process alone, on a backlog, with its CPU cost per reading.

    .venv/bin/python tests/bench/bench_stages.py [--readings 200000] [--function-readings 100000]

Publishes the readings first, then starts one process at a time on the backlog and times how long
it takes to work through it: the validator (recorded -> validated) and the PostgreSQL projector
(validated -> rows). CPU µs per reading is the process's user+system time over the readings,
which tells where the end-to-end budget goes on a small machine.

Before the stages, in this process and without services: the validator's handler alone
(`Validator.handle`: decode, duplicate window, validation, quality, encode) on the same kind of
readings, with the quality rules and with `quality.judge` replaced by a constant, rounds
alternating; the ratio is the cost of the rules on the validator's own work, free of the
broker's and of faust's noise (`--functions-only` runs just that).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from labbus.deploy.demo import LABBUS  # noqa: E402
from labbus.events import config, kafka  # noqa: E402
from labbus.events.runtime import Record  # noqa: E402
from labbus.events.topics import (  # noqa: E402
    DEVICES,
    MEASUREMENTS_RECORDED,
    MEASUREMENTS_REJECTED,
    MEASUREMENTS_VALIDATED,
    topic_name,
)
from labbus.processors import quality  # noqa: E402
from labbus.processors.validator import Validator  # noqa: E402
from labbus.producers import sim  # noqa: E402
from tests.bench.bench_pipeline import (  # noqa: E402
    PeakRss,
    bench_environment,
    drop_bench_environment,
    ensure_running,
    load_average,
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


class GroupCommits:
    """The offsets a consumer group has committed on `topics`, summed: the progress of a faust
    processor, which commits an input only once it has handled it. One admin client, polled by
    calling the object (`timed_stage`'s `done`)."""

    def __init__(self, cfg: config.Config, group: str, *topics: str) -> None:
        self.cfg = cfg
        self.group = group
        self.topics = set(topics)
        self.admin = None

    async def __aenter__(self) -> GroupCommits:
        self.admin = kafka.admin(self.cfg)
        await self.admin.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.admin.close()

    async def __call__(self) -> int:
        offsets = await self.admin.list_consumer_group_offsets(self.group)
        return sum(m.offset for tp, m in offsets.items()
                   if tp.topic in self.topics and m.offset > 0)


@dataclass
class Stage:
    """What `timed_stage` measured. The clock starts at the process's first progress (startup is
    `startup_s`, from its launch to then) and stops when it reached n."""

    name: str
    worked: int  # readings between the first progress seen and n
    elapsed_s: float
    cpu_s: float  # the process's user+system time over `elapsed_s`
    startup_s: float
    peak_rss: int

    @property
    def rate(self) -> float:
        return self.worked / self.elapsed_s

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.worked * 1e6


async def timed_stage(name: str, cmd: tuple[str, ...], env: dict, done, n: int,
                      poll_s: float = 0.05) -> Stage:
    """Start `cmd`, wait until `done()` reports n, print readings/s and CPU µs per reading. The
    clock starts when the process has done its first piece of work, so startup is left out."""
    launched = time.perf_counter()
    proc = subprocess.Popen([LABBUS, *cmd, "--metrics-port", "-1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid)
    rss = PeakRss({name: proc.pid})
    rss.start()
    try:
        while (first := int(await done())) == 0:
            ensure_running({name: proc})
            await asyncio.sleep(poll_s)
        started, cpu0 = time.perf_counter(), sum(ps.cpu_times()[:2])
        while (got := int(await done())) < n:
            ensure_running({name: proc})
            await asyncio.sleep(poll_s)
        elapsed = time.perf_counter() - started
        cpu = sum(ps.cpu_times()[:2]) - cpu0
        rss.stopped.set()
        stage = Stage(name, got - first, elapsed, cpu, started - launched, rss.peak[name])
        print(f"{name:<22} {stage.rate:>9,.0f} readings/s   "
              f"{stage.cpu_us:>6.1f} CPU µs/reading   "
              f"peak RSS {stage.peak_rss / 2**20:,.0f} MiB   ({load_average()})")
        return stage
    finally:
        rss.stopped.set()
        stop_processes({name: proc})


def validator_function(readings: int, rounds: int) -> None:
    """`Validator.handle` in this process on `readings` readings of 100 registered devices, with
    the quality rules and with `quality.judge` replaced by a constant (no spec lookup, no rule:
    every reading `good`; the sequence bookkeeping and the quality fields' encoding stay), a
    fresh validator per round, the variants alternating."""
    cfg = config.load()
    fleet_sim = sim.FleetSimulator(sim.make_fleet(100, seed=1, prefix="fn"), seed=1)
    registrations = [(r.key, fleet_sim.codec.encode(r)) for r in fleet_sim.registrations()]
    partitions = MEASUREMENTS_RECORDED.partitions
    records = [Record("bench.recorded", i % partitions, i // partitions, key, value)
               for i, (key, value, _) in enumerate(map(fleet_sim.reading, range(readings)))]
    judge = quality.judge

    def constant(*_args) -> tuple[str, str | None]:
        return quality.GOOD

    def one_round(with_rules: bool) -> tuple[float, dict]:
        validator = Validator(cfg, fleet_sim.codec)
        for key, value in registrations:
            validator.specs.read(key, value)
        quality.judge = judge if with_rules else constant
        try:
            now_us = time.time_ns() // 1000
            handle = validator.handle
            outcomes: dict = {}
            started = time.process_time()
            for rec in records:
                topic, _, code = handle(rec, now_us)
                outcomes[code] = outcomes.get(code, 0) + 1
            return readings / (time.process_time() - started), outcomes
        finally:
            quality.judge = judge

    rates: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for with_rules in ((True, False) if r % 2 == 0 else (False, True)):
            rate, outcomes = one_round(with_rules)
            assert outcomes == {None: readings}, outcomes  # every reading validated
            rates[with_rules].append(rate)
    # and the rules alone: quality.judge on the decoded readings, less the loop around it
    validator = Validator(cfg, fleet_sim.codec)
    for key, value in registrations:
        validator.specs.read(key, value)
    plain = [fleet_sim.codec.decode_record(rec.value, plain=True)[1] for rec in records]
    specs, now_us = validator.specs.by_device, time.time_ns() // 1000
    judged = []
    for _ in range(rounds):
        started = time.process_time()
        for reading in plain:
            judge(reading, specs.get(reading["device_id"]), None, now_us, validator.future_us,
                  validator.horizon_us)
        middle = time.process_time()
        for reading in plain:
            constant(reading, specs.get(reading["device_id"]), None, now_us, validator.future_us,
                     validator.horizon_us)
        judged.append(((middle - started) - (time.process_time() - middle)) / readings * 1e6)
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"Validator.handle in-process, {readings:,} readings x {rounds} rounds each "
          f"(readings per CPU second, median):")
    print(f"  with the quality rules     {on:>9,.0f}/s  {1e6 / on:5.1f} µs   "
          f"[{min(rates[True]):,.0f}-{max(rates[True]):,.0f}]")
    print(f"  quality.judge a constant   {off:>9,.0f}/s  {1e6 / off:5.1f} µs   "
          f"[{min(rates[False]):,.0f}-{max(rates[False]):,.0f}]")
    print(f"  ratio with / without: {on / off:.3f} (the rules cost {1e6 / on - 1e6 / off:+.1f} "
          f"µs per reading; quality.judge alone {statistics.median(judged):.2f} µs; "
          f"{load_average()})")


async def main_async(args) -> None:
    if args.function_readings:
        validator_function(args.function_readings, args.rounds)
    if args.functions_only:
        return
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
    print(f"machine: {psutil.cpu_count()} cores, {args.readings:,} readings; {load_average()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=200_000)
    parser.add_argument("--validator-only", action="store_true")
    parser.add_argument("--function-readings", type=int, default=100_000,
                        help="readings for the in-process Validator.handle rounds (0: none)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="in-process rounds per variant (with and without the rules)")
    parser.add_argument("--functions-only", action="store_true",
                        help="only the in-process rounds: no services, no processes")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
