"""The faust driver for stateful processors: state in faust Tables backed by changelog topics.

    record ──Step.decode──► event ──handler(state, event, record, shared)──► (new state, outputs)
       │                                                                         │
       └─ undecodable, or the handler raised ──► DeadLetter (once)               ▼
                   outputs produced through Deliveries (idempotent, acks=all), acknowledged
                   ──► then the Table (and the shared table) updated
                   ──► the changelog flushed in batches (every FLUSH_EVERY writes or
                       FLUSH_AFTER_S): no offset is committed past a state write not yet
                       flushed, so faust commits an input only after all of the above

A processor is its input topics (all co-partitioned: same key, same partition count), a plain
handler and the names of its tables; this module builds the faust app around them:

- a **Table keyed by the input key** (the aggregate id): `handler` gets that key's value (None
  when there is none) and returns the new value (None deletes the key; return the same object
  to leave it as it is). Values must be JSON-able; the handler must not modify the value it was
  given. Its outputs are events (routed by type) or `Outgoing` records (a topic, key and bytes
  of its choosing: a repartition, e.g. processors/quota.py re-keys inputs by user). Table
  partition p lives on the worker that owns input partition p: two workers share the
  partitions and every key is decided by exactly one of them; a restarted worker recovers its
  partitions from the changelog (compacted), not from the input topics.
- optionally a **shared table** every worker holds in full (`SharedLog`, e.g. learning shared
  across aggregates), passed to the handler as `Shared`: reads see the table plus this event's
  writes, which are produced with the outputs. A worker writes only keys of its own partitions,
  which keeps one writer per key (see processors/experiment.py).

Processing guarantee: at-least-once (faust's default; README "Guarantees"). A crash between the
outputs' acks and the changelog's leaves the input uncommitted: it is handled again on restart
against the state before it and re-emits the same events with the same ids (handlers derive ids
from their inputs), which id-keyed consumers drop. An input handled again against a state that
already holds it (changelog written, offset not yet committed) must decide nothing new: handlers
are idempotent per input. With batched flushes a restart may find the state of some of the
uncommitted inputs of a partition on the changelog and not others — always a prefix in log
order (one input partition writes one changelog partition, in order), and every output of that
prefix acknowledged before its state was written.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import faust
import faust.streams as faust_streams
import mode

from labbus.events import kafka, metrics
from labbus.events.codec import Codec, DecodeError
from labbus.events.config import Config
from labbus.events.model import Event
from labbus.events.runtime import (
    Backoff,
    Deliveries,
    Outgoing,
    Record,
    Step,
    retrying,
    transient,
)
from labbus.events.topics import TopicSpec, group_id, topic_name

log = logging.getLogger(__name__)


class Shared:
    """A GlobalTable as one event's handler sees it: the table plus this event's own writes,
    which reach the table only once the event's outputs are acknowledged (`apply`). Any mapping
    will do as the table (a dict in unit tests)."""

    def __init__(self, table: Any = None) -> None:
        self.table = {} if table is None else table
        self.writes: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.writes:
            return self.writes[key]
        return self.table.get(key, default)

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key: str) -> bool:
        return key in self.writes or key in self.table

    def __setitem__(self, key: str, value: Any) -> None:
        self.writes[key] = value

    def apply(self) -> bool:
        """Write the staged values into the table; True when there were any."""
        for key, value in self.writes.items():
            self.table[key] = value
        wrote = bool(self.writes)
        self.writes = {}
        return wrote


_MISSING = object()


async def _read_to(consumer: Any, ends: dict) -> bool:
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True

CHANGELOG_CONFIGS = {  # compacted and cleaned often: a reader reads ~one record per live key
    "cleanup.policy": "compact", "segment.ms": "60000", "min.cleanable.dirty.ratio": "0.1",
    "delete.retention.ms": "60000", "min.insync.replicas": "1"}


class SharedLog:
    """A table every worker holds in full: a compacted topic, read from the beginning at start
    (compaction keeps it to about one record per key) and followed from then on; each worker
    writes only keys nobody else writes (the experiment processor puts its partition in them).

    faust's GlobalTable is the same idea, but written from a stream it stopped the stream: with
    faust-streaming 0.15.3 the agent received no further events after the first write (with
    and without `synchronize_all_active_partitions`), so labbus keeps this one itself."""

    def __init__(self, cfg: Config, topic: str, partitions: int) -> None:
        self.cfg = cfg
        self.topic = topic
        self.partitions = partitions
        self.values: dict[str, Any] = {}
        self.own: dict[str, Any] = {}  # written here, not yet read back
        self.ready = asyncio.Event()  # read to the end offsets found at start

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def __setitem__(self, key: str, value: Any) -> None:
        """A local write: visible at once; its record reaches the topic through `outgoing`."""
        self.values[key] = value
        self.own[key] = value

    def outgoing(self, writes: dict[str, Any]) -> list[Outgoing]:
        return [Outgoing(self.topic, json.dumps(k).encode(),
                         json.dumps(v, separators=(",", ":")).encode())
                for k, v in writes.items()]

    async def create(self) -> None:
        from aiokafka.admin import NewTopic
        from aiokafka.errors import TopicAlreadyExistsError

        admin = kafka.admin(self.cfg)
        await admin.start()
        try:
            if self.topic not in set(await admin.list_topics()):
                try:
                    await admin.create_topics([NewTopic(self.topic, self.partitions, 1,
                                                        topic_configs=CHANGELOG_CONFIGS)])
                except TopicAlreadyExistsError:
                    pass
        finally:
            await admin.close()

    async def follow(self, stopping: Callable[[], bool]) -> None:
        from aiokafka import TopicPartition

        await retrying(self.create, Backoff("shared", "kafka"))
        consumer = kafka.consumer(self.cfg, group=None)
        await retrying(consumer.start, Backoff("shared", "kafka"))
        try:
            tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            started = time.monotonic()
            n = 0
            while not stopping():
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
                for records in batch.values():
                    for r in records:
                        n += 1
                        self.read(json.loads(r.key), None if r.value is None
                                  else json.loads(r.value))
                if not self.ready.is_set() and await _read_to(consumer, ends):
                    log.info("shared table read", extra={
                        "topic": self.topic, "records": n, "keys": len(self.values),
                        "seconds": round(time.monotonic() - started, 2)})
                    self.ready.set()
        finally:
            await consumer.stop()

    def read(self, key: str, value: Any) -> None:
        """A record read from the topic."""
        if key in self.own:  # our own write: keep it until its record comes back
            if self.own[key] == value:
                del self.own[key]
            return
        if value is None:
            self.values.pop(key, None)
        else:
            self.values[key] = value

class View:
    """A read-only table every worker holds in full, decoded from catalog topics read from the
    beginning and followed (e.g. the compacted registrations on lab.devices, whose partitioning
    differs from the processor's inputs; `spec` may be several topics, read as one table).
    `reader(event_type, record dict)` returns (key, value) to store, (key, None) to delete, or
    None to skip.

    `caught_up_ms` is the wall-clock time (ms) up to which everything on the topic has been read:
    the driver waits for it to pass an input's log time before deciding an input whose key the
    view does not hold, so a registration published just before a command is seen."""

    def __init__(self, cfg: Config, spec: TopicSpec | Sequence[TopicSpec],
                 reader: Callable[[str, dict], tuple[str, Any] | None],
                 codec: Codec | None = None) -> None:
        from labbus.events.codec import default_codec

        self.cfg = cfg
        specs = (spec,) if isinstance(spec, TopicSpec) else tuple(spec)
        self.topics = tuple(topic_name(cfg, s) for s in specs)
        self.topic = ", ".join(self.topics)
        self.reader = reader
        self.codec = codec or default_codec()
        self.values: dict[str, Any] = {}
        self.caught_up_ms = 0
        self.ready = asyncio.Event()
        self._poke = asyncio.Event()
        self._moved = asyncio.Event()

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def read(self, value: bytes | None) -> None:
        try:
            kind, record = self.codec.decode_record(value, plain=True)
        except DecodeError:
            return  # not ours to dead-letter: the topic's own consumers do
        found = self.reader(kind, record)
        if found is None:
            return
        key, stored = found
        if stored is None:
            self.values.pop(key, None)
        else:
            self.values[key] = stored

    async def caught_up(self, ts_ms: int, timeout_s: float = 5.0) -> bool:
        """Wait (at most timeout_s) until everything logged before ts_ms has been read."""
        deadline = time.monotonic() + timeout_s
        while self.caught_up_ms < ts_ms:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._moved.clear()
            self._poke.set()
            try:
                await asyncio.wait_for(self._moved.wait(), left)
            except TimeoutError:
                return False
        return True

    async def follow(self, stopping: Callable[[], bool], idle_s: float = 1.0) -> None:
        from aiokafka import TopicPartition

        consumer = kafka.consumer(self.cfg, group=None)
        await retrying(consumer.start, Backoff("view", "kafka"))
        try:
            await consumer._client.force_metadata_update()  # noqa: SLF001 - fresh topics
            tps = [TopicPartition(topic, p) for topic in self.topics
                   for p in sorted(consumer.partitions_for_topic(topic) or ())]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            while not stopping():
                asked_ms = int(time.time() * 1000)
                self._poke.clear()
                ends = await consumer.end_offsets(tps)
                while not await _read_to(consumer, ends) and not stopping():
                    batch = await consumer.getmany(timeout_ms=100, max_records=5000)
                    for records in batch.values():
                        for r in records:
                            self.read(r.value)
                self.caught_up_ms = asked_ms
                self._moved.set()
                if not self.ready.is_set():
                    log.info("view read", extra={"topic": self.topic, "keys": len(self.values)})
                    self.ready.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poke.wait(), idle_s)
        finally:
            await consumer.stop()


# tick(states of the keys this worker owns, now in ms, {partition: log time in ms of the last
# record handled} for the partitions this worker is behind on) -> events to emit
Tick = Callable[[dict[str, Any], int, dict[int, int]], Iterable[Event]]


# The faust internals the delivery guard relies on, as tested with faust-streaming 0.15.3 (sha256
# of inspect.getsource): perform_seek sets `_committed_offset` to the offsets it seeks to, seek()
# resets the read offset so a sought-back range is delivered again, and the drain loop delivers
# a record only at or past that read offset. tests/unit/test_faust_speedups.py checks them with
# the faust patches' guard.
UPSTREAM_SOURCES: dict[str, str] = {
    "faust.transport.consumer:Consumer.perform_seek":
        "0e8c130ff4b0afd82c0be9c5fd831316e10febc62c94032833911096e156d7c6",
    "faust.transport.consumer:Consumer.seek":
        "b86a9fe05f956b30cf299c787b6787c6e0349cbf1ae556f2456a1e97b15dbb22",
    "faust.transport.consumer:Consumer._drain_messages":
        "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417",
    # the commit cap wraps _new_offset, which _filter_committable_offsets calls per partition
    "faust.transport.consumer:Consumer._new_offset":
        "1d2c7ea89a7ad4f1a216c1d51936e569162cd66bd56f889e13fd29c910b58eb0",
    "faust.transport.consumer:Consumer._filter_committable_offsets":
        "dc5e9baf5d994485473ce80aed1873b9318f02d735fde21e285de3d0c52a5e0e",
    # pipelined state writes: the Table takes the changelog partition from faust's current
    # event (set for each write), and a revocation settles what is in flight after faust's own
    # producer flush, in the on_partitions_revoked signal
    "faust.tables.base:Collection.partition_for_key":
        "3b2291811b8dd791cdd0e690b2b09d966a4e961e2a2861182241195696393bed",
    "faust.tables.table:Table.on_key_set":
        "a370e35ca55c2c7e36e93f0d4b485927c32d49199043cab2314572846184dd94",
    "faust.app.base:App._on_partitions_revoked":
        "d5c895bbe57dc73ae4d7f762f6fdc9fdd3abd02f9e05863ccfd8034082e5682f",
}


FLUSH_EVERY = 200  # state writes between changelog flushes, at most
FLUSH_AFTER_S = 0.05  # and at most this long after the first unflushed write
MAX_IN_FLIGHT = 500  # inputs decided whose outputs are not acknowledged yet, at most
IDLE_SETTLE_S = 0.25  # an idle handler's inputs in flight are settled and flushed this often
_MISSING = object()


class DeliveryGuard:
    """Makes sure every input record reaches the handler, whatever faust does around a rebalance.

    faust-streaming 0.15.3 sometimes loses records that its consumer had already handed to a
    stream's buffer when a rebalance begins: the buffer is cleared, but faust's read offset for
    the partition is already past those records, so they are neither delivered again nor
    committed. Seen in about one takeover in five in the two-processor test (records fetched
    before a takeover never reached the handler; the partition's commit stopped at the first of
    them and the campaigns they belonged to never finished).

    The guard keeps, per input partition, `done`: every offset up to it has been handled (for a
    partition this worker has not handled yet, the committed offset minus one; with no commit
    either, the log start minus one). A record past
    `done + 1` means the ones before it were skipped; a partition whose consumer position (the
    next offset it returns) is past `done + 1` while the handler has been idle means records
    vanished on their way. Either
    way the partition is sought back to `done + 1` and faust delivers again from there; handlers
    are idempotent per input (see the module docstring), so a record handled twice is harmless.
    """

    IDLE_S = 3.0  # handler idle this long, a position past `done + 1`: records were lost

    def __init__(self, process: str) -> None:
        self.process = process
        self.done: dict[Any, int] = {}
        self.seeking: set = set()  # sought back, waiting for the first record delivered again
        self.last_handled = time.monotonic()
        # per partition, the first offset whose state write may not be on the broker yet (the
        # changelog is flushed in batches): commits stop there
        self.unflushed: dict[Any, int] = {}
        self.flushing: dict[Any, int] = {}
        # per partition, the inputs handled whose outputs are not acknowledged or whose state
        # is not written yet (the driver pipelines them), in offset order
        self.in_flight: dict[Any, collections.deque] = {}

    def _floor(self, tp: Any, committed: int | None) -> int | None:
        """`done` for tp: what this worker handled, or (for a partition it has not handled
        yet) the committed offset minus one. Once it has handled a partition it trusts only
        that: faust's own commit was seen past records the handler never got (they had been
        dropped from a stream buffer and acked)."""
        done = self.done.get(tp)
        if done is None and committed is not None:
            done = self.done[tp] = committed - 1
        return done

    def handled(self, tp: Any, offset: int, committed: int | None) -> int | None:
        """Record a handled offset; returns the offset to seek back to when some were skipped."""
        self.last_handled = time.monotonic()
        done = self._floor(tp, committed)
        if done is None or offset <= done + 1:
            self.seeking.discard(tp)
            if done is None or offset == done + 1:
                self.done[tp] = offset
            return None  # the next one, or one handled again after a seek
        if tp in self.seeking:
            return None  # the rest of a batch fetched before the seek
        self.seeking.add(tp)
        return done + 1

    def committable(self, tp: Any, offset: int | None) -> int | None:
        """What faust may commit for tp: never past the contiguous handled offset. (faust's own
        choice, `Consumer._new_offset`, can pass a record never acked: it checks the first
        acked offset against the committed one with `> 1`.)"""
        done = self.done.get(tp)
        if offset is None or done is None:
            return None
        caps = [offset, done + 1, self.unflushed.get(tp, offset), self.flushing.get(tp, offset)]
        if self.in_flight.get(tp):
            caps.append(self.in_flight[tp][0])
        return min(caps)

    def started(self, tp: Any, offset: int) -> None:
        """`offset` was decided; its outputs and state are on their way (commits stop there)."""
        self.in_flight.setdefault(tp, collections.deque()).append(offset)

    def settled(self, tp: Any, offset: int) -> None:
        """`offset`'s outputs are acknowledged and its state is written."""
        q = self.in_flight.get(tp)
        if q:
            if q[0] == offset:
                q.popleft()
            else:
                with contextlib.suppress(ValueError):
                    q.remove(offset)

    def written(self, tp: Any, offset: int) -> None:
        """The state `offset` led to was written to the Table; its changelog is not flushed."""
        if tp not in self.unflushed:
            self.unflushed[tp] = offset

    def flush_started(self) -> dict:
        """Everything written so far is in the flush that starts now (commits stay capped by it
        until `flush_done`)."""
        for tp, offset in self.unflushed.items():
            self.flushing[tp] = min(offset, self.flushing.get(tp, offset))
        self.unflushed = {}
        return dict(self.flushing)

    def flush_done(self) -> None:
        self.flushing = {}

    def lost(self, positions: dict, committed: dict) -> dict:
        """Partitions whose consumer position (the next offset it will return) is past records
        never handled: {tp: offset to seek back to}."""
        if time.monotonic() - self.last_handled < self.IDLE_S:
            return {}
        out = {}
        for tp, position in positions.items():
            done = self._floor(tp, committed.get(tp))
            if position is not None and done is not None and position > done + 1:
                out[tp] = done + 1
                self.seeking.add(tp)
        return out


