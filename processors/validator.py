"""The measurement validator, a faust-streaming app.

Reads raw readings, writes MeasurementValidated or MeasurementRejected, and sends what cannot be
decoded to the dead-letter topic. Outputs go through labbus's idempotent acks=all producer and are
awaited before the batch is acknowledged, so faust commits an offset only after its outputs are on
the broker. Output ids derive from input ids, so a replay after a crash re-emits identical events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path

import faust
import mode
from aiokafka import TopicPartition

from labbus.events import faust_runtime, kafka, metrics
from labbus.events.codec import Codec, DecodeError, default_codec
from labbus.events.config import Config
from labbus.events.device_specs import DeviceSpecs
from labbus.events.model import MeasurementRecorded
from labbus.events.runtime import Record, Step
from labbus.events.topics import (
    MEASUREMENTS_RECORDED,
    MEASUREMENTS_REJECTED,
    MEASUREMENTS_VALIDATED,
    group_id,
    topic_name,
)
from labbus.processors import quality, validation
from labbus.processors.faust_speedups import LeanMonitor, RawSchema

PROCESS = "validator"
BATCH_MAX = 5000  # readings validated together at most
STALL_S = 0.05  # a partial batch that gets no new reading for this long is decided anyway
SESSION_TIMEOUT_S = 10.0  # a crashed validator's partitions move after this (faust: 60 s)
HEARTBEAT_INTERVAL_S = 3.0
log = logging.getLogger(__name__)


class Validator:
    """Turns one incoming message into exactly one outgoing message: (topic, encoded event)."""

    def __init__(self, cfg: Config, codec: Codec | None = None) -> None:
        self.cfg = cfg
        self.codec = codec or default_codec()
        self.windows: dict[int, validation.DedupWindow] = defaultdict(validation.DedupWindow)
        self.validated_topic = topic_name(cfg, MEASUREMENTS_VALIDATED)
        self.rejected_topic = topic_name(cfg, MEASUREMENTS_REJECTED)
        self.step = Step(cfg, PROCESS, codec=self.codec)  # the runtime's dead-letter policy
        # quality (processors/quality.py): every device's registered specs, followed from
        # lab.devices, and the highest sequence seen per device on each partition
        self.specs = DeviceSpecs(cfg, self.codec)
        self.sequences = quality.Sequences()
        self.future_us = round(cfg.quality_future_s * 1e6)
        self.horizon_us = round(cfg.quality_horizon_s * 1e6)

    def handle(self, msg: Record, now_us: int) -> tuple[str, bytes, str | None]:
        """(topic, encoded event, rejection or dead-letter code or None)."""
        try:
            event_type, reading = self.codec.decode_record(msg.value, plain=True)
        except DecodeError as exc:
            return self._dead(msg, exc)
        if event_type != MeasurementRecorded.TYPE:
            return self._dead(msg, TypeError(f"{event_type} does not belong on {msg.topic}"),
                              "unexpected_event_type")
        first = self.windows[msg.partition].first_offset(reading["event_id"], msg.offset)
        if first != msg.offset:
            why = validation.Rejection(
                "duplicate_event_id",
                f"event id {reading['event_id']} already seen at offset {first} of partition "
                f"{msg.partition}")
            out = validation.rejected(reading, why, now_us, PROCESS,
                                      purpose=f"duplicate@{msg.partition}:{msg.offset}")
        else:
            device, sequence = reading["device_id"], reading["sequence"]
            last_sequences = self.sequences.partition(msg.partition)
            last = last_sequences.get(device)
            if last is None or sequence > last:
                last_sequences[device] = sequence
            why = validation.check(reading, now_us, self.cfg.max_clock_skew_s,
                                   self.cfg.max_reading_age_days)
            if why is None:
                q, rule = quality.judge(reading, self.specs.by_device.get(device), last, now_us,
                                        self.future_us, self.horizon_us)
                out = validation.validated(reading, now_us, PROCESS, q, rule)
                encoded = self.codec.encode_plain(validation.VALIDATED, out)
                return self.validated_topic, encoded, None
            out = validation.rejected(reading, why, now_us, PROCESS)
        return self.rejected_topic, self.codec.encode_plain(validation.REJECTED, out), why.code

    def _dead(self, msg: Record, exc: Exception,
              kind: str | None = None) -> tuple[str, bytes, str | None]:
        out = self.step.dead_letter(msg, exc, kind)
        return out.topic, out.value, out.reason


class PartitionBatches:
    """Outputs of one input batch. Validated readings go to the partition their input came from
    (both topics have the same partition count and key, so this equals key hashing) in whole
    record batches, which costs far less per event than one send() each; the rarer rejections and
    dead letters go through the partitioner."""

    def __init__(self, producer, batched_topic: str) -> None:
        self.producer = producer
        self.batched_topic = batched_topic
        self.full: list[tuple[int, object]] = []
        self.open: dict[int, object] = {}
        self.singles: list[tuple[str, bytes | None, bytes]] = []
        self.futures: list[asyncio.Future] = []
        self.counts: Counter = Counter()

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes,
            code: str | None) -> None:
        self.counts[(topic, code)] += 1
        if topic != self.batched_topic:
            self.singles.append((topic, key, value))
            return
        batch = self.open.get(partition)
        if batch is None:
            batch = self.open[partition] = self.producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is None:  # full
            self.full.append((partition, batch))
            batch = self.open[partition] = self.producer.create_batch()
            batch.append(key=key, value=value, timestamp=None)

    async def flush(self) -> None:
        """Hand everything to the producer; delivery is awaited in delivered()."""
        self.full.extend(self.open.items())
        self.open.clear()
        for partition, batch in self.full:
            self.futures.append(
                await self.producer.send_batch(batch, self.batched_topic, partition=partition))
        self.full.clear()
        for topic, key, value in self.singles:
            self.futures.append(await self.producer.send(topic, value, key=key))
        self.singles.clear()

    async def delivered(self) -> None:
        await self.flush()
        await asyncio.gather(*self.futures)


class Batches:
    """Readings faust has delivered, decided in batches: when a batch is full or faust has
    nothing more buffered, so batches are large under load and a lone reading waits for no timer.
    A partial batch that stops growing (faust empties its buffers when partitions are revoked)
    is decided by a watchdog after STALL_S, so its offsets do not hold up the rebalance.

    One batch awaits its acks=all while the next is validated. A reading's event is acked, and
    its offset may be committed, only after its output is on the broker."""

    def __init__(self, app: faust.App, validator: Validator, producer,
                 windows_ready: asyncio.Event, buffered: asyncio.Queue,
                 max_size: int = BATCH_MAX, stall_s: float = STALL_S) -> None:
        self.app = app
        self.validator = validator
        self.producer = producer
        self.windows_ready = windows_ready
        self.buffered = buffered
        self.max_size = max_size
        self.stall_s = stall_s
        self.pending: list = []
        self.last_added = 0.0
        self.lock = asyncio.Lock()
        self.in_flight: asyncio.Future | None = None
        self.watchdog: asyncio.TimerHandle | None = None
        self.watchdog_task: asyncio.Future | None = None
        self.failure: BaseException | None = None

    def add(self, event) -> bool:
        """Take one event; True when the batch should be decided now."""
        self.pending.append(event)
        if len(self.pending) >= self.max_size or self.buffered.empty():
            return True
        self.last_added = time.monotonic()
        if self.watchdog is None:
            self.watchdog = asyncio.get_running_loop().call_later(self.stall_s, self._check)
        return False

    def _check(self) -> None:
        self.watchdog = None
        if not self.pending:
            return
        idle = time.monotonic() - self.last_added
        if idle < self.stall_s:  # still growing
            self.watchdog = asyncio.get_running_loop().call_later(self.stall_s - idle,
                                                                  self._check)
            return
        self.watchdog_task = asyncio.ensure_future(self.decide())
        self.watchdog_task.add_done_callback(self._remember_failure)

    def _remember_failure(self, task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.failure = task.exception()

    def raise_failure(self) -> None:
        """A batch decided by the watchdog failed: fail the agent, as a failed batch does."""
        if self.failure is not None:
            raise self.failure

    async def decide(self) -> int:
        """Validate the pending batch and hand its outputs to the producer; returns its size."""
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        async with self.lock:
            batch, self.pending = self.pending, []
            if not batch:
                return 0
            started = time.perf_counter()
            await self.windows_ready.wait()  # faust may deliver before the assignment signal
            out = validate_batch(self.validator, self.producer, batch)
            await out.flush()
            if self.in_flight is not None:
                await self.in_flight  # the previous batch's acks, awaited while this one ran
            self.in_flight = asyncio.ensure_future(ack_when_delivered(batch, out))
            self.in_flight.add_done_callback(_report_failed_delivery)
            self._record(batch, time.perf_counter() - started)
            return len(batch)

    def _record(self, batch: list, seconds: float) -> None:
        source = batch[0].message.topic
        metrics.EVENTS_IN.labels(PROCESS, source).inc(len(batch))
        next_offsets = {event.message.tp: event.message.offset + 1 for event in batch}
        for tp, nxt in next_offsets.items():
            metrics.record_lag(PROCESS, tp.topic, tp.partition, nxt,
                               self.app.consumer.highwater(tp))
        metrics.PROCESSING_SECONDS.labels(PROCESS).observe(seconds)

    def close(self) -> None:
        """Undelivered outputs are not acked, so their inputs are not committed: they are
        validated again after a restart."""
        for pending in (self.watchdog, self.watchdog_task, self.in_flight):
            if pending is not None and not (isinstance(pending, asyncio.Future)
                                            and pending.done()):
                pending.cancel()


async def prime_windows(cfg: Config, validator: Validator, tps: list[TopicPartition], group: str,
                        lookback: int = 50_000) -> int:
    """Fill the duplicate windows with the ids of the last `lookback` readings before each
    partition's committed offset, so a duplicate of a reading seen before a restart is still
    caught, and decisions after a restart equal those before it; and the highest sequence per
    device from the same readings (the quality rule `sequence`)."""
    consumer = kafka.consumer(cfg, group=group)
    await consumer.start()
    primed = 0
    try:
        for tp in tps:
            committed = await consumer.committed(tp)
            if not committed:
                continue
            start = max(committed - lookback, (await consumer.beginning_offsets([tp]))[tp])
            consumer.assign([tp])
            consumer.seek(tp, start)
            window = validator.windows[tp.partition]
            last_sequences = validator.sequences.partition(tp.partition)
            while await consumer.position(tp) < committed:
                fetched = await consumer.getmany(tp, timeout_ms=1000, max_records=5000)
                records = fetched.get(tp, [])
                for rec in records:
                    if rec.offset >= committed:
                        break
                    try:
                        _, reading = validator.codec.decode_record(rec.value, plain=True)
                        if window.first_offset(reading["event_id"], rec.offset) == rec.offset:
                            device, sequence = reading["device_id"], reading["sequence"]
                            if sequence > last_sequences.get(device, sequence - 1):
                                last_sequences[device] = sequence
                        primed += 1
                    except (DecodeError, KeyError):
                        pass  # dead-lettered the first time round
    finally:
        await consumer.stop()
    return primed


def data_dir(cfg: Config) -> Path:
    """faust's data directory (its in-memory tables keep nothing there): under LABBUS_HOME, not
    the working directory."""
    return cfg.home / "faust" / group_id(cfg, PROCESS)


def build_app(cfg: Config) -> faust.App:
    datadir = data_dir(cfg)
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        group_id(cfg, PROCESS),
        broker=f"labbus://{cfg.kafka_bootstrap}",  # processors/faust_speedups.py
        key_serializer="raw",
        value_serializer="raw",
        store="memory://",
        datadir=str(datadir),
        web_enabled=False,
        topic_allow_declare=False,
        topic_disable_leader=True,  # no leader-only work; its topic would be one more to await
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        stream_buffer_maxsize=8192,
        Monitor=LeanMonitor,
        producer_acks=-1,
        # Recovery after a crash (kill -9): the group waits for a dead member's session to expire
        # before its partitions move, 60 s with faust's defaults. The same 10 s session and 3 s
        # heartbeat as every other labbus consumer (events/kafka.py consumer()).
        broker_session_timeout=SESSION_TIMEOUT_S,
        broker_heartbeat_interval=HEARTBEAT_INTERVAL_S,
        # Static membership when LABBUS_GROUP_INSTANCE_ID names this process: a restart with
        # the same name takes its partitions back without waiting for the session timeout.
        consumer_group_instance_id=kafka.member(cfg),
        **faust_runtime.broker_settings(cfg),
    )
    raw = app.topic(topic_name(cfg, MEASUREMENTS_RECORDED),
                    schema=RawSchema(key_type=bytes, value_type=bytes))
    validator = Validator(cfg)
    windows_ready = asyncio.Event()

    @app.service
    class OutputProducer(mode.Service):
        """labbus's idempotent producer, created inside faust's event loop."""

        producer = None

        async def on_start(self) -> None:
            OutputProducer.producer = kafka.producer(cfg)
            await OutputProducer.producer.start()

        async def on_stop(self) -> None:
            await OutputProducer.producer.stop()

    @app.service
    class FollowDeviceSpecs(mode.Service):
        """Every device's registered specs, for the quality rules (read in full at start)."""

        @mode.Service.task
        async def _follow(self) -> None:
            await validator.specs.follow(lambda: self.should_stop)

    @app.on_partitions_revoked.connect
    async def forget_windows(app, revoked, **kwargs) -> None:  # noqa: ARG001
        windows_ready.clear()
        validator.windows.clear()
        validator.sequences.clear()

    @app.on_partitions_assigned.connect
    async def remember_recent_ids(app, assigned, **kwargs) -> None:  # noqa: ARG001
        mine = [TopicPartition(tp.topic, tp.partition) for tp in assigned
                if tp.topic == raw.get_topic_name()]
        primed = await prime_windows(cfg, validator, mine, group_id(cfg, PROCESS))
        await validator.specs.ready.wait()  # no reading is judged before the specs are read
        windows_ready.set()
        log.info("dedup windows primed from the log", extra={"ids": primed})

    @app.agent(raw)
    async def validate(stream):
        while OutputProducer.producer is None:
            await asyncio.sleep(0.05)
        stream.enable_acks = False  # acked by Batches once the outputs are on the broker
        batches = Batches(app, validator, OutputProducer.producer, windows_ready,
                          buffered=stream.channel.queue)
        try:
            async for _ in stream:
                batches.raise_failure()
                if batches.add(stream.current_event):
                    yield await batches.decide()
        finally:
            batches.close()

    return app


