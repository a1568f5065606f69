"""The processing runtime: the one way a labbus process consumes, decides, produces and commits.

    record ──decode──► event ──handler──► outputs ──produce, acks=all──► input's progress durable
       └── undecodable, or the handler raised ──► DeadLetter (its id derives from the position,
                                                  so a replay sends the same one: sent once)

A *handler* is a plain function or small class with no Kafka in it: it takes a decoded event (and
the record it came in, for its log time) and returns or yields the events it decides. The drivers
here do everything around it, the same way for every process:

- `run_consumer`: a consumer group (agents, stateless processors). Outputs are produced through
  the idempotent acks=all producer; the input offsets are committed only after every output of
  the fetched batch is acknowledged.
- `run_view`: a projector. The view writes its rows and the next offsets in one transaction
  (`View.apply`); the runner seeks to the stored offsets on every assignment. An event the view
  can never write (a data error) is dead-lettered and skipped; a transient error (database or
  broker down) is retried with backoff until it succeeds.

Stateful processors run on faust (state in Tables backed by changelog topics) with the same
`Step` around their handler (`labbus.events.faust_runtime`).

Both drivers expose the same metrics (events in/out/rejected, processing time, lag, sink errors,
stalled, last progress) and log JSON lines through the standard logging module.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from labbus.events import kafka, metrics
from labbus.events.codec import Codec, DecodeError, default_codec
from labbus.events.config import Config
from labbus.events.dead_letter import dead_letter
from labbus.events.model import Event
from labbus.events.topics import DEAD_LETTER, TopicSpec, group_id, topic_for, topic_name

log = logging.getLogger(__name__)


@dataclass(slots=True)  # not frozen: one is made per message, and frozen costs 4x
class Record:
    """One input message, whichever client fetched it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int = 0  # log time, ms

    @classmethod
    def of(cls, r: Any) -> Record:
        """From an aiokafka ConsumerRecord or a faust Message."""
        return cls(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)