def capped_new_offset(consumer: Any, choose: Callable[[Any], int | None], guard: DeliveryGuard,
                      tp: Any) -> int | None:
    """faust's choice of the offset to commit for `tp` (`choose`: its `_new_offset`), capped by
    the guard. faust's choice removes the acked offsets below it from faust's list; those the
    cap keeps from being committed now go back into it, or faust would see a gap between its
    committed offset and its first acked one after the commit, and never commit `tp` again."""
    acked = consumer._acked[tp]
    before = list(acked)
    offset = choose(tp)
    capped = guard.committable(tp, offset)
    if offset is not None and (capped is None or capped < offset):
        back = [o for o in before if o < offset and (capped is None or o >= capped)]
        acked.extend(back)
        acked.sort()
        consumer._acked_index[tp].update(back)
    return capped


# handler(state or None, event, record, shared) -> (new state, events to emit)
StatefulHandler = Callable[[Any, Event, Record, Shared], tuple[Any, Iterable[Event]]]


def data_dir(cfg: Config, process: str) -> Path:
    """faust's data directory (in-memory tables keep nothing there): under LABBUS_HOME."""
    return cfg.home / "faust" / group_id(cfg, process)


def record_of(message: Any) -> Record:
    """A faust Message as a Record (faust keeps the log time in seconds; Record in ms)."""
    ts = message.timestamp
    return Record(message.topic, message.partition, message.offset, message.key, message.value,
                  round(ts * 1000) if ts is not None else 0)


