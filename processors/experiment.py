"""The experiment processor: runs closed-loop colour-mixing campaigns (processors/campaign.py).

Inputs: ExperimentRequested (lab.experiments), WellColourMeasured (lab.colour.readings) and
RobotRunFinished / RobotRunFailed (lab.robot.runs). State is not stored anywhere: on every start
the process reads its input topics from the beginning (no consumer group, so nothing is committed)
and folds them through the campaign functions again, which re-derive the same outputs with the same
ids. Before that it collects the ids of every event already on its output topics and sends only
outputs whose id is not there, so a restart neither loses a decision nor writes one twice. Outputs
go through labbus's idempotent acks=all producer and are awaited before the next poll.

Learning across campaigns: a new campaign is warm-started with the scored wells of other
campaigns on the same dyes whose readings are older (Kafka record time) than its request. So that
this set is the same on every replay, whatever the order the nine input partitions are read in, a
request is held back until every input partition has been read past its time (by HOLD_MS) or to its
end, and requests start in record-time order. Live, that delays a campaign's start by about HOLD_MS.
(Record times come from the producers' clocks; on one host they agree.)

Run one instance: two instances would each send every new decision (with identical ids; readers
that key on event_id drop the repeat, but the log would hold it twice).
"""

from __future__ import annotations

import asyncio
import logging
import time

from labbus.events import kafka, metrics
from labbus.events.codec import DecodeError, default_codec
from labbus.events.config import Config
from labbus.events.dead_letter import dead_letter
from labbus.events.model import (
    DeadLetter,
    Event,
    ExperimentRequested,
    RobotRunFailed,
    RobotRunFinished,
    WellColourMeasured,
)
from labbus.events.topics import (
    CATALOG,
    COLOUR_READINGS,
    DEAD_LETTER,
    EXPERIMENTS,
    ROBOT_RUNS,
    topic_name,
)
from labbus.processors.campaign import Campaigns

PROCESS = "experiment"
INPUTS = {ExperimentRequested.TYPE, WellColourMeasured.TYPE, RobotRunFinished.TYPE,
          RobotRunFailed.TYPE}
HOLD_MS = 1000  # how far past a request every input must be read before it starts
log = logging.getLogger(__name__)


def topic_of(cfg: Config, event: Event) -> str:
    for spec in CATALOG:
        if event.TYPE in spec.event_types:
            return topic_name(cfg, spec)
    raise KeyError(f"no topic carries {event.TYPE}")


async def run(cfg: Config, stop: asyncio.Event) -> None:
    await kafka.ensure_topics(cfg)
    codec = default_codec()
    outputs = (topic_name(cfg, EXPERIMENTS), topic_name(cfg, ROBOT_RUNS),
               topic_name(cfg, DEAD_LETTER))
    present: set[str] = set()
    async for record in kafka.read_to_end(cfg, *outputs):
        try:
            _, plain = codec.decode_record(record.value, plain=True)
        except DecodeError:
            continue
        present.add(plain["event_id"])
    log.info("experiment processor: %d events already in the log", len(present))

    inputs = (topic_name(cfg, EXPERIMENTS), topic_name(cfg, COLOUR_READINGS),
              topic_name(cfg, ROBOT_RUNS))
    consumer = kafka.consumer(cfg, *inputs, group=None, fetch_max_wait_ms=100)
    producer = kafka.producer(cfg)
    await producer.start()
    await consumer.start()
    campaigns = Campaigns(deck=cfg.deck_layout)
    held: list[tuple] = []  # (record time, arrival, request, partition, record)
    last_seen: dict = {}  # partition -> record time of the last record read from it

    async def send_once(produced, futures: list) -> None:
        for out in produced:
            if str(out.event_id) in present:
                continue
            present.add(str(out.event_id))
            topic = topic_of(cfg, out)
            futures.append(await producer.send(topic, codec.encode(out), key=out.key))
            metrics.EVENTS_OUT.labels(PROCESS, topic).inc()
            log.info("%s %s", out.TYPE, getattr(out, "experiment_id", ""))

    def dead(tp, record, exc: Exception) -> DeadLetter:
        return dead_letter(topic=tp.topic, partition=tp.partition, offset=record.offset,
                           key=record.key, value=record.value, error=exc, failed_by=PROCESS)

    async def handle(event: Event, at: int, futures: list, tp, record) -> None:
        try:
            produced = campaigns.handle(event, at)
        except Exception as exc:  # noqa: BLE001 - one broken campaign must not stop the rest
            log.exception("campaign step failed for %s", event.event_id)
            produced = [dead(tp, record, exc)]
        await send_once(produced, futures)

    async def read_up_to() -> float:
        """Every input older than this (record time, ms) has been read."""
        parts = list(consumer.assignment())
        if not parts:
            return float("-inf")
        ends = await consumer.end_offsets(parts)
        now = time.time() * 1000
        mark = now - HOLD_MS
        for tp in parts:
            if await consumer.position(tp) < ends[tp]:
                mark = min(mark, last_seen.get(tp, float("-inf")) - HOLD_MS)
        return mark

    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200)
            started = time.perf_counter()
            futures: list = []
            for tp, records in batch.items():
                metrics.EVENTS_IN.labels(PROCESS, tp.topic).inc(len(records))
                metrics.record_lag(PROCESS, tp.topic, tp.partition, records[-1].offset + 1,
                                   consumer.highwater(tp))
                for record in records:
                    last_seen[tp] = max(last_seen.get(tp, record.timestamp), record.timestamp)
                    try:
                        name, _ = codec.decode_record(record.value, plain=True)
                        if name not in INPUTS:
                            continue
                        event = codec.decode(record.value)
                    except DecodeError as exc:
                        await send_once([dead(tp, record, exc)], futures)
                        continue
                    if isinstance(event, ExperimentRequested):
                        held.append((record.timestamp, len(held), event, tp, record))
                        continue
                    await handle(event, record.timestamp, futures, tp, record)
            if held:
                mark = await read_up_to()
                held.sort(key=lambda h: (h[0], h[2].experiment_id))
                while held and held[0][0] < mark:
                    at, _, request, tp, record = held.pop(0)
                    await handle(request, at, futures, tp, record)
            if futures:
                await asyncio.gather(*futures)
            if batch:
                metrics.PROCESSING_SECONDS.labels(PROCESS).observe(time.perf_counter() - started)
    finally:
        await consumer.stop()
        await producer.stop()