@dataclass(slots=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes
    reason: str | None = None  # set on dead letters: the error type


Outputs = Iterable[Event] | AsyncIterator[Event] | Awaitable[Iterable[Event] | None] | None
Handler = Callable[[Event, Record], Outputs]


class Step:
    """Decode, the dead-letter policy, routing and encoding: what every driver does around a
    handler. Events whose type is not in `accepts` are skipped (topics carry several types)."""

    def __init__(self, cfg: Config, process: str, accepts: Collection[str] | None = None,
                 codec: Codec | None = None) -> None:
        self.cfg = cfg
        self.process = process
        self.accepts = frozenset(accepts) if accepts is not None else None
        self.codec = codec or default_codec()
        self.dead_letter_topic = topic_name(cfg, DEAD_LETTER)

    def decode(self, rec: Record) -> Event | None:
        """The event, or None when this handler does not take its type. Raises DecodeError."""
        event_type, _ = self.codec.decode_record(rec.value, plain=True)
        if self.accepts is not None and event_type not in self.accepts:
            return None
        return self.codec.decode(rec.value)

    def decode_plain(self, rec: Any) -> tuple[str, dict]:
        """(event type, plain Avro record): for views, which write plain values."""
        return self.codec.decode_record(rec.value, plain=True)

    def dead_letter(self, rec: Record, error: Exception, kind: str | None = None) -> Outgoing:
        letter = dead_letter(topic=rec.topic, partition=rec.partition, offset=rec.offset,
                             key=rec.key, value=rec.value, error=error, failed_by=self.process,
                             error_type=kind)
        return Outgoing(self.dead_letter_topic, rec.key, self.codec.encode(letter),
                        letter.error_type)

    def encode(self, event: Event) -> Outgoing:
        return Outgoing(topic_for(self.cfg, event), event.key, self.codec.encode(event))

    async def outputs(self, handler: Handler, rec: Record) -> AsyncIterator[Outgoing]:
        """Everything one record leads to, in order: the handler's events, or a dead letter."""
        try:
            event = self.decode(rec)
        except DecodeError as exc:
            yield self.dead_letter(rec, exc)
            return
        if event is None:
            return
        try:
            async for out in _iterate(handler(event, rec)):
                yield self.encode(out)
        except Exception as exc:  # noqa: BLE001 - one bad event must not stop the process
            log.exception("handler failed; dead-lettering the input",
                          extra={"topic": rec.topic, "partition": rec.partition,
                                 "offset": rec.offset})
            yield self.dead_letter(rec, exc, "processing_error")


async def _iterate(result: Outputs) -> AsyncIterator[Event]:
    if inspect.isawaitable(result):
        result = await result
    if result is None:
        return
    if hasattr(result, "__aiter__"):
        async for event in result:
            yield event
    else:
        for event in result:
            yield event


class Deliveries:
    """Outputs handed to the idempotent acks=all producer; `acked()` waits for all of them."""

    def __init__(self, producer, process: str) -> None:
        self.producer = producer
        self.process = process
        self.futures: list[asyncio.Future] = []
        self.counts: dict[tuple[str, str | None], int] = {}

    async def send(self, out: Outgoing) -> None:
        self.futures.append(await self.producer.send(out.topic, out.value, key=out.key))
        self.counts[(out.topic, out.reason)] = self.counts.get((out.topic, out.reason), 0) + 1

    async def acked(self) -> None:
        futures, self.futures = self.futures, []
        await asyncio.gather(*futures)
        for (topic, reason), n in self.counts.items():
            metrics.EVENTS_OUT.labels(self.process, topic).inc(n)
            if reason:
                metrics.EVENTS_REJECTED.labels(self.process, reason).inc(n)
        self.counts.clear()


# -- riding through outages ------------------------------------------------------------------

def transient(exc: BaseException) -> bool:
    """Errors that go away by themselves: a server down, restarting or unreachable. Anything
    else raised while writing an event is a data error: retrying cannot help."""
    import asyncpg
    import pymongo.errors

    if isinstance(exc, PositionsMoved):
        return False
    if isinstance(exc, pymongo.errors.PyMongoError) and exc.has_error_label(
            "TransientTransactionError"):
        return True  # a write conflict, or the server went away mid-transaction
    return isinstance(exc, (
        OSError, ConnectionError, TimeoutError, KafkaError, asyncpg.PostgresConnectionError,
        asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
        asyncpg.AdminShutdownError, asyncpg.CrashShutdownError,
        asyncpg.TooManyConnectionsError, asyncpg.SerializationError,
        asyncpg.DeadlockDetectedError, asyncpg.LockNotAvailableError,
        pymongo.errors.ConnectionFailure, pymongo.errors.ServerSelectionTimeoutError,
        pymongo.errors.NetworkTimeout))


class Backoff:
    """Retries with exponential backoff; logs the outage once and the recovery once, and shows
    it in metrics (labbus_sink_errors_total, labbus_stalled)."""

    def __init__(self, process: str, sink: str, first_s: float = 0.2, max_s: float = 5.0) -> None:
        self.process = process
        self.sink = sink
        self.first_s = first_s
        self.max_s = max_s
        self.since: float | None = None
        self.delay = first_s

    async def failed(self, exc: BaseException, stop: asyncio.Event | None = None) -> None:
        metrics.SINK_ERRORS.labels(self.process, self.sink).inc()
        metrics.STALLED.labels(self.process).set(1)
        if self.since is None:
            self.since = time.monotonic()
            log.warning("%s unavailable; retrying until it answers", self.sink,
                        extra={"sink": self.sink, "error": repr(exc)})
        try:
            await asyncio.wait_for((stop or asyncio.Event()).wait(), self.delay)
        except TimeoutError:
            pass
        self.delay = min(self.delay * 2, self.max_s)

    def succeeded(self) -> None:
        metrics.LAST_PROGRESS.labels(self.process).set(time.time())
        if self.since is not None:
            log.warning("%s available again; resumed", self.sink,
                        extra={"sink": self.sink,
                               "outage_s": round(time.monotonic() - self.since, 1)})
            metrics.STALLED.labels(self.process).set(0)
            self.since = None
        self.delay = self.first_s


async def retrying(what: Callable[[], Awaitable[Any]], backoff: Backoff,
                   stop: asyncio.Event | None = None) -> Any:
    """`what()` until it succeeds or fails with a non-transient error (raised)."""
    while True:
        try:
            result = await what()
        except Exception as exc:
            if not transient(exc) or (stop is not None and stop.is_set()):
                raise
            await backoff.failed(exc, stop)
            continue
        backoff.succeeded()
        return result


# -- consumer groups: agents and stateless processors ------------------------------------------

async def run_consumer(cfg: Config, process: str, topics: Collection[TopicSpec], handler: Handler,
                       stop: asyncio.Event, *, accepts: Collection[str] | None = None,
                       max_records: int = 500, codec: Codec | None = None,
                       first_run_since_ms: int | None = None) -> None:
    """Consume `topics` in the group of `process`; hand each accepted event to
    `handler`; produce its outputs; commit the batch's offsets once all are acknowledged. A
    failed delivery or commit (broker down) is retried from the last committed offsets.
    `first_run_since_ms`: a group that has never committed starts at the records of that time
    (kafka.start_new_group_at), not at the beginning of the topics."""
    step = Step(cfg, process, accepts, codec)
    names = [topic_name(cfg, t) for t in topics]
    await retrying(lambda: kafka.ensure_topics(cfg), Backoff(process, "kafka"), stop)
    if first_run_since_ms is not None:
        started_at = await retrying(lambda: kafka.start_new_group_at(
            cfg, group_id(cfg, process), names, first_run_since_ms),
            Backoff(process, "kafka"), stop)
        if started_at:
            log.info("first run: starts at the given time", extra={"partitions": started_at})
    consumer = kafka.consumer(cfg, group=group_id(cfg, process),
                              group_instance_id=kafka.member(cfg))
    recall = _Recall(cfg, step, handler, consumer)
    consumer.subscribe(names, listener=recall)
    producer = kafka.producer(cfg)
    backoff = Backoff(process, "kafka")
    await retrying(producer.start, backoff, stop)
    await retrying(consumer.start, backoff, stop)
    log.info("started", extra={"topics": names, "group": group_id(cfg, process)})
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=max_records)
            if not batch:
                continue
            started = time.perf_counter()
            sent = Deliveries(producer, process)
            try:
                await recall.catch_up()
                for tp, records in batch.items():
                    metrics.EVENTS_IN.labels(process, tp.topic).inc(len(records))
                    for r in records:
                        async for out in step.outputs(handler, Record.of(r)):
                            await sent.send(out)
                await sent.acked()
                await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batch.items()})
            except KafkaError as exc:  # not acked or not committed: redo from the committed
                await backoff.failed(exc, stop)
                for tp in consumer.assignment():
                    committed = await consumer.committed(tp)
                    if committed is None:
                        await consumer.seek_to_beginning(tp)
                    else:
                        consumer.seek(tp, committed)
                continue
            backoff.succeeded()
            metrics.PROCESSING_SECONDS.labels(process).observe(time.perf_counter() - started)
            for tp, records in batch.items():
                metrics.record_lag(process, tp.topic, tp.partition, records[-1].offset + 1,
                                   consumer.highwater(tp))
    finally:
        await consumer.stop()
        await producer.stop()
        log.info("stopped")