class Decided:
    """What one record led to: outputs, and the state to write once they are acknowledged."""

    __slots__ = ("outputs", "key", "state", "new_state", "shared")

    def __init__(self, outputs: list[Outgoing], key: str | None = None, state: Any = None,
                 new_state: Any = None, shared: Shared | None = None) -> None:
        self.outputs = outputs
        self.key = key
        self.state = state
        self.new_state = new_state
        self.shared = shared


def partition_of(record: Record) -> int:
    """The partition a state belongs to, for handlers whose state a timer reads (`state["p"]`)."""
    return record.partition


def decide(step: Step, handler: StatefulHandler, rec: Record, table: Any,
           shared_table: Any = None) -> Decided:
    """Decode, look up the key's state, run the handler: the dead-letter policy of `Step`
    (undecodable input or a handler that raised: one dead letter, state unchanged)."""
    try:
        event = step.decode(rec)
    except DecodeError as exc:
        return Decided([step.dead_letter(rec, exc)])
    if event is None:
        return Decided([])
    key = rec.key.decode("utf-8", "replace") if rec.key is not None else ""
    state = table.get(key)
    shared = Shared(shared_table) if shared_table is not None else Shared()
    try:
        new_state, events = handler(state, event, rec, shared)
        outputs = [e if isinstance(e, Outgoing) else step.encode(e) for e in events]
    except Exception as exc:  # noqa: BLE001 - one bad event must not stop the process
        log.exception("handler failed; dead-lettering the input",
                      extra={"topic": rec.topic, "partition": rec.partition,
                             "offset": rec.offset})
        return Decided([step.dead_letter(rec, exc, "processing_error")])
    return Decided(outputs, key, state, new_state, shared)


