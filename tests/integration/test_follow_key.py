"""`kafka.follow_key` (what `labbus experiment watch` and `labbus command send --wait` follow a
campaign or a command with) against the real broker: one key's events in log order, other keys
and records that do not decode skipped, a start time, a timeout."""

from __future__ import annotations

import asyncio
import time
import uuid

from labbus.deploy import experiment as exp
from labbus.events import kafka
from labbus.events.codec import default_codec
from labbus.events.model import ExperimentRejected
from labbus.events.topics import EXPERIMENTS, topic_name
from tests.conftest import run


def _rejected(xid: str, reason: str) -> ExperimentRejected:
    return ExperimentRejected.create(source="fk-test", subject=xid, sequence=0, experiment_id=xid,
                                     reason=reason)


async def _publish(cfg, records: list[tuple[str, bytes]]) -> None:
    await kafka.ensure_topics(cfg)
    producer = kafka.producer(cfg)
    await producer.start()
    try:
        topic = topic_name(cfg, EXPERIMENTS)
        await asyncio.gather(*[await producer.send(topic, value, key=key.encode())
                               for key, value in records])
    finally:
        await producer.stop()


def test_follow_one_keys_events_to_the_end(cfg):
    codec = default_codec()
    mine, other = f"fk-{uuid.uuid4().hex[:8]}", f"fk-{uuid.uuid4().hex[:8]}"
    request = exp.request("#759e8f", budget=8, batch=8, dyes=["red", "yellow", "blue"],
                          experiment_id=mine, requested_by="fk")
    verdict = _rejected(mine, "the verdict")
    run(_publish(cfg, [(mine, codec.encode(request)), (other, codec.encode(_rejected(other, "x"))),
                       (mine, b"not an event"), (mine, codec.encode(verdict)),
                       (mine, codec.encode(_rejected(mine, "after the verdict")))]))
    seen = []
    final = run(exp.watch(cfg, mine, seen.append, timeout_s=30))
    assert final == verdict
    assert [type(e).__name__ for e in seen] == ["ExperimentRequested", "ExperimentRejected"]
    assert seen[0].event_id == request.event_id
    # from a start time after all of it: nothing of this key comes, the timeout ends it
    started = time.monotonic()
    later = []
    assert run(kafka.follow_key(cfg, topic_name(cfg, EXPERIMENTS), mine,
                                lambda e: later.append(e) or True, timeout_s=2,
                                since_ms=int(time.time() * 1000) + 60_000)) is None
    assert later == [] and 2 <= time.monotonic() - started < 15