class _Recall(ConsumerRebalanceListener):
    """For a handler with a `recall(event_type, plain_record)` method: after every assignment,
    before any record of a newly assigned partition is handled, the records between the group's
    committed offset and the log's end are shown to it. When a handler writes to its input topic
    (same key, so same partition), that range holds what it sent for inputs that were not
    committed before a crash, so it can skip sending it again. (aiokafka may fetch while an
    assignment callback still runs, so the callback only notes the partitions.)"""

    def __init__(self, cfg: Config, step: Step, handler: Handler, consumer) -> None:
        self.cfg = cfg
        self.step = step
        self.recall = getattr(handler, "recall", None)
        self.consumer = consumer
        self.pending: set[TopicPartition] = set()

    async def on_partitions_revoked(self, revoked) -> None:
        self.pending -= set(revoked)

    async def on_partitions_assigned(self, assigned) -> None:
        if self.recall is not None:
            self.pending |= set(assigned)

    async def catch_up(self) -> None:
        if not self.pending:
            return
        tps = set(self.pending)
        starts = {tp: await self.consumer.committed(tp) for tp in tps}
        seen = 0
        async for r in kafka.read_ranges(self.cfg, starts):
            try:
                self.recall(*self.step.decode_plain(r))
                seen += 1
            except DecodeError:
                pass  # dead-lettered when it is consumed
        self.pending -= tps
        log.info("recalled the uncommitted range", extra={"records": seen})


