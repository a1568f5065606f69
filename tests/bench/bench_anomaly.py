"""Anomaly processor benchmark: readings/s through `labbus process anomalies` on a backlog.

    .venv/bin/python tests/bench/bench_anomaly.py [--readings 200000] [--devices 200]
        [--spike-every 1000]

In a fresh namespace (`bench_pipeline.bench_environment`), pre-loads validated readings
(MeasurementValidated v2, quality good, made by the validator's own functions from
MeasurementRecorded events) onto lab.measurements.validated: `--devices` devices x 2 metrics,
Gaussian noise around a typical value, and about one reading in `--spike-every` a spike of
±10 noise widths (only on a series past the warm-up, at most one per 50 readings of a series).
Then starts the processor and times it from its first committed offset until its group's
commits reach the end offsets (`bench_stages.timed_stage`): readings/s, the process's CPU per
1,000 readings (psutil), peak RSS, and the AnomalyDetected events on lab.alerts against the
spikes injected (a spike flagged, a spike missed, a normal reading flagged: the Gaussian
noise's own outliers past the threshold).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from labbus.events import config, kafka  # noqa: E402
from labbus.events.codec import default_codec  # noqa: E402
from labbus.events.model import AnomalyDetected, MeasurementRecorded, utcnow  # noqa: E402
from labbus.events.topics import ALERTS, MEASUREMENTS_VALIDATED, group_id, topic_name  # noqa: E402
from labbus.processors import anomaly, validation  # noqa: E402
from tests.bench.bench_pipeline import (  # noqa: E402
    bench_environment,
    drop_bench_environment,
    load_average,
    produce,
)
from tests.bench.bench_stages import GroupCommits, timed_stage  # noqa: E402

# (metric, unit, typical value, noise): two series per device
METRICS = (("temperature", "degC", 21.0, 0.1), ("humidity", "%RH", 45.0, 1.0))
SPIKE_SIGMAS = 10.0
SPIKE_GAP = 50  # readings of a series between two spikes at least


def validated_readings(n: int, devices: int, spike_every: int, warmup: int,
                       seed: int = 1) -> tuple[list[tuple[bytes, bytes]], set[str]]:
    """n encoded MeasurementValidated (key, value), round-robin over the devices, each device's
    readings alternating between its two metrics; and the measurement ids of the spikes."""
    rng = random.Random(seed)
    codec = default_codec()
    ids = [f"an-{d:04d}" for d in range(devices)]
    seen: Counter = Counter()  # readings per series
    last_spike: dict = {}
    spikes: set[str] = set()
    payloads = []
    sequence = time.time_ns() // 1000
    now_us = sequence
    for i in range(n):
        device = ids[i % devices]
        metric, unit, typical, noise = METRICS[(i // devices) % len(METRICS)]
        series = (device, metric)
        count = seen[series]
        spike = (count > warmup + 5 and count - last_spike.get(series, -SPIKE_GAP) >= SPIKE_GAP
                 and rng.random() < 1 / spike_every)
        value = (typical + rng.choice((-1, 1)) * SPIKE_SIGMAS * noise if spike
                 else rng.gauss(typical, noise))
        seen[series] = count + 1
        sequence += 1
        recorded = MeasurementRecorded.create(
            source=f"bench/{device}", subject=device, sequence=sequence, occurred_at=utcnow(),
            device_id=device, metric=metric, value=value, unit=unit)
        # what the validator writes for it (processors/validator.py), quality good
        _, plain = codec.decode_record(codec.encode(recorded), plain=True)
        out = validation.validated(plain, now_us, "validator", "good", None)
        payloads.append((device.encode(), codec.encode_plain(validation.VALIDATED, out)))
        if spike:
            spikes.add(plain["event_id"])
            last_spike[series] = count
    return payloads, spikes


async def alerts(cfg: config.Config) -> list[AnomalyDetected]:
    codec = default_codec()
    return [codec.decode(r.value)
            async for r in kafka.read_to_end(cfg, topic_name(cfg, ALERTS))]


async def main_async(args) -> None:
    base, env, cfg, db = await bench_environment()
    print(f"at start: {load_average()}")
    made = time.perf_counter()
    payloads, spikes = validated_readings(args.readings, args.devices, args.spike_every,
                                          cfg.anomaly_warmup)
    print(f"{args.readings:,} validated readings, {args.devices} devices x {len(METRICS)} "
          f"metrics, {len(spikes)} spikes of ±{SPIKE_SIGMAS:g} noise widths "
          f"(made in {time.perf_counter() - made:.0f} s)")
    validated_topic = topic_name(cfg, MEASUREMENTS_VALIDATED)
    try:
        await produce(cfg, validated_topic, payloads)
        async with GroupCommits(cfg, group_id(cfg, anomaly.PROCESS), validated_topic) as done:
            stage = await timed_stage("anomalies", ("process", "anomalies"), env, done,
                                      args.readings, poll_s=0.25)
        found = await alerts(cfg)
    finally:
        await drop_bench_environment(base, cfg, db)
    flagged = {str(a.measurement_id) for a in found}
    print(f"  {stage.worked:,} readings in {stage.elapsed_s:.1f} s after the first commit "
          f"(startup to the first commit {stage.startup_s:.1f} s; whole backlog "
          f"{args.readings / (stage.startup_s + stage.elapsed_s):,.0f} readings/s from launch)")
    print(f"  CPU {stage.cpu_s / stage.worked * 1000:.3f} s per 1,000 readings "
          f"(one core busy {stage.cpu_s / stage.elapsed_s:.0%} of the time), "
          f"peak RSS {stage.peak_rss / 2**20:,.0f} MiB")
    print(f"  AnomalyDetected: {len(found):,} events for {len(flagged):,} readings; spikes "
          f"injected {len(spikes)}, flagged {len(spikes & flagged)}, missed "
          f"{len(spikes - flagged)}; normal readings flagged {len(flagged - spikes)} "
          f"(|z| > {cfg.anomaly_threshold:g} from the noise itself)")
    print(f"machine: {psutil.cpu_count()} cores; {load_average()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--spike-every", type=int, default=1000,
                        help="about one reading in this many is a spike")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