def _report_failed_delivery(task: asyncio.Future) -> None:
    """At once, not only when the next batch awaits it (which then stops the agent, as a failed
    send always has: the inputs stay uncommitted and are validated again after a restart)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("outputs not delivered; inputs stay uncommitted",
                  extra={"error": repr(task.exception())})


def validate_batch(validator: Validator, producer, batch) -> PartitionBatches:
    """Decide every event of the batch into output record batches."""
    now_us = time.time_ns() // 1000
    out = PartitionBatches(producer, validator.validated_topic)
    for event in batch:
        m = event.message
        topic, value, code = validator.handle(
            Record(m.topic, m.partition, m.offset, m.key, m.value), now_us)
        out.add(topic, m.partition, m.key, value, code)
    return out


async def ack_when_delivered(batch, out: PartitionBatches) -> None:
    """acks=all for every output first; only then may faust commit the inputs' offsets."""
    await out.delivered()
    for event in batch:
        event.ack()  # now the offset may be committed
    for (topic, code), n in out.counts.items():
        metrics.EVENTS_OUT.labels(PROCESS, topic).inc(n)
        if code:
            metrics.EVENTS_REJECTED.labels(PROCESS, code).inc(n)


def run(cfg: Config) -> None:
    """Run the validator worker until SIGINT/SIGTERM."""
    faust_runtime.run(build_app(cfg), cfg)