# -- views: projectors ------------------------------------------------------------------------

@dataclass(slots=True)  # not frozen: one is made per event, and frozen costs 4x
class Positioned:
    """A decoded event, as a plain Avro record (uuids str, timestamps int micros), and where it
    sits in the log."""

    tp: TopicPartition
    offset: int
    event_type: str
    record: dict
    key: bytes | None = None  # the original message, for a dead letter
    value: bytes | None = None


class PositionsMoved(RuntimeError):
    """The stored positions are not those this view last read or wrote: commits were lost in a
    database crash, or another projector wrote. Nothing of the batch was written."""


class Fence:
    """The positions a view last read or wrote. A write first reads (and, where the store can,
    locks) the stored positions of the partitions it is about to move and `check`s them: if they
    are not what this view believes (commits lost in a database crash, or another writer), the
    write is refused whole."""

    def __init__(self) -> None:
        self.believed: dict[TopicPartition, int] = {}

    def known(self, next_offsets: dict[TopicPartition, int]) -> list[TopicPartition]:
        """The partitions to check (one this view has not seen yet is not checked)."""
        return [tp for tp in next_offsets if tp in self.believed]

    def check(self, known: list[TopicPartition], stored: dict[TopicPartition, int]) -> None:
        """`stored`: the stored positions of the `known` partitions."""
        moved = {f"{tp.topic}/{tp.partition}": (self.believed[tp], stored.get(tp))
                 for tp in known if stored.get(tp) != self.believed[tp]}
        if moved:
            raise PositionsMoved(f"stored positions differ from this projector's: {moved} "
                                 "(believed, stored)")


class View(Protocol):
    """A read model: rows and positions in one transaction, idempotently."""

    name: str

    def topics(self) -> list[str]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def positions(self) -> dict[TopicPartition, int]:
        """Next offset to read for each partition this view has seen."""

    async def apply(self, events: list[Positioned],
                    next_offsets: dict[TopicPartition, int]) -> None:
        """Write the events and the next offsets durably, atomically, idempotently; raise
        PositionsMoved when the stored positions are not the ones last read or written."""


class _Assigned(ConsumerRebalanceListener):
    """Notes newly assigned partitions; the runner seeks them to the view's stored positions
    before it writes anything of them (aiokafka may fetch, and the runner write, while an
    assignment callback still runs, so seeking in the callback itself races the runner)."""

    def __init__(self) -> None:
        self.pending: set[TopicPartition] = set()

    async def on_partitions_revoked(self, revoked) -> None:
        self.pending -= set(revoked)

    async def on_partitions_assigned(self, assigned) -> None:
        self.pending |= set(assigned)


