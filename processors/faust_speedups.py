"""Lower per-event cost for faust-streaming apps on small machines: a transport, a schema and a
monitor, each found with py-spy, and each kept only because paired benchmarks measure a
difference against stock faust-streaming 0.15.3 (tests/bench/bench_faust_patches.py, the
validator stage; for the fetch wake-up, tests/bench/bench_pipeline.py; README, Benchmarks).
They copy or override private faust code, so pyproject.toml pins faust to the tested minor
version and tests/unit/test_faust_speedups.py fails, naming the function, when the source of any
upstream function listed in UPSTREAM_SOURCES changes.

The transport is faust's aiokafka driver with a different delivery loop and a cheaper getmany,
registered as the `labbus://` broker scheme (entry point `faust.transports` in pyproject.toml),
so an app opts in with `broker="labbus://host:port"`:

1. faust races the delivery of *every* message against `suspend_flow` (Service.wait_first: new
   tasks and an asyncio.wait per message, the largest single cost in a profile of the validator).
   Here a delivery runs inline up to its first suspension, and only one that really waits is
   raced. (Racing a whole fetched batch instead was cheaper but lost messages in
   tests/integration/test_validator_rebalance.py.)
2. When a stream buffer is full, the loop waits once (up to ROOM_WAIT_S) for it to drain to
   faust's low-water mark (on_buffer_drop signals it) instead of racing each following delivery
   into the one free slot.
3. When back-pressure has paused every partition, the fetcher wakes as soon as a buffer drains
   instead of sleeping faust's whole second.
4. getmany looks up each partition's end offset once per fetch, not once per record.

Removed after measuring it against stock faust 0.15.3 (no difference beyond the noise): the
conductor's handler lookup without its lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import inspect
from collections.abc import Coroutine
from time import monotonic

import faust
from faust.sensors import Monitor
from faust.transport import producer as faust_producer
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka

YIELD_EVERY = 100  # messages between giving the event loop a turn, as faust does
ROOM_WAIT_S = 0.2  # longest wait for a full stream buffer to drain before delivering anyway


class Consumer(faust_aiokafka.Consumer):
    _buffer_drained: asyncio.Event | None = None

    async def _wait_next_records(self, timeout: float):
        """When back-pressure has paused every partition, faust sleeps a whole second before it
        fetches again; here the fetcher wakes as soon as a stream buffer drains (or after that
        second, as before). The backlog stage bench never reaches that state, the live pipeline
        does: without this one validator stood still 3 x 1 s in a 12 s run."""
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

    def on_buffer_drop(self, tp) -> None:
        """faust's, plus the signal _wait_for_room and _wait_next_records wait for: faust resumed
        a partition because its stream buffer drained to the low-water mark."""
        super().on_buffer_drop(tp)
        if self._buffer_drained is not None:
            self._buffer_drained.set()

    async def _wait_for_room(self) -> None:
        """A stream buffer is full: rather than have each following delivery wait for one free
        slot (and be raced, at the cost of new tasks, one by one), wait once until the buffer has
        drained to faust's low-water mark (where faust resumes fetching the partition; waking
        earlier, at half, left partitions paused until faust's 1 s fetch sleep, 3 times per
        200,000 readings). The timeout only bounds the wait; delivery after it is the normal path
        and handles a still-full buffer itself."""
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


# The upstream code the patches above copy, override or reproduce, as tested: the sha256 of each
# function's source (inspect.getsource) in faust-streaming 0.15.3 and mode-streaming 0.7.1.
# tests/unit/test_faust_speedups.py fails, naming the function, when the installed source
# differs. After an upgrade: read what changed, port it into the copy (or drop the patch if
# stock faust now matches it: tests/bench/bench_faust_patches.py), then record the new hashes
# (`python -m labbus.processors.faust_speedups` prints this table).
UPSTREAM_SOURCES: dict[str, str] = {
    # Consumer._drain_messages is a copy of faust's loop with inline delivery and the room wait
    "faust.transport.consumer:Consumer._drain_messages":
        "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417",
    # Consumer.getmany is a copy of faust's with the end-offset lookup once per fetch
    "faust.transport.consumer:Consumer.getmany":
        "4b168d84882a70d6e3e2f9804430a63b92f8fd117d3187cbb4aeb54305bda34e",
    # Consumer._deliver reproduces wait_first(delivery, suspend_flow.wait()) and then calls it
    "mode.services:Service.wait_first":
        "feade6a31f8a67897cf687c54c66f5f4535288050bbaac07249ce2063d36ae2e",
    # Consumer._wait_next_records wraps faust's (and reads its paused-partition state)
    "faust.transport.consumer:Consumer._wait_next_records":
        "6218e1969a636b3ff504ad1b8e7ad58a113572e43d746cc96d684ed5153032c6",
    # Consumer.on_buffer_drop extends faust's; _queue_full reads the conductor's topic index
    "faust.transport.consumer:Consumer.on_buffer_drop":
        "4b57e8a418d5ad9c58632b13b58b377ae185855520fd1280870cf7141ac0d1d0",
    "faust.transport.conductor:Conductor._update_indices":
        "619b3247b96ac7d508b9b571e30fdaceb00378b77c79e4aee12a5d8ee3f41d34",
    # ProducerBuffer.size overrides faust's; Producer.__init__ replaces the buffer built there
    "faust.transport.producer:ProducerBuffer.size":
        "b543a978fdece62e7d7c434eea6e842995d67cc1d3288434f5f26ad72c10a779",
    "faust.transport.producer:Producer.__init__":
        "5c53a4b47aa1372b61ca07edc6e413347436429210427634c9c2c22738e034d8",
    # RawSchema.compile overrides Schema.compile and builds events as App.create_event does
    "faust.serializers.schemas:Schema.compile":
        "d46eec5ce3195b2c6752cb860a10946cee66ddf6a955f2ea44ac1568c0ecb9ad",
    "faust.app.base:App.create_event":
        "15fea3d1e95e6625b2f6a969e9ce4bbed786bed15fde58f0c6518f6e461f7a10",
    # LeanMonitor overrides these four
    "faust.sensors.monitor:Monitor.on_message_in":
        "b2a9a9045b2f456cc736fdbf99f47f4f45335896050c9e48703dfc8146ca51ea",
    "faust.sensors.monitor:Monitor.on_stream_event_in":
        "df6d2e5f6397ce441d1fdeb83cb7cb5893a33e507e5e0c8caad38e6a916d838d",
    "faust.sensors.monitor:Monitor.on_stream_event_out":
        "2d2277a6dbda754cd655207496c08adb6b9141e59556cd9373593c1ef28a18bd",
    "faust.sensors.monitor:Monitor.on_message_out":
        "7c4054247cde96c35740d0f5876b90d67549eed0af16f19cdcb3337e719a6c3b",
}


def upstream_function(name: str):
    """The function `module:Class.attr` names, as defined in that class (a property's getter)."""
    module, qualname = name.split(":")
    owner, _, attr = qualname.rpartition(".")
    cls = importlib.import_module(module)
    for part in owner.split("."):
        cls = getattr(cls, part)
    obj = vars(cls)[attr]  # KeyError: no longer defined there
    return obj.fget if isinstance(obj, property) else obj


def source_hash(name: str) -> str:
    return hashlib.sha256(inspect.getsource(upstream_function(name)).encode()).hexdigest()


def changed_upstream() -> list[str]:
    """The upstream functions of UPSTREAM_SOURCES whose installed source differs from the tested
    one (or that are gone), each as `module:qualname (why)`."""
    changed = []
    for name, tested in UPSTREAM_SOURCES.items():
        try:
            now = source_hash(name)
        except (ImportError, AttributeError, KeyError, OSError, TypeError) as exc:
            changed.append(f"{name} (gone: {exc!r})")
            continue
        if now != tested:
            changed.append(f"{name} (source sha256 {now[:12]}…, tested {tested[:12]}…)")
    return changed


if __name__ == "__main__":
    for upstream in UPSTREAM_SOURCES:
        print(f'    "{upstream}":\n        "{source_hash(upstream)}",')
