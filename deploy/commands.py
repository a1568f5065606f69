"""`labbus command send`: publish a CommandIssued straight to Kafka and follow it to its end.

The operator path with broker access; the gateway's SendCommand is the other path. Both derive
the command id from (device, idempotency key), so a repeated key is the same command.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Callable
from datetime import timedelta

from labbus.events import kafka
from labbus.events.codec import DecodeError, default_codec
from labbus.events.config import Config
from labbus.events.model import (
    COMMAND_FINAL,
    CommandAccepted,
    CommandCompleted,
    CommandFailed,
    CommandIssued,
    CommandRejected,
    CommandStarted,
    CommandTimedOut,
    Event,
    command_digest,
    command_id_for,
    derived_id,
    utcnow,
)
from labbus.events.runtime import Step
from labbus.events.topics import COMMANDS, topic_name

STEP = {CommandIssued.TYPE: 0, CommandAccepted.TYPE: 1, CommandStarted.TYPE: 2,
        **{t: 3 for t in COMMAND_FINAL}}


def issued_event(device: str, command_type: str, payload: dict, timeout_s: float,
                 idempotency_key: str | None, issued_by: str | None = None) -> CommandIssued:
    key = idempotency_key or str(uuid.uuid4())
    command_id = command_id_for(device, key)
    payload_json = json.dumps(payload, separators=(",", ":"))
    # the event id names what is asked: the same key with another payload is another event
    # (which the device processor refuses), with the same payload the same one
    event_id = derived_id(command_id, f"issued/{command_digest(command_type, payload_json)}")
    return CommandIssued.create(
        source="cli", subject=device, sequence=0, event_id=uuid.UUID(event_id),
        command_id=command_id, device_id=device, idempotency_key=key,
        command_type=command_type, payload_json=payload_json,
        expires_at=utcnow() + timedelta(seconds=timeout_s),
        issued_by=issued_by or f"cli/{os.environ.get('USER', 'operator')}")


async def send(cfg: Config, device: str, command_type: str, payload: dict, timeout_s: float,
               idempotency_key: str | None = None) -> CommandIssued:
    event = issued_event(device, command_type, payload, timeout_s, idempotency_key)
    await kafka.ensure_topics(cfg)
    producer = kafka.producer(cfg)
    await producer.start()
    try:
        out = Step(cfg, "cli").encode(event)
        await (await producer.send(out.topic, out.value, key=out.key))
    finally:
        await producer.stop()
    return event


def concerns(issued: CommandIssued, event: Event) -> bool:
    """An event about this request: its command, or the refusal of a reused key."""
    cid = getattr(event, "command_id", None)
    if cid == issued.command_id:
        return True
    return (isinstance(event, CommandRejected)
            and event.envelope.causation_id == issued.event_id)


async def follow(cfg: Config, issued: CommandIssued, on_event: Callable[[Event], None],
                 timeout_s: float) -> Event | None:
    """Feed each event of the command to `on_event` until a final one (returned) or timeout.
    Reads the device's partition of lab.commands from just before the command was issued."""
    from aiokafka import TopicPartition

    codec = default_codec()
    consumer = kafka.consumer(cfg, group=None, fetch_max_wait_ms=50)
    await consumer.start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    key = issued.device_id.encode()
    try:
        topic = topic_name(cfg, COMMANDS)
        await consumer._client.force_metadata_update()  # noqa: SLF001
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        since = int(issued.envelope.recorded_at.timestamp() * 1000) - 5000
        found = await consumer.offsets_for_times({tp: since for tp in tps})
        for tp in tps:
            if found.get(tp) is None:
                await consumer.seek_to_end(tp)
            else:
                consumer.seek(tp, found[tp].offset)
        while loop.time() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    if record.key != key:
                        continue
                    try:
                        event = codec.decode(record.value)
                    except DecodeError:
                        continue
                    if not concerns(issued, event):
                        continue
                    on_event(event)
                    if event.TYPE in COMMAND_FINAL:
                        return event
        return None
    finally:
        await consumer.stop()


def succeeded(event: Event) -> bool:
    return isinstance(event, CommandCompleted)


def describe(event: Event) -> str:
    if isinstance(event, CommandCompleted):
        return f"completed: {event.result_json}"
    if isinstance(event, CommandFailed):
        return f"failed: {event.error}"
    if isinstance(event, CommandRejected):
        return f"rejected ({event.reason_code}): {event.reason}"
    if isinstance(event, CommandTimedOut):
        return f"timed out (expired {event.expires_at.isoformat()})"
    if isinstance(event, CommandStarted):
        return "started" + ("" if event.progress is None else f" ({event.progress:.0%})")
    if isinstance(event, CommandAccepted):
        return "accepted"
    return "issued"