class _ViewRunner:
    def __init__(self, cfg: Config, view: View, stop: asyncio.Event, codec: Codec | None):
        self.cfg = cfg
        self.view = view
        self.stop = stop
        self.process = f"projector-{view.name}"
        self.step = Step(cfg, self.process, codec=codec)
        self.db = Backoff(self.process, f"view-{view.name}")
        self.broker = Backoff(self.process, "kafka")
        self.consumer = kafka.consumer(cfg, group=group_id(cfg, f"projector.{view.name}"),
                                       group_instance_id=kafka.member(cfg))
        self.producer = kafka.producer(cfg)
        self.assigned = _Assigned()

    async def seek_to_stored(self, tps) -> dict[TopicPartition, int]:
        stored = await retrying(self.view.positions, self.db, self.stop)
        for tp in tps:
            if tp in stored:
                self.consumer.seek(tp, stored[tp])
            else:
                await self.consumer.seek_to_beginning(tp)
        return stored

    async def run(self, max_records: int) -> None:
        await retrying(lambda: kafka.ensure_topics(self.cfg), self.broker, self.stop)
        await retrying(self.view.start, self.db, self.stop)
        self.consumer.subscribe(self.view.topics(), listener=self.assigned)
        await retrying(self.producer.start, self.broker, self.stop)
        await retrying(self.consumer.start, self.broker, self.stop)
        log.info("started", extra={"view": self.view.name, "topics": self.view.topics()})
        try:
            while not self.stop.is_set():
                batches = await self.consumer.getmany(timeout_ms=200, max_records=max_records)
                if self.assigned.pending:
                    tps = set(self.assigned.pending)
                    stored = await self.seek_to_stored(tps)
                    self.assigned.pending -= tps
                    batches = {tp: rs for tp, rs in batches.items() if tp not in tps}
                    log.info("partitions assigned", extra={
                        "view": self.view.name,
                        "positions": {f"{tp.topic}/{tp.partition}": stored.get(tp, 0)
                                      for tp in tps}})
                if batches:
                    await self.project(batches)
        finally:
            await self.consumer.stop()
            await self.producer.stop()
            await self.view.stop()
            log.info("stopped", extra={"view": self.view.name})

    async def project(self, batches: dict) -> None:
        started = time.perf_counter()
        decoded: list[Positioned] = []
        next_offsets: dict[TopicPartition, int] = {}
        dead = Deliveries(self.producer, self.process)
        for tp, records in batches.items():
            metrics.EVENTS_IN.labels(self.process, tp.topic).inc(len(records))
            for r in records:
                try:
                    decoded.append(Positioned(tp, r.offset, *self.step.decode_plain(r),
                                              r.key, r.value))
                except DecodeError as exc:
                    await dead.send(self.step.dead_letter(Record.of(r), exc))
            next_offsets[tp] = records[-1].offset + 1
        await retrying(dead.acked, self.broker, self.stop)  # before the position passes them
        try:
            await self.apply(decoded, next_offsets)
        except PositionsMoved as exc:
            log.warning("positions moved; replaying from the stored ones",
                        extra={"view": self.view.name, "error": str(exc)})
            await self.seek_to_stored(self.consumer.assignment())
            return
        try:
            await self.consumer.commit(next_offsets)
        except KafkaError as exc:  # the database holds the position; this is only for tools
            log.warning("kafka commit failed", extra={"error": repr(exc)})
        metrics.EVENTS_OUT.labels(self.process, self.view.name).inc(len(decoded))
        metrics.PROCESSING_SECONDS.labels(self.process).observe(time.perf_counter() - started)
        for tp, nxt in next_offsets.items():
            metrics.record_lag(self.process, tp.topic, tp.partition, nxt,
                               self.consumer.highwater(tp))

    async def apply(self, events: list[Positioned],
                    next_offsets: dict[TopicPartition, int]) -> None:
        """The batch in one transaction; on a data error, event by event, dead-lettering the
        ones that can never be written and moving the position past them."""
        try:
            await retrying(lambda: self.view.apply(events, next_offsets), self.db, self.stop)
            return
        except PositionsMoved:
            raise
        except Exception as exc:  # noqa: BLE001 - a data error somewhere in the batch
            log.warning("batch not writable; writing it event by event",
                        extra={"view": self.view.name, "error": repr(exc)})
        by_tp: dict[TopicPartition, list[Positioned]] = {}
        for p in events:
            by_tp.setdefault(p.tp, []).append(p)
        for tp, nxt in next_offsets.items():
            for p in by_tp.get(tp, []):
                try:
                    await retrying(lambda p=p: self.view.apply([p], {p.tp: p.offset + 1}),
                                   self.db, self.stop)
                except PositionsMoved:
                    raise
                except Exception as exc:  # noqa: BLE001 - this one event can never be written
                    await self.skip(p, exc)
            await retrying(lambda tp=tp, nxt=nxt: self.view.apply([], {tp: nxt}),
                           self.db, self.stop)

    async def skip(self, p: Positioned, exc: Exception) -> None:
        log.error("event cannot be written; dead-lettered",
                  extra={"view": self.view.name, "topic": p.tp.topic,
                         "partition": p.tp.partition, "offset": p.offset, "error": repr(exc)})
        rec = Record(p.tp.topic, p.tp.partition, p.offset, p.key, p.value)
        dead = Deliveries(self.producer, self.process)
        await dead.send(self.step.dead_letter(rec, exc, "unwritable"))
        await retrying(dead.acked, self.broker, self.stop)
        await retrying(lambda: self.view.apply([], {p.tp: p.offset + 1}), self.db, self.stop)


async def run_view(cfg: Config, view: View, stop: asyncio.Event | None = None,
                   max_records: int = 5000, codec: Codec | None = None) -> None:
    """Project the view's topics into it until `stop` is set."""
    await _ViewRunner(cfg, view, stop or asyncio.Event(), codec).run(max_records)