class Decisions:
    """The Table as the next decision must see it: states decided but not yet written (their
    outputs not acknowledged yet) over the Table."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.newest: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        return self.newest[key] if key in self.newest else self.table.get(key)

    def items(self) -> list[tuple[str, Any]]:
        merged = dict(self.table.items())
        for key, value in self.newest.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        return list(merged.items())


class InFlight:
    """One input decided: its faust event, what it decided, and its outputs' deliveries."""

    __slots__ = ("event", "tp", "offset", "decided", "outputs", "sent")

    def __init__(self, event: Any, tp: Any, offset: int, decided: Decided,
                 outputs: list[Outgoing], sent: Deliveries | None) -> None:
        self.event, self.tp, self.offset = event, tp, offset
        self.decided, self.outputs, self.sent = decided, outputs, sent

    def acked(self) -> bool:
        """Whether the broker has answered for every output (an answer may be a failure)."""
        return self.sent is not None and all(f.done() for f in self.sent.futures)


def broker_settings(cfg: Config) -> dict[str, Any]:
    """faust's settings for cfg's Kafka security (events/kafka.py `security`): SASL with TLS,
    TLS alone, or nothing for PLAINTEXT. Every faust app of labbus uses these."""
    sec = kafka.security(cfg)
    if sec.sasl:
        return {"broker_credentials": faust.SASLCredentials(
            username=sec.username, password=sec.password, ssl_context=sec.ssl_context(),
            mechanism=sec.mechanism)}
    if sec.tls:
        return {"broker_credentials": faust.SSLCredentials(sec.ssl_context())}
    return {}


