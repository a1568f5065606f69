"""Kafka helpers: producer and consumer factories with labbus's guarantees, topic creation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from labbus.events.config import Config
from labbus.events.topics import CATALOG, TopicSpec, topic_for, topic_name

if TYPE_CHECKING:
    from labbus.events.model import Event

log = logging.getLogger(__name__)


def producer(cfg: Config, **overrides) -> AIOKafkaProducer:
    """acks=all and idempotence: a send that succeeded is on the broker exactly once."""
    options = dict(
        bootstrap_servers=cfg.kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=256 * 1024,
        compression_type=None,
    )
    options.update(overrides)
    return AIOKafkaProducer(**options)


def consumer(cfg: Config, *topics: str, group: str | None, **overrides) -> AIOKafkaConsumer:
    """Auto-commit off: each process commits only after its own work is durable."""
    options = dict(
        bootstrap_servers=cfg.kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=16 * 1024 * 1024,
        fetch_max_wait_ms=100,
        # A member that dies without leaving the group (kill -9, a lost host) holds its
        # partitions until the broker has missed its heartbeats for the session timeout, so a
        # restarted process works again about that long after a crash. 10 s with a heartbeat
        # every 3 s (aiokafka's defaults, stated here so that they hold whatever its defaults
        # become; faust's are 60 s, see processors/validator.py) tolerates an event loop busy for
        # a few seconds on a loaded machine; the broker accepts 6 s to 30 min.
        session_timeout_ms=10_000,
        heartbeat_interval_ms=3_000,
    )
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


async def ensure_topics(cfg: Config, specs: tuple[TopicSpec, ...] = CATALOG,
                        timeout_s: float = 30.0) -> list[str]:
    """Create missing topics of the catalog; existing ones are left as they are. Returns created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=cfg.kafka_bootstrap, request_timeout_ms=15000)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await admin.start()
            break
        except KafkaConnectionError:
            if asyncio.get_running_loop().time() > deadline:
                raise ConnectionError(
                    f"Kafka at LABBUS_KAFKA_BOOTSTRAP={cfg.kafka_bootstrap} does not answer; "
                    "start it with `labbus services up`") from None
            await asyncio.sleep(0.5)
    try:
        existing = set(await admin.list_topics())
        wanted = [s for s in specs if topic_name(cfg, s) not in existing]
        created = []
        for spec in wanted:
            name = topic_name(cfg, spec)
            try:
                await admin.create_topics([NewTopic(name, spec.partitions, 1,
                                                    topic_configs=spec.configs())])
                created.append(name)
            except TopicAlreadyExistsError:
                pass  # another process created it meanwhile
        if created:
            log.info("created topics", extra={"topics": created})
        return created
    finally:
        await admin.close()


async def publish(cfg: Config, *events) -> None:
    """Send events to the catalog topics of their types (keyed by subject) and wait for the
    broker's acks: a one-off producer for command-line tools, not for a process's hot path."""
    from labbus.events.codec import default_codec

    await ensure_topics(cfg)
    codec = default_codec()
    sender = producer(cfg)
    await sender.start()
    try:
        for event in events:
            await (await sender.send(topic_for(cfg, event), codec.encode(event), key=event.key))
    finally:
        await sender.stop()


async def delete_namespace_topics(cfg: Config, namespace: str) -> list[str]:
    """Delete every topic of a namespace: its catalog topics and its faust apps' internal ones
    (what a benchmark or test run leaves behind on a shared broker). Returns the deleted names."""
    if not namespace:
        raise ValueError("refusing to delete the topics of the empty (production) namespace")
    admin = AIOKafkaAdminClient(bootstrap_servers=cfg.kafka_bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(namespace + ".")]
        if names:
            await admin.delete_topics(names)
        return names
    finally:
        await admin.close()


async def read_to_end(cfg: Config, *topics: str):
    """Yield every record of `topics` from the beginning up to their end offsets at call time
    (no consumer group, nothing committed)."""
    async for record in read_ranges(cfg, {t: None for t in topics}):
        yield record


async def read_ranges(cfg: Config, starts: dict):
    """Yield the records of each partition from its start offset up to its end offset at call
    time. `starts`: {TopicPartition: offset or None (the beginning)}, or {topic name: None} for
    every partition of a topic from the beginning. No consumer group, nothing committed."""
    from aiokafka import TopicPartition

    reader = consumer(cfg, group=None)
    await reader.start()
    try:
        await reader._client.force_metadata_update()  # noqa: SLF001 - topics may be brand new
        begin: dict = {}
        for where, offset in starts.items():
            if isinstance(where, str):
                for p in sorted(reader.partitions_for_topic(where) or ()):
                    begin[TopicPartition(where, p)] = None
            else:
                begin[where] = offset
        if not begin:
            return
        reader.assign(list(begin))
        end = await reader.end_offsets(list(begin))
        for tp, offset in begin.items():
            if offset is None:
                await reader.seek_to_beginning(tp)
            else:
                reader.seek(tp, offset)
        left = {tp for tp in begin if end[tp] > (begin[tp] or 0)}
        while left:
            batch = await reader.getmany(*left, timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    if record.offset < end[tp]:
                        yield record
            for tp in list(left):
                if await reader.position(tp) >= end[tp]:
                    left.discard(tp)
    finally:
        await reader.stop()


async def follow_key(cfg: Config, topic: str, key: str, on_event: Callable[[Event], bool],
                     timeout_s: float | None = None, since_ms: int | None = None,
                     fetch_max_wait_ms: int = 100) -> Event | None:
    """Decode each record of `topic` with this key, in log order, and feed it to `on_event` until
    it returns True (that event is returned) or `timeout_s` passes (None: no timeout).
    Reads every partition from its first record at or after log time `since_ms` (a partition
    with none: from its end), else from the beginning; records that do not decode are skipped. A
    topic that does not exist yet is waited for. No consumer group, nothing committed."""
    from aiokafka import TopicPartition

    from labbus.events.codec import DecodeError, default_codec

    codec = default_codec()
    reader = consumer(cfg, group=None, fetch_max_wait_ms=fetch_max_wait_ms)
    await reader.start()
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    wanted = key.encode()
    try:
        while True:
            await reader._client.force_metadata_update()  # noqa: SLF001 - topics may be new
            partitions = sorted(reader.partitions_for_topic(topic) or ())
            if partitions:
                break
            if deadline is not None and loop.time() >= deadline:
                return None
            await asyncio.sleep(0.5)
        tps = [TopicPartition(topic, p) for p in partitions]
        reader.assign(tps)
        if since_ms is None:
            await reader.seek_to_beginning(*tps)
        else:
            # the ends first: a record appended after the time lookup is at or past them
            ends = await reader.end_offsets(tps)
            found = await reader.offsets_for_times({tp: since_ms for tp in tps})
            for tp in tps:
                reader.seek(tp, ends[tp] if found.get(tp) is None else found[tp].offset)
        while deadline is None or loop.time() < deadline:
            for records in (await reader.getmany(timeout_ms=200)).values():
                for record in records:
                    if record.key != wanted:
                        continue
                    try:
                        event = codec.decode(record.value)
                    except DecodeError:
                        continue
                    if on_event(event):
                        return event
        return None
    finally:
        await reader.stop()
