"""The registered measurement specs of every device, followed from the compacted `lab.devices`.

A process that judges readings against device specs (the validator) holds all of them: it reads
`lab.devices` from the beginning at start (compaction keeps it to about one registration per
device), is `ready` once it reached the end offsets found then, and follows it from there on, so
a re-registration with new specs (a new DeviceRegistered, README "Instrument gateway") applies
to the readings decided after it was read. No consumer group, nothing committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from labbus.events import kafka
from labbus.events.codec import Codec, DecodeError, default_codec
from labbus.events.config import Config
from labbus.events.model import DeviceRegistered
from labbus.events.runtime import Backoff, retrying
from labbus.events.topics import DEVICES, topic_name

log = logging.getLogger(__name__)

# metric -> (unit, min or None, max or None)
MetricSpecs = dict[str, tuple[str, float | None, float | None]]


def metric_specs(event: DeviceRegistered) -> MetricSpecs:
    return {s["metric"]: (s["unit"], s.get("min"), s.get("max")) for s in event.specs}


class DeviceSpecs:
    """device id -> its latest registration's specs by metric (`by_device`, read on the hot
    path; a device registered without specs maps to {})."""

    def __init__(self, cfg: Config, codec: Codec | None = None) -> None:
        self.cfg = cfg
        self.codec = codec or default_codec()
        self.topic = topic_name(cfg, DEVICES)
        self.by_device: dict[str, MetricSpecs] = {}
        self.versions: dict[str, int] = {}
        self.ready = asyncio.Event()

    def read(self, key: bytes | None, value: bytes | None) -> None:
        """One record of lab.devices."""
        if value is None:  # a tombstone: the device is gone
            if key is not None:
                self.by_device.pop(key.decode("utf-8", "replace"), None)
            return
        try:
            event = self.codec.decode(value)
        except DecodeError:
            return  # not ours to dead-letter: the projectors do
        if not isinstance(event, DeviceRegistered):
            return
        if event.spec_version < self.versions.get(event.device_id, 0):
            return  # an older version read after a newer one (compaction keeps the last)
        self.versions[event.device_id] = event.spec_version
        self.by_device[event.device_id] = metric_specs(event)

    async def follow(self, stopping: Callable[[], bool]) -> None:
        from aiokafka import TopicPartition

        backoff = Backoff("device-specs", "kafka")
        consumer = kafka.consumer(self.cfg, group=None)
        await retrying(consumer.start, backoff)
        try:
            tps = [TopicPartition(self.topic, p) for p in range(DEVICES.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            started = time.monotonic()
            n = 0
            while not stopping():
                batch: dict[Any, list] = await consumer.getmany(timeout_ms=200,
                                                               max_records=5000)
                for records in batch.values():
                    for r in records:
                        n += 1
                        self.read(r.key, r.value)
                if not self.ready.is_set() and all(
                        [await consumer.position(tp) >= end for tp, end in ends.items()]):
                    log.info("device specs read", extra={
                        "records": n, "devices": len(self.by_device),
                        "seconds": round(time.monotonic() - started, 2)})
                    self.ready.set()
        finally:
            await consumer.stop()
