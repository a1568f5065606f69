"""A simulated instrument fleet: device registrations and readings, with optional bad ones."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from labbus.events import kafka, metrics
from labbus.events.codec import Codec, default_codec
from labbus.events.config import Config
from labbus.events.model import DeviceRegistered, MeasurementRecorded, utcnow
from labbus.events.topics import DEVICES, MEASUREMENTS_RECORDED, topic_name

BAD_KINDS = ("wrong_unit", "out_of_range", "future_timestamp", "duplicate_event_id",
             "undecodable")

# device type -> (model, [(metric, unit, typical value, noise)])
DEVICE_TYPES = {
    "thermometer": ("Pt100-Probe", [("temperature", "degC", 37.0, 0.2)]),
    "ph-meter": ("SevenCompact", [("ph", "pH", 7.2, 0.05)]),
    "spectrophotometer": ("NanoDrop-One", [("absorbance", "AU", 0.8, 0.02),
                                           ("od600", "OD", 0.6, 0.03)]),
    "balance": ("XPR-204", [("weight", "g", 120.0, 0.01)]),
    "environment-sensor": ("SHT45", [("humidity", "%RH", 45.0, 1.0),
                                      ("temperature", "degC", 21.0, 0.1)]),
}


@dataclass
class SimDevice:
    device_id: str
    device_type: str
    location: str
    # per device, increasing across restarts of the simulator (the quality rule `sequence`):
    # starts from the clock in µs, as the gRPC simulator's devices do
    sequence: int = field(default_factory=lambda: time.time_ns() // 1000)
    sent_good: list[bytes] = field(default_factory=list)

    @property
    def source(self) -> str:
        return f"sim/{self.device_id}"

    @property
    def channels(self):
        return DEVICE_TYPES[self.device_type][1]


@dataclass
class Summary:
    """What was published: the test's and the benchmark's ground truth."""

    registered: int = 0
    good: int = 0
    bad: Counter = field(default_factory=Counter)
    good_ids: set | None = None  # filled when publish(track_ids=True)

    @property
    def readings(self) -> int:
        return self.good + sum(self.bad.values())


def make_fleet(n: int, seed: int = 0, prefix: str = "sim") -> list[SimDevice]:
    rng = random.Random(seed)
    types = sorted(DEVICE_TYPES)
    return [SimDevice(f"{prefix}-{i:04d}", types[i % len(types)], f"lab-{rng.randint(1, 4)}")
            for i in range(n)]


class FleetSimulator:
    def __init__(self, devices: list[SimDevice], seed: int = 0, bad_fraction: float = 0.0,
                 codec: Codec | None = None) -> None:
        if not 0.0 <= bad_fraction <= 1.0:
            raise ValueError(f"bad_fraction must be within [0, 1], got {bad_fraction}")
        self.devices = devices
        self.rng = random.Random(seed)
        self.bad_fraction = bad_fraction
        self.codec = codec or default_codec()
        self._bad_turn = 0

    def registrations(self) -> list[DeviceRegistered]:
        out = []
        for d in self.devices:
            d.sequence += 1
            model, channels = DEVICE_TYPES[d.device_type]
            out.append(DeviceRegistered.create(
                source=d.source, subject=d.device_id, sequence=d.sequence,
                device_id=d.device_id, device_type=d.device_type, model=model,
                location=d.location, metrics=[c[0] for c in channels],
                attributes={"simulated": "true"}, spec_version=1,
                # the quality rules' specs: the unit, and 100 noise widths either side
                specs=[{"metric": m, "unit": u, "min": typical - 100 * noise,
                        "max": typical + 100 * noise, "expected_interval_s": 1.0}
                       for m, u, typical, noise in channels]))
        return out

    def reading(self, i: int) -> tuple[bytes, bytes, str | None]:
        """The i-th message: (key, value bytes, bad kind or None)."""
        d = self.devices[i % len(self.devices)]
        metric, unit, typical, noise = d.channels[(i // len(self.devices)) % len(d.channels)]
        kind = None
        if self.bad_fraction and self.rng.random() < self.bad_fraction:
            kind = BAD_KINDS[self._bad_turn % len(BAD_KINDS)]
            self._bad_turn += 1
            if kind == "duplicate_event_id" and not d.sent_good:
                kind = "wrong_unit"
        key = d.device_id.encode()
        if kind == "undecodable":
            junk = (b"not avro at all" if self._bad_turn % 2 else
                    b"\xc3\x01" + self.rng.randbytes(8) + b"\x02garbage")
            return key, junk, kind
        if kind == "duplicate_event_id":
            return key, self.rng.choice(d.sent_good[-50:]), kind
        value = self.rng.gauss(typical, noise)
        occurred = utcnow()
        if kind == "wrong_unit":
            unit = unit + "-x"
        elif kind == "out_of_range":
            value = 1e6
        elif kind == "future_timestamp":
            occurred = occurred + timedelta(hours=1)
        d.sequence += 1
        event = MeasurementRecorded.create(
            source=d.source, subject=d.device_id, sequence=d.sequence, occurred_at=occurred,
            device_id=d.device_id, metric=metric, value=value, unit=unit)
        data = self.codec.encode(event)
        if kind is None:
            d.sent_good.append(data)
            if len(d.sent_good) > 100:
                del d.sent_good[:50]
        return key, data, kind


async def publish(cfg: Config, sim: FleetSimulator, count: int, rate: float = 0.0,
                  on_progress: Callable[[int], None] | None = None,
                  stop: asyncio.Event | None = None, track_ids: bool = False) -> Summary:
    """Register the fleet, then publish `count` readings (0 = until stopped) at `rate` per second
    (0 = as fast as the broker takes them). Returns what was sent."""
    await kafka.ensure_topics(cfg)
    summary = Summary(good_ids=set() if track_ids else None)
    devices_topic = topic_name(cfg, DEVICES)
    readings_topic = topic_name(cfg, MEASUREMENTS_RECORDED)
    producer = kafka.producer(cfg)
    await producer.start()
    try:
        for reg in sim.registrations():
            await producer.send(devices_topic, sim.codec.encode(reg), key=reg.key)
        await producer.flush()
        summary.registered = len(sim.devices)
        pending: list[asyncio.Future] = []
        started = time.monotonic()
        i = 0
        while (count == 0 or i < count) and not (stop and stop.is_set()):
            key, value, kind = sim.reading(i)
            pending.append(await producer.send(readings_topic, value, key=key))
            if kind is None:
                summary.good += 1
                if track_ids:
                    summary.good_ids.add(sim.codec.decode(value).event_id)
            else:
                summary.bad[kind] += 1
            i += 1
            if len(pending) >= 5000 or (rate and i % max(1, int(rate / 100)) == 0):
                await asyncio.gather(*pending)
                metrics.EVENTS_OUT.labels("agent", readings_topic).inc(len(pending))
                pending.clear()
                if on_progress:
                    on_progress(i)
            if rate:
                ahead = i / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await asyncio.gather(*pending)
        metrics.EVENTS_OUT.labels("agent", readings_topic).inc(len(pending))
        if on_progress:
            on_progress(i)
    finally:
        await producer.stop()
    return summary