def build_app(cfg: Config, process: str, inputs: Sequence[TopicSpec], handler: StatefulHandler,
              *, accepts: Collection[str] | None = None, table: str = "state",
              shared_table: str | None = None, codec: Codec | None = None,
              view: View | None = None, timers: Sequence[tuple[float, Tick]] = (),
              **settings: Any) -> faust.App:
    """A faust app running `handler` over `inputs` with its state in Table `table` (and, when
    named, a GlobalTable `shared_table`). `settings` override faust settings.

    `view`: a read-only `View` handed to the handler as its `shared` argument (instead of a
    shared table). `timers`: [(interval_s, tick)]; every interval, once the worker's
    partitions are recovered, `tick({key: state}, now_ms, behind)` is called with the states of the
    keys of the partitions this worker owns actively (not its standbys': a state must hold its
    partition as `state["p"]`, see `partition_of`) and its events are produced through the
    same idempotent producer. A tick changes no state: a processor that must remember what a
    tick decided reads its own events back from its inputs (event-sourced), and derives their
    ids from the state, so two ticks deciding the same thing emit one event id."""
    if view is not None and shared_table is not None:
        raise ValueError("a processor has a shared table or a view, not both")
    partitions = {spec.partitions for spec in inputs}
    if len(partitions) != 1:
        raise ValueError(f"inputs of {process} are not co-partitioned: {partitions}")
    (n_partitions,) = partitions
    datadir = data_dir(cfg, process)
    datadir.parent.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = dict(
        # stock faust transport: with the validator's `labbus://` transport a restarted worker
        # sometimes stood still after its recovery (three times in eight restarts; never in
        # ten with this one)
        broker=f"kafka://{cfg.kafka_bootstrap}",
        key_serializer="raw",
        value_serializer="raw",
        store="memory://",
        datadir=str(datadir),
        web_enabled=False,
        topic_allow_declare=True,  # the tables' changelog topics (inputs exist already)
        topic_disable_leader=True,  # no leader-only work; its topic would be one more to await
        topic_partitions=n_partitions,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        broker_session_timeout=10.0,  # a killed worker's partitions move on within ~10 s
        broker_heartbeat_interval=1.0,
        consumer_group_instance_id=kafka.member(cfg),  # static membership when named
        producer_acks=-1,
        processing_guarantee="at_least_once",
        **broker_settings(cfg),
    )
    options.update(settings)
    app = faust.App(group_id(cfg, process), **options)
    step = Step(cfg, process, accepts, codec)
    source = app.topic(*(topic_name(cfg, spec) for spec in inputs), key_type=bytes,
                       value_type=bytes)
    # Compacted changelogs, cleaned often: a worker's recovery reads about one record per key
    # plus what was written since the last cleaning, not every update ever made.
    changelog = {"segment.ms": "60000", "min.cleanable.dirty.ratio": "0.1",
                 "delete.retention.ms": "60000"}
    states = app.Table(table, default=None, partitions=n_partitions, key_type=str,
                       extra_topic_configs=changelog)  # keys and values as JSON
    shared = None
    if shared_table is not None:
        shared = SharedLog(cfg, f"{group_id(cfg, process)}-{shared_table}-changelog",
                           n_partitions)

        @app.service
        class FollowShared(mode.Service):
            """Reads the shared table in full, then follows it."""

            @mode.Service.task
            async def _follow(self) -> None:
                await shared.follow(lambda: self.should_stop)

    if view is not None:
        @app.service
        class FollowView(mode.Service):
            """Reads the view's topic in full, then follows it."""

            @mode.Service.task
            async def _follow(self) -> None:
                await view.follow(lambda: self.should_stop)

    busy: dict[str, Any] = {"stage": None}
    guard = DeliveryGuard(process)
    live: dict[str, Any] = {}  # the output producer, once started
    inputs_by_name = {topic_name(cfg, spec) for spec in inputs}

    def _cap_commits(consumer: Any) -> None:
        """faust commits what `_new_offset` returns; for input partitions, cap it with the
        guard so no offset is committed past a record the handler has not handled."""
        if getattr(consumer, "_labbus_capped", False):
            return
        choose = consumer._new_offset

        def new_offset(tp: Any) -> int | None:
            if tp.topic not in inputs_by_name:
                return choose(tp)
            return capped_new_offset(consumer, choose, guard, tp)

        consumer._new_offset = new_offset
        consumer._labbus_capped = True

    async def _seek_back(tp: Any, offset: int, why: str) -> None:
        consumer = app.consumer
        if tp not in consumer.assignment():
            return
        log.warning("faust lost records; reading again", extra={
            "topic": tp.topic, "partition": tp.partition, "from_offset": offset, "why": why})
        metrics.REDELIVERIES.labels(process, tp.topic).inc()
        await consumer.seek(tp, offset)

    @app.timer(1.0)
    async def recover_lost_records() -> None:
        """Records read by faust's consumer that never reached the handler (see DeliveryGuard)."""
        consumer = app.consumer
        if (busy["stage"] is not None or app.rebalancing or not consumer.flow_active
                or not app.tables.recovery.completed.is_set()):
            return
        paused = consumer._paused_partitions
        assigned = [tp for tp in consumer.assignment()
                    if tp.topic in inputs_by_name and tp not in paused]
        positions = {tp: await consumer.position(tp) for tp in assigned}
        floors = {tp: consumer._committed_offset.get(tp) for tp in assigned}
        never = [tp for tp, c in floors.items() if c is None and tp not in guard.done]
        if never:  # nothing committed, nothing handled: everything from the log start is due
            floors.update(await consumer.earliest_offsets(*never))
        lost = guard.lost(positions, floors)
        for tp, offset in lost.items():
            await _seek_back(tp, offset, "read but never handled")
    debug = bool(os.environ.get("LABBUS_FAUST_DEBUG"))
    handled: dict = {}
    # Pipelined: an input's outputs are handed to the producer and the next input is decided
    # at once (against `decisions`, the states decided so far); a later step awaits the
    # acknowledgements in input order, then writes each state to the Table. So an input costs
    # no broker round trip of its own, and the order that makes a crash safe holds: an input's
    # outputs are acknowledged before its state is written, its state is written before the
    # offset is committed (commits stop at the first input in flight). A processor with a shared
    # table settles each input before the next (the shared table's local copy takes only what
    # is on the broker).
    # The changelog is flushed in batches too: commits stop at the first state write not yet
    # flushed (`DeliveryGuard.unflushed`).
    decisions = Decisions(states)
    last_seen_ms: dict[Any, int] = {}  # per input partition, log time of the last record handled
    in_flight: collections.deque[InFlight] = collections.deque()
    pending: dict[str, Any] = {"n": 0, "since": None}
    settle_lock = asyncio.Lock()
    flush_lock = asyncio.Lock()

    async def flush_changelog() -> None:
        async with flush_lock:
            if not guard.unflushed:
                return
            pending.update(n=0, since=None)
            guard.flush_started()
            await app.producer.flush()
            guard.flush_done()  # (not after an exception: the cap stays until a flush succeeds)

    async def settle(producer: Any, *, wait: bool) -> None:
        """Inputs in flight, oldest first, whose outputs are acknowledged (all of them when
        `wait`): their states written to the Table."""
        async with settle_lock:
            while in_flight:
                item = in_flight[0]
                if item.outputs:
                    if not wait and not item.acked():
                        return
                    await _acked(producer, item)  # at once when done; raises what failed
                in_flight.popleft()
                _write(item)

    async def _acked(producer: Any, item: InFlight) -> None:
        try:
            if item.sent is None:
                raise ConnectionError("outputs were not handed to the producer")
            await item.sent.acked()
        except Exception as exc:
            if not transient(exc):
                raise
            await retrying(lambda o=item.outputs: _deliver(producer, process, o),
                           Backoff(process, "kafka"))

    def _write(item: InFlight) -> None:
        d = item.decided
        if d.shared is not None and d.shared.writes:
            d.shared.apply()  # into the local copy (its records are on the broker)
        if d.key is not None and d.new_state is not d.state:
            # the Table writes its changelog to the partition of faust's current event
            token = faust_streams._current_event.set(weakref.ref(item.event))
            try:
                if d.new_state is None:
                    states.pop(d.key, None)
                else:
                    states[d.key] = d.new_state
            finally:
                faust_streams._current_event.reset(token)
            if decisions.newest.get(d.key, _MISSING) is d.new_state:
                del decisions.newest[d.key]  # no later decision for the key in flight
            guard.written(item.tp, item.offset)
            pending["n"] += 1
            pending["since"] = pending["since"] or time.monotonic()
        guard.settled(item.tp, item.offset)

    @app.timer(IDLE_SETTLE_S)
    async def settle_when_idle() -> None:
        producer = live.get("producer")
        if busy["stage"] is None and producer is not None and in_flight:
            await settle(producer, wait=True)
        if busy["stage"] is None and guard.unflushed:
            await flush_changelog()

    @app.on_partitions_revoked.connect
    async def settle_before_revocation(_app: Any, _revoked: Any, **_kw: Any) -> None:
        """The next owner of a partition recovers its state from the changelog: everything
        decided here must be on it before the rebalance completes."""
        producer = live.get("producer")
        if producer is not None and in_flight:
            await settle(producer, wait=True)
        await flush_changelog()

    @app.agent(source, name=f"{process}-handler")
    async def run_handler(stream):
        busy.update(stage="output producer started", since=time.monotonic())
        producer = kafka.producer(cfg)  # labbus's idempotent acks=all producer, in faust's loop
        await retrying(producer.start, Backoff(process, "kafka"))
        if shared is not None:
            busy.update(stage="shared table read")
            await shared.ready.wait()
        if view is not None:
            busy.update(stage="view read")
            await view.ready.wait()
        live["producer"] = producer
        busy.update(stage=None)
        _cap_commits(app.consumer)
        log.info("handler started")
        try:
            await _handle_stream(stream, producer)
        finally:
            await producer.stop()

    async def _handle_stream(stream, producer) -> None:
        async for _ in stream:
            event = stream.current_event
            started = time.perf_counter()
            rec = record_of(event.message)
            tp = event.message.tp
            if tp.topic in inputs_by_name:
                skipped_to = guard.handled(tp, rec.offset,
                                          app.consumer._committed_offset.get(tp))
                if skipped_to is not None:
                    await _seek_back(tp, skipped_to, "records skipped before this one")
            if debug:
                last = handled.get(tp)
                if last is None or rec.offset != last + 1:
                    log.warning("faust delivery jump", extra={
                        "tp": f"{rec.topic}/{rec.partition}", "offset": rec.offset, "last": last,
                        "generation": app.consumer_generation_id,
                        "read_offset": app.consumer._read_offset.get(tp),
                        "committed": app.consumer._committed_offset.get(tp)})
                handled[tp] = rec.offset
            busy.update(stage="decide", since=time.monotonic(), at=(rec.topic, rec.partition,
                                                                   rec.offset))
            last_seen_ms[tp] = rec.timestamp
            metrics.EVENTS_IN.labels(process, rec.topic).inc()
            if view is not None and rec.key is not None and (
                    rec.key.decode("utf-8", "replace") not in view):
                busy.update(stage="view caught up")
                await view.caught_up(rec.timestamp)
            decided = decide(step, handler, rec, decisions, shared if view is None else view)
            outputs = decided.outputs
            writes = decided.shared.writes if decided.shared is not None else {}
            if shared is not None and writes:
                outputs = outputs + shared.outgoing(writes)
            changed = decided.key is not None and decided.new_state is not decided.state
            if outputs or changed:
                sent = None
                if outputs:
                    try:
                        sent = Deliveries(producer, process)
                        for out in outputs:
                            await sent.send(out)
                    except Exception as exc:
                        if not transient(exc):
                            raise
                        sent = None  # settled with retries
                if changed:
                    decisions.newest[decided.key] = decided.new_state
                guard.started(tp, rec.offset)
                in_flight.append(InFlight(event, tp, rec.offset, decided, outputs, sent))
            busy.update(stage="outputs acked", since=time.monotonic())
            await settle(producer, wait=shared is not None or len(in_flight) >= MAX_IN_FLIGHT)
            if pending["n"] >= FLUSH_EVERY or (
                    pending["since"] and time.monotonic() - pending["since"] >= FLUSH_AFTER_S):
                busy.update(stage="changelog flushed", since=time.monotonic())
                await flush_changelog()
            log.debug("handled %s/%s@%s: %d outputs", rec.topic, rec.partition, rec.offset,
                      len(decided.outputs))
            busy.update(stage=None)
            metrics.LAST_PROGRESS.labels(process).set(time.time())
            metrics.PROCESSING_SECONDS.labels(process).observe(time.perf_counter() - started)
            metrics.record_lag(process, rec.topic, rec.partition, rec.offset + 1,
                               app.consumer.highwater(event.message.tp))

    def owned_states() -> dict[str, Any]:
        """The states (as decided, written or not yet) of the keys of the input partitions this
        worker owns actively."""
        first = topic_name(cfg, inputs[0])
        owned = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == first}
        return {k: v for k, v in decisions.items()
                if isinstance(v, dict) and v.get("p") in owned}

    def behind() -> dict[int, int]:
        """{partition: log time of the last record handled} for the input partitions with
        records not handled yet: what a tick may take as "now" there, so that a worker behind
        on its inputs does not judge silence it has not read yet (0: nothing handled yet)."""
        out: dict[int, int] = {}
        for tp in app.consumer.assignment():
            if tp.topic not in inputs_by_name:
                continue
            highwater, done = app.consumer.highwater(tp), guard.done.get(tp)
            if done is None:  # nothing handled here since the start: the commit says how far
                committed = app.consumer._committed_offset.get(tp)
                done = committed - 1 if committed is not None else None
            if highwater is None or (done is not None and done + 1 >= highwater):
                continue
            seen = last_seen_ms.get(tp, 0)
            out[tp.partition] = min(out.get(tp.partition, seen), seen)
        return out

    def add_timer(interval: float, tick: Tick) -> None:
        name = f"{process}-tick-{getattr(tick, '__name__', 'tick')}"

        @app.timer(interval, name=name)
        async def _tick() -> None:
            producer = live.get("producer")
            if (producer is None or app.rebalancing
                    or not app.tables.recovery.completed.is_set()):
                return
            try:
                outputs = [step.encode(e) for e in tick(owned_states(), int(time.time() * 1000),
                                                        behind())]
            except Exception:  # noqa: BLE001 - a tick that raised must not stop the worker
                log.exception("timer failed", extra={"timer": name})
                return
            if outputs:
                await retrying(lambda o=outputs: _deliver(producer, process, o),
                               Backoff(process, "kafka"))
                metrics.LAST_PROGRESS.labels(process).set(time.time())

    for interval, tick in timers:
        add_timer(interval, tick)

    @app.timer(5.0)
    async def report_stalls() -> None:
        """One log line while an event waits more than 10 s for one step (broker down)."""
        if busy["stage"] is not None and time.monotonic() - busy["since"] > 10:
            log.warning("event waiting for %s", busy["stage"],
                        extra={"position": busy.get("at"),
                               "waiting_s": round(time.monotonic() - busy["since"], 1)})

    if os.environ.get("LABBUS_FAUST_DEBUG"):
        @app.timer(3.0)
        async def _debug_state() -> None:
            c = app.consumer
            rec = app.tables.recovery
            positions: Any = {}
            try:
                inner = c._thread._ensure_consumer()
                paused = sorted(str(tp) for tp in inner.paused())
                assigned = sorted(str(tp) for tp in inner.assignment())
                sub = inner._subscription.subscription
                for tp in inner.assignment():
                    st = sub.assignment.state_value(tp) if sub else None
                    positions[f"{tp.topic[-12:]}/{tp.partition}"] = (
                        st._position if st else "?", c._read_offset.get(tp),
                        c.highwater(tp), bool(app.topics._tp_index.get(tp)))
                fetcher = app._fetcher._drainer
                drainer = ("none" if fetcher is None else "done" if fetcher.done()
                           else "running")
            except Exception as exc:  # noqa: BLE001
                paused = assigned = repr(exc)
                drainer = "?"
            log.warning("faust debug", extra={
                "assigned": assigned, "aiokafka_paused": paused,
                "active": sorted(str(tp) for tp in (c._active_partitions or ())),
                "faust_paused": sorted(str(tp) for tp in c._paused_partitions),
                "buffered": sorted(str(tp) for tp in c._buffered_partitions),
                "flow_active": app.flow_control.is_active(),
                "rebalancing": app.rebalancing,
                "in_recovery": rec.in_recovery, "completed": rec.completed.is_set(),
                "active_remaining": rec.active_remaining_total(),
                "standby_remaining": rec.standby_remaining_total(),
                "busy": busy.get("stage"), "at": busy.get("at"), "drainer": drainer,
                "positions(pos,read,hw,indexed)": positions,
                "suspended": app.consumer.suspend_flow.is_set()})

    app.labbus_tables = (states, shared)  # for tests and tools
    return app


