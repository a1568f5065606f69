"""The projector loop shared by every read model.

A projection stores the next offset of each partition together with its rows, in one transaction.
On (re)assignment the runner seeks to those stored offsets, so a crash at any moment neither
loses nor duplicates rows. Kafka commits are made afterwards only so that lag shows in tools.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from labbus.events import kafka, metrics
from labbus.events.codec import Codec, DecodeError, default_codec
from labbus.events.config import Config
from labbus.events.topics import DEAD_LETTER, topic_name
from labbus.events.dead_letter import dead_letter

log = logging.getLogger(__name__)


@dataclass(slots=True)  # not frozen: one is made per event, and frozen costs 4x
class Positioned:
    """A decoded event, as a plain Avro record (uuids str, timestamps int micros), and where it
    sits in the log."""

    tp: TopicPartition
    offset: int
    event_type: str
    record: dict


class PositionsMoved(RuntimeError):
    """The stored positions are not those this projector last read or wrote: commits were lost
    in a database crash, or another projector wrote. Nothing of the batch was written."""


class Projection(Protocol):
    name: str

    def topics(self) -> list[str]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def positions(self) -> dict[TopicPartition, int]:
        """Next offset to read for each partition this projection has seen."""

    async def apply(self, events: list[Positioned],
                    next_offsets: dict[TopicPartition, int]) -> None:
        """Write the events and the next offsets durably, atomically, idempotently."""


class _SeekToStored(ConsumerRebalanceListener):
    def __init__(self, projection: Projection, consumer) -> None:
        self.projection = projection
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked) -> None:
        pass

    async def on_partitions_assigned(self, assigned) -> None:
        stored = await seek_to_stored(self.projection, self.consumer, assigned)
        log.info("partitions assigned", extra={
            "projection": self.projection.name,
            "positions": {f"{tp.topic}/{tp.partition}": stored.get(tp, 0) for tp in assigned}})


async def seek_to_stored(projection: Projection, consumer, tps) -> dict[TopicPartition, int]:
    stored = await projection.positions()
    for tp in tps:
        if tp in stored:
            consumer.seek(tp, stored[tp])
        else:
            await consumer.seek_to_beginning(tp)
    return stored


async def run(cfg: Config, projection: Projection, stop: asyncio.Event | None = None,
              max_records: int = 5000, codec: Codec | None = None) -> None:
    codec = codec or default_codec()
    process = f"projector-{projection.name}"
    await kafka.ensure_topics(cfg)
    await projection.start()
    consumer = kafka.consumer(cfg, group=f"{cfg.namespace + '.' if cfg.namespace else ''}"
                              f"labbus.projector.{projection.name}")
    consumer.subscribe(projection.topics(), listener=_SeekToStored(projection, consumer))
    dlq = kafka.producer(cfg)
    dlq_topic = topic_name(cfg, DEAD_LETTER)
    await consumer.start()
    await dlq.start()
    stop = stop or asyncio.Event()
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=max_records)
            if not batches:
                continue
            started = time.perf_counter()
            decoded: list[Positioned] = []
            next_offsets: dict[TopicPartition, int] = {}
            for tp, records in batches.items():
                for rec in records:
                    try:
                        decoded.append(Positioned(tp, rec.offset,
                                                  *codec.decode_record(rec.value, plain=True)))
                    except DecodeError as exc:
                        dead = dead_letter(topic=tp.topic, partition=tp.partition,
                                           offset=rec.offset, key=rec.key, value=rec.value,
                                           error=exc, failed_by=process)
                        await (await dlq.send(dlq_topic, codec.encode(dead), key=rec.key))
                        metrics.EVENTS_REJECTED.labels(process, exc.kind).inc()
                next_offsets[tp] = records[-1].offset + 1
                metrics.EVENTS_IN.labels(process, tp.topic).inc(len(records))
            try:
                await projection.apply(decoded, next_offsets)
            except PositionsMoved as exc:
                log.warning("positions moved; replaying from the stored ones",
                            extra={"projection": projection.name, "error": str(exc)})
                await seek_to_stored(projection, consumer, consumer.assignment())
                continue
            try:
                await consumer.commit(next_offsets)
            except KafkaError as exc:  # the database holds the position; this is only for tools
                log.warning("kafka commit failed", extra={"error": repr(exc)})
            metrics.PROCESSING_SECONDS.labels(process).observe(time.perf_counter() - started)
            for tp, nxt in next_offsets.items():
                metrics.record_lag(process, tp.topic, tp.partition, nxt, consumer.highwater(tp))
    finally:
        await consumer.stop()
        await dlq.stop()
        await projection.stop()
