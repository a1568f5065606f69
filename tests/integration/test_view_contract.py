"""One contract for every view (as pyeventsourcing runs one recorder suite against every
adapter): each subclass below runs the same tests against one read model.

A view writes its rows and its positions together, so that a projector killed at any moment
resumes exactly where its rows end; it refuses a batch when the stored positions are not the
ones it last read or wrote; an event it can never write is dead-lettered and skipped, and an
outage of its database is ridden through.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiokafka import TopicPartition
from pymongo import MongoClient

from labbus.events import kafka
from labbus.events.codec import default_codec
from labbus.events.model import DeadLetter, MeasurementValidated, utcnow
from labbus.events.runtime import Positioned, PositionsMoved
from labbus.events.topics import DEAD_LETTER, MEASUREMENTS_VALIDATED, topic_name
from labbus.projections.mongo import MongoProjection
from labbus.projections.postgres import PostgresProjection
from tests.conftest import own_namespace, read_topic, run, wait_for
from tests.support.proxy import Proxy

POISON_US = -(2**62)  # a device timestamp no read model can hold


def validated(device: str, i: int, measured_us: int | None = None) -> bytes:
    codec = default_codec()
    event = MeasurementValidated.create(
        source="t", subject=device, sequence=i, measurement_id=uuid.uuid4(), device_id=device,
        metric="temperature", value=float(i), unit="degC", measured_at=utcnow())
    if measured_us is None:
        return codec.encode(event)
    _, plain = codec.decode_record(codec.encode(event), plain=True)
    return codec.encode_plain(MeasurementValidated.TYPE, {**plain, "measured_at": measured_us})


def private_tp(cfg) -> TopicPartition:
    """A partition of the validated topic no producer writes to: the views know the topic, and
    positions stored for it cannot disturb the projectors other tests run."""
    return TopicPartition(topic_name(cfg, MEASUREMENTS_VALIDATED), 1000 + uuid.uuid4().int % 10**6)


def positioned(tp: TopicPartition, offsets, prefix: str, poison_at: int | None = None):
    codec = default_codec()
    return [Positioned(tp, o, *codec.decode_record(
        validated(f"{prefix}-{o % 3}", o, POISON_US if o == poison_at else None), plain=True))
        for o in offsets]


async def publish(cfg, values: list[tuple[bytes, bytes]]) -> None:
    await kafka.ensure_topics(cfg)
    producer = kafka.producer(cfg)
    await producer.start()
    try:
        topic = topic_name(cfg, MEASUREMENTS_VALIDATED)
        await asyncio.gather(*[await producer.send(topic, v, key=k) for k, v in values])
    finally:
        await producer.stop()


def stream(prefix: str, n: int, poison: set[int] = frozenset()) -> list[tuple[bytes, bytes]]:
    return [(f"{prefix}-{i % 5}".encode(),
             validated(f"{prefix}-{i % 5}", i, POISON_US if i in poison else None))
            for i in range(n)]


class ViewContract:
    """Subclasses say how to build the view, count its rows and move its positions."""

    # a view started in a test first catches up on the session's whole validated topic (every
    # earlier test's readings); SecantusDB, the Mongo-compatible dev server, is the slow one
    catch_up_s = 90
    kill_events = 12_000  # events the kill -9 test streams (killed at 1/4 and 1/2 of them)

    process: str  # `labbus project <process>`

    def make_view(self, cfg):
        raise NotImplementedError

    def rows(self, cfg, prefix: str) -> int:
        """Measurements of the devices named prefix-*, as the view counts them."""
        raise NotImplementedError

    def move_position(self, cfg, view_name: str, tp: TopicPartition, offset: int) -> None:
        raise NotImplementedError

    def stored_position(self, cfg, view_name: str, tp: TopicPartition) -> int | None:
        raise NotImplementedError

    def address(self, cfg) -> tuple[str, int]:
        raise NotImplementedError

    def env_through(self, cfg, port: int) -> dict[str, str]:
        raise NotImplementedError

    # -- the contract ---------------------------------------------------------------------

    def test_replaying_a_batch_is_a_no_op(self, cfg):
        tp = private_tp(cfg)
        prefix = f"replay-{self.process}-{uuid.uuid4().hex[:6]}"
        batch = positioned(tp, range(10), prefix)

        async def scenario():
            view = self.make_view(cfg)
            await view.start()
            try:
                await view.positions()
                await view.apply(batch, {tp: 10})
                first = await asyncio.to_thread(self.rows, cfg, prefix)
                await view.positions()  # as after a restart: stored position re-read
                await view.apply(batch, {tp: 10})
                return first, await asyncio.to_thread(self.rows, cfg, prefix)
            finally:
                await view.stop()

        assert run(scenario()) == (10, 10)

    def test_rows_and_positions_are_written_together_or_not_at_all(self, cfg):
        tp = private_tp(cfg)
        prefix = f"atomic-{self.process}-{uuid.uuid4().hex[:6]}"

        async def scenario():
            view = self.make_view(cfg)
            await view.start()
            try:
                await view.positions()
                await view.apply(positioned(tp, range(5), prefix), {tp: 5})
                with pytest.raises(Exception) as failed:
                    await view.apply(positioned(tp, range(5, 15), prefix, poison_at=12),
                                     {tp: 15})
                assert not isinstance(failed.value, PositionsMoved)
            finally:
                await view.stop()

        run(scenario())
        assert self.rows(cfg, prefix) == 5, "rows of a failed batch were written"
        assert self.stored_position(cfg, self.make_view(cfg).name, tp) == 5

    def test_a_batch_on_moved_positions_is_refused_whole(self, cfg):
        tp = private_tp(cfg)
        prefix = f"moved-{self.process}-{uuid.uuid4().hex[:4]}"

        async def scenario():
            view = self.make_view(cfg)
            await view.start()
            try:
                await view.positions()
                await view.apply(positioned(tp, range(10), prefix + "a"), {tp: 10})
                # another writer, or commits lost in a crash
                await asyncio.to_thread(self.move_position, cfg, view.name, tp, 5)
                with pytest.raises(PositionsMoved):
                    await view.apply(positioned(tp, range(10, 20), prefix + "b"), {tp: 20})
                assert await asyncio.to_thread(self.rows, cfg, prefix + "b") == 0
                assert await asyncio.to_thread(self.stored_position, cfg, view.name, tp) == 5
                assert (await view.positions())[tp] == 5  # re-read: accepted again
                await view.apply(positioned(tp, range(10, 20), prefix + "c"), {tp: 20})
                assert await asyncio.to_thread(self.rows, cfg, prefix + "c") == 10
            finally:
                await view.stop()

        run(scenario())

    def test_kill_9_mid_stream_leaves_the_view_equal_to_the_log(self, env, processes):
        with own_namespace(env, f"vk-{self.process}") as (cfg, own):
            self._kill_9_mid_stream(cfg, processes, own)

    def _kill_9_mid_stream(self, cfg, processes, own: dict[str, str]) -> None:
        prefix, n = f"kill-{self.process}-{uuid.uuid4().hex[:6]}", self.kill_events
        # one name across the restarts (static membership): each restart takes the killed
        # run's partitions at once instead of waiting out its 10 s session
        own = {**own, "LABBUS_GROUP_INSTANCE_ID": f"projector-{self.process}-0"}
        run(publish(cfg, stream(prefix, n)))
        for threshold in (n // 4, n // 2):
            proc = processes.start("project", self.process, "--batch", "300", extra_env=own)
            wait_for(lambda t=threshold: self.rows(cfg, prefix) >= t, self.catch_up_s,
                     f"{threshold} rows")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            assert self.rows(cfg, prefix) <= n
        processes.start("project", self.process, "--batch", "300", extra_env=own)
        wait_for(lambda: self.rows(cfg, prefix) >= n, self.catch_up_s + 30,
                 "every row after the restart")
        assert self.rows(cfg, prefix) == n

    def test_an_unwritable_event_is_dead_lettered_once_and_the_rest_projected(self, env,
                                                                             processes):
        with own_namespace(env, f"vp-{self.process}") as (cfg, own):
            self._poison(cfg, processes, own)

    def _poison(self, cfg, processes, own: dict[str, str]) -> None:
        prefix, n = f"poison-{self.process}-{uuid.uuid4().hex[:6]}", 400
        poison = {57, 58, 301}
        run(publish(cfg, stream(prefix, n, poison)))
        proc = processes.start("project", self.process, extra_env=own)
        wait_for(lambda: self.rows(cfg, prefix) >= n - len(poison), self.catch_up_s,
                 "the good rows")

        def letters():
            codec = default_codec()
            found = [codec.decode(r.value) for r in run(read_topic(cfg, topic_name(
                cfg, DEAD_LETTER)))]
            return [d for d in found if isinstance(d, DeadLetter)
                    and d.failed_by == f"projector-{self.process}"
                    and d.source_topic == topic_name(cfg, MEASUREMENTS_VALIDATED)
                    and prefix.encode() in (d.original_key or b"")]

        wait_for(lambda: len(letters()) >= len(poison), 30, "dead letters")
        mine = letters()
        assert len(mine) == len(poison), [(d.source_partition, d.source_offset, d.event_id,
                                           d.error) for d in mine]
        assert all(d.error_type == "unwritable" and d.error for d in mine)
        assert self.rows(cfg, prefix) == n - len(poison)
        assert proc.poll() is None, "the projector stopped"

    def test_a_database_outage_is_ridden_through(self, env, processes):
        with own_namespace(env, f"vo-{self.process}") as (cfg, own):
            self._outage(cfg, processes, own)

    def _outage(self, cfg, processes, own: dict[str, str]) -> None:
        prefix, n = f"outage-{self.process}-{uuid.uuid4().hex[:6]}", 3000
        proxy = Proxy(*self.address(cfg))
        try:
            run(publish(cfg, stream(prefix, n)))
            proc = processes.start("project", self.process, "--batch", "200",
                                   extra_env={**own, **self.env_through(cfg, proxy.port)})
            wait_for(lambda: self.rows(cfg, prefix) >= n, self.catch_up_s,
                     "rows before the outage")
            proxy.cut()
            run(publish(cfg, stream(prefix + "-during", n)))
            log = Path(proc.log_path)
            # down until the projector has met the outage (a write failed; Mongo's server
            # selection gives up after 10 s), then 5 s more of retrying
            wait_for(lambda: "unavailable" in log.read_text(), 60, "the outage to be met")
            for _ in range(10):
                assert proc.poll() is None, "the projector exited during the outage"
                time.sleep(0.5)
            assert self.rows(cfg, prefix + "-during") == 0
            proxy.restore()
            wait_for(lambda: self.rows(cfg, prefix + "-during") >= n, 90, "rows after it")
            assert self.rows(cfg, prefix + "-during") == n
            assert proc.poll() is None
            assert "resumed" in log.read_text()
            scraped = urllib.request.urlopen(proc.metrics_url, timeout=5).read().decode()
            errors = [line for line in scraped.splitlines()
                      if line.startswith("labbus_sink_errors_total{")]
            assert errors and float(errors[0].rsplit(" ", 1)[1]) > 0
            assert f'labbus_stalled{{process="projector-{self.process}"}} 0.0' in scraped
        finally:
            proxy.close()


class TestPostgresView(ViewContract):
    process = "postgres"

    def make_view(self, cfg):
        return PostgresProjection(cfg)

    def _sql(self, cfg, query: str, *args):
        async def go():
            con = await asyncpg.connect(cfg.postgres_dsn)
            try:
                return await con.fetchval(query, *args)
            finally:
                await con.close()
        return run(go())

    def rows(self, cfg, prefix):
        if not self._sql(cfg, "SELECT to_regclass('measurements') IS NOT NULL"):
            return 0  # not migrated yet
        return self._sql(cfg, "SELECT count(*) FROM measurements WHERE device_id LIKE $1",
                         prefix + "-%")

    def move_position(self, cfg, view_name, tp, offset):
        self._sql(cfg, "UPDATE projection_positions SET next_offset = $4 WHERE projection = $1 "
                  "AND topic = $2 AND partition = $3", view_name, tp.topic, tp.partition, offset)

    def stored_position(self, cfg, view_name, tp):
        return self._sql(cfg, "SELECT next_offset FROM projection_positions WHERE projection = $1"
                         " AND topic = $2 AND partition = $3", view_name, tp.topic, tp.partition)

    def address(self, cfg):
        u = urlsplit(cfg.postgres_dsn)
        return u.hostname, u.port

    def env_through(self, cfg, port):
        u = urlsplit(cfg.postgres_dsn)
        netloc = u.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{port}"
        return {"LABBUS_POSTGRES_DSN": urlunsplit(u._replace(netloc=netloc))}


class TestMongoView(ViewContract):
    process = "mongo"
    catch_up_s = 300
    kill_events = 4_000  # SecantusDB writes ~5x slower than PostgreSQL here; 13 batches of 300

    def make_view(self, cfg):
        return MongoProjection(cfg)

    def _db(self, cfg):
        return MongoClient(cfg.mongo_url)[cfg.mongo_db]

    def rows(self, cfg, prefix):
        return sum(d.get("total_measurements", 0) for d in self._db(cfg).devices.find(
            {"_id": {"$regex": f"^{prefix}-"}}))

    def move_position(self, cfg, view_name, tp, offset):
        self._db(cfg).projection_positions.update_one(
            {"_id": f"{view_name}:{tp.topic}:{tp.partition}"}, {"$set": {"next_offset": offset}})

    def stored_position(self, cfg, view_name, tp):
        doc = self._db(cfg).projection_positions.find_one(
            {"_id": f"{view_name}:{tp.topic}:{tp.partition}"})
        return None if doc is None else doc["next_offset"]

    def address(self, cfg):
        u = urlsplit(cfg.mongo_url)
        return u.hostname, u.port

    def env_through(self, cfg, port):
        return {"LABBUS_MONGO_URL": f"mongodb://127.0.0.1:{port}/?directConnection=true"}