async def _deliver(producer: Any, process: str, outputs: list[Outgoing]) -> None:
    sent = Deliveries(producer, process)
    for out in outputs:
        await sent.send(out)
    await sent.acked()


def run(app: faust.App, cfg: Config) -> None:
    """Run the app's worker until SIGINT/SIGTERM (topics of the catalog created first)."""
    asyncio.run(kafka.ensure_topics(cfg))
    worker = _worker_class()(app, loglevel=cfg.log_level.lower(), quiet=True,
                             redirect_stdouts=False, override_logging=False)
    worker.execute_from_commandline()


def _worker_class():
    from faust.worker import Worker

    class PromptWorker(Worker):
        """faust's worker without mode's fixed pauses once the app has stopped: mode polls up
        to 1 s for the tasks still pending to end by themselves (an aiokafka connection's
        reader never does), cancels them, then sleeps 1 s more before closing the loop, so
        every SIGTERM took 2-3 s. Here the tasks left are cancelled at once and awaited (at
        most 1 s); the app's own stop (commits, producer flush) has ended before, as in mode."""

        def _gather_all(self) -> None:
            left = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for task in left:
                task.cancel()
            if left:
                self.loop.run_until_complete(asyncio.wait(left, timeout=1.0))

        async def _sentinel_task(self) -> None:
            await asyncio.sleep(0)

    return PromptWorker
