"""Lower per-event cost for faust-streaming apps on small machines: a transport, a schema and a
monitor, each found with py-spy and measured with tests/bench/bench_stages.py (README).

The transport is faust's aiokafka driver with two fixes (and a cheaper getmany), registered as
the `labbus://` broker scheme (entry point `faust.transports` in pyproject.toml), so an app opts
in with `broker="labbus://host:port"`:

1. faust races the delivery of *every* message against `suspend_flow` (Service.wait_first: new
   tasks and an asyncio.wait per message, the largest single cost in a profile of the validator).
   Here a delivery runs inline up to its first suspension, and only one that really waits is
   raced; when a stream buffer is full, the loop waits once for it to drain instead of racing
   each delivery into the one free slot; the rest of faust's loop is unchanged. (Racing a whole
   fetched batch instead was cheaper but lost messages in
   tests/integration/test_validator_rebalance.py.)
2. When back-pressure from full stream buffers has paused every partition, faust sleeps a whole
   second before it fetches again, which stalled the validator for ~1 s after every large fetch.
   Here the fetcher wakes as soon as a buffer drains (or after that second, as before).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from time import monotonic

import faust
from faust.sensors import Monitor
from faust.transport import conductor as faust_conductor
from faust.transport import producer as faust_producer
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka

YIELD_EVERY = 100  # messages between giving the event loop a turn, as faust does
ROOM_WAIT_S = 0.2  # longest wait for a full stream buffer to drain before delivering anyway


class Consumer(faust_aiokafka.Consumer):
    _buffer_drained: asyncio.Event | None = None

    def on_buffer_drop(self, tp) -> None:
        super().on_buffer_drop(tp)
        if self._buffer_drained is not None:
            self._buffer_drained.set()

    async def _wait_next_records(self, timeout: float):
        if self.flow_active and not self.app.client_only and not self._get_active_partitions():
            if self._buffer_drained is None:
                self._buffer_drained = asyncio.Event()
            self._buffer_drained.clear()
            try:
                await asyncio.wait_for(self._buffer_drained.wait(), timeout)
            except TimeoutError:
                pass
            if not self._get_active_partitions():
                return {}, set()
        return await super()._wait_next_records(timeout)

    async def getmany(self, timeout: float):
        """faust's own, except that each partition's end offset, which only faust's monitor
        reads, is looked up once per fetch rather than once per record."""
        records, active_partitions = await self._wait_next_records(timeout)
        app = self.app
        generation_id = app.consumer_generation_id
        if records is None or self.should_stop:
            return
        if not self.flow_active:  # as faust: seek back to the committed offsets
            try:
                await self.perform_seek()
            except Exception as exc:  # noqa: BLE001 - faust logs and carries on here too
                self.log.warning(f"exception performing seek when flow not active {exc}")
            return
        for tp in records:
            app.monitor.track_tp_end_offset(tp, self.highwater(tp))
        buffered = self._buffered_partitions
        to_message = self._to_message
        for tp, record in self.scheduler.iterate(records):
            if not self.flow_active or app.consumer_generation_id != generation_id:
                break  # a rebalance began: faust drops the rest of this fetch too
            if active_partitions is None or tp in active_partitions or tp in buffered:
                yield tp, to_message(tp, record)

    async def _drain_messages(self, fetcher) -> None:
        """faust's own loop (transport/consumer.py), but each delivery runs to its first
        suspension inline and only a delivery that really waits is raced against a rebalance."""
        callback = self.callback
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        acks_enabled_for = self.app.topics.acks_enabled_for
        commit_every = self._commit_every
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set  # noqa: SLF001 - as faust's own loop
        since_yield = 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                messages = self.getmany(timeout=1.0)
                await self.sleep(0)
                if not self.should_stop:
                    async for tp, message in messages:
                        since_yield += 1
                        if since_yield > YIELD_EVERY:
                            await asyncio.sleep(0)
                            since_yield = 0
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is not None and offset < r_offset:
                            continue  # already delivered before a seek
                        if r_offset and offset - r_offset > 1 and acks_enabled_for(message.topic):
                            await self._add_gap(tp, r_offset + 1, offset)
                        if commit_every is not None and self._n_acked >= commit_every:
                            self._n_acked = 0
                            await self.commit()
                        if self._queue_full(message.topic):
                            await self._wait_for_room()
                        await self._deliver(callback(message))
                        set_read_offset(tp, offset)
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)

    def _queue_full(self, topic: str) -> bool:
        channels = self.app.topics._topic_name_index.get(topic, ())  # noqa: SLF001
        return any(channel.queue.full() for channel in channels)

    async def _wait_for_room(self) -> None:
        """A stream buffer is full: rather than have each following delivery wait for one free
        slot (and be raced, at the cost of new tasks, one by one), wait once until the buffer has
        drained to faust's low-water mark. The timeout only bounds the wait; delivery after it
        is the normal path and handles a still-full buffer itself."""
        if self._buffer_drained is None:
            self._buffer_drained = asyncio.Event()
        self._buffer_drained.clear()
        await self.wait_first(self._buffer_drained.wait(), self.suspend_flow.wait(),
                              timeout=ROOM_WAIT_S)

    async def _deliver(self, delivery: Coroutine) -> None:
        """What faust's `wait_first(delivery, suspend_flow.wait())` does, without two new tasks
        for the common delivery that never waits: its first step runs here (faust's task would
        run that same step first too), and only if it then waits (flow control, a full buffer)
        is the rest raced against a rebalance."""
        try:
            waiting_on = delivery.send(None)
        except StopIteration:
            return
        except BaseException:
            delivery.close()
            raise
        await self.wait_first(_Resumed(delivery, waiting_on), self.suspend_flow.wait())


class _Resumed:
    """Awaitable continuing a coroutine that has already run up to `waiting_on` (what it yielded
    to the event loop): the same hand-off `await` does, done by hand."""

    def __init__(self, coro: Coroutine, waiting_on) -> None:
        self.coro = coro
        self.waiting_on = waiting_on

    def __await__(self):
        coro, yielded = self.coro, self.waiting_on
        while True:
            try:
                sent = yield yielded
            except BaseException as exc:  # noqa: BLE001 - cancellation goes into the coroutine
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


class Conductor(faust_conductor.Conductor):
    """faust's conductor takes an asyncio lock for every message to look up its partition's
    handler; the lock only guards the handler map while it is rebuilt, so here it is taken only
    while someone holds it."""

    def _compile_message_handler(self):
        if self.app.client_only:
            return super()._compile_message_handler()
        get_callback_for_tp = self._tp_to_callback.__getitem__
        lock = self._tp_to_callback_lock

        async def on_message(message):
            if lock.locked():
                async with lock:
                    callback = get_callback_for_tp(message.tp)
            else:
                callback = get_callback_for_tp(message.tp)
            return await callback(message)

        return on_message


class ProducerBuffer(faust_producer.ProducerBuffer):
    """faust's conductor asks the producer buffer for its size before every message it delivers,
    and the size reads the `producer_threaded` setting through faust's settings registry each
    time; here it is read once."""

    _threaded: bool | None = None

    @property
    def size(self) -> int:
        if self._threaded is None:
            self._threaded = bool(self.app.conf.producer_threaded)
        return super().size if self._threaded else len(self.pending._queue)


class Producer(faust_aiokafka.Producer):
    def __init__(self, transport, loop=None, **kwargs) -> None:
        super().__init__(transport, loop=loop, **kwargs)
        lean = ProducerBuffer(loop=self.loop, beacon=self.beacon)
        lean.app = self.buffer.app  # faust's buffer is only started in on_start: none to stop
        if self.threaded_producer is not None:
            lean.threaded_producer = self.threaded_producer
        self.buffer = lean


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
    Conductor = Conductor
    Producer = Producer


class RawSchema(faust.Schema):
    """Keys and values stay the broker's bytes: faust's serializer registry spends ~4 µs a
    message on its 'raw' codec, which changes nothing. The event class is looked up once (faust's
    app.create_event reads it from the settings for every message)."""

    def compile(self, app, *, on_key_decode_error=None, on_value_decode_error=None,
                default_propagate: bool = False):
        event_class = app.conf.Event

        async def decode(message, *, propagate: bool = default_propagate):
            return event_class(app, message.key, message.value, message.headers, message)

        return decode


class LeanMonitor(Monitor):
    """faust's Monitor keeps per-event statistics for faust's web pages, which labbus does not
    serve (labbus's Prometheus counters are its own). Kept: the inbound time per partition, which
    faust's stalled-stream check reads."""

    def on_message_in(self, tp, offset, message) -> None:
        pass

    def on_stream_event_in(self, tp, offset, stream, event):
        self.stream_inbound_time[tp] = monotonic()
        return None

    def on_stream_event_out(self, tp, offset, stream, event, state=None) -> None:
        pass

    def on_message_out(self, tp, offset, message) -> None:
        pass
