"""The real local services (Kafka, PostgreSQL, SecantusDB) managed by deploy.local.services.

Starts them if needed (the first run fetches Kafka's jars and may take a minute) and leaves
them running; `services.down` stops them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
import uuid

import asyncpg
import pymongo
import pytest
from aiokafka.admin import NewTopic

from labbus.deploy.local import services
from labbus.deploy.local.verify_mongo import verify
from labbus.events import config, kafka

pytestmark = pytest.mark.skipif(os.environ.get("LABBUS_TEST_SERVICES") == "docker",
                                reason="tests labbus's own local services, not containers")


@pytest.fixture(scope="module")
def cfg() -> config.Config:
    return config.load()


@pytest.fixture(scope="module")
def addresses(cfg):
    first = services.up(cfg)
    t0 = time.monotonic()
    second = services.up(cfg)
    return first, second, time.monotonic() - t0


def test_up_twice_second_is_fast(addresses, cfg):
    first, second, elapsed = addresses
    assert first == second == {"kafka": cfg.kafka_bootstrap, "postgres": cfg.postgres_dsn,
                               "mongo": cfg.mongo_url}
    assert elapsed < 3.0, f"second up() took {elapsed:.2f} s"


def test_status_all_running(addresses, cfg):
    by_name = {s.name: s for s in services.status(cfg)}
    assert set(by_name) == {"kafka", "postgres", "mongo"}
    for s in by_name.values():
        assert s.running, s
        if not cfg.explicitly_set({"kafka": "kafka_bootstrap", "postgres": "postgres_dsn",
                                   "mongo": "mongo_url"}[s.name]):
            assert s.pid is not None, s
    assert "***" in by_name["postgres"].address or "@" not in by_name["postgres"].address


# --- Kafka -----------------------------------------------------------------------------

async def _create_topic(cfg, topic: str) -> None:
    admin = kafka.admin(cfg)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()


async def _delete_topic(cfg, topic: str) -> None:
    admin = kafka.admin(cfg)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()


async def _produce(cfg, topic: str, value: bytes) -> None:
    producer = kafka.producer(cfg)  # acks=all, idempotent
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"k")
    finally:
        await producer.stop()


async def _read_all(cfg, topic: str) -> list[bytes]:
    consumer = kafka.consumer(cfg, topic, group=None, isolation_level="read_uncommitted")
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=10_000)
        return [m.value for msgs in batches.values() for m in msgs]
    finally:
        await consumer.stop()


@pytest.fixture
def topic(addresses, cfg):
    name = f"{cfg.namespace}labbus-test-{uuid.uuid4().hex[:8]}"
    asyncio.run(_create_topic(cfg, name))
    yield name
    asyncio.run(_delete_topic(cfg, name))


def test_kafka_idempotent_producer_and_consumer(cfg, topic):
    asyncio.run(_produce(cfg, topic, b"hello"))
    assert asyncio.run(_read_all(cfg, topic)) == [b"hello"]


def test_kafka_restart_keeps_messages(cfg, topic):
    if cfg.explicitly_set("kafka_bootstrap"):
        pytest.skip("Kafka is external (LABBUS_KAFKA_BOOTSTRAP); not restarted here")
    asyncio.run(_produce(cfg, topic, b"durable"))
    pid = services.status(cfg)[0].pid
    services.down(cfg, only=["kafka"])
    assert not services.status(cfg)[0].running
    services.up(cfg, only=["kafka"])
    assert services.status(cfg)[0].pid != pid
    assert asyncio.run(_read_all(cfg, topic)) == [b"durable"]


# --- PostgreSQL -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pg_dsns(addresses, cfg):
    """A fresh database for this test module: (writer DSN, reader DSN)."""
    name = f"labbus_test_{uuid.uuid4().hex[:8]}"
    writer = services.create_database(cfg, name)
    yield writer, services.with_database(cfg.postgres_api_dsn, name)
    services.drop_database(cfg, name)


def test_postgres_writer_creates_reader_only_selects(pg_dsns):
    writer_dsn, reader_dsn = pg_dsns

    async def scenario() -> None:
        writer = await asyncpg.connect(writer_dsn)
        try:
            await writer.execute("CREATE TABLE samples (id int PRIMARY KEY, name text)")
            await writer.execute("INSERT INTO samples VALUES (1, 'a')")
        finally:
            await writer.close()
        reader = await asyncpg.connect(reader_dsn)
        try:
            assert await reader.fetchval("SELECT name FROM samples WHERE id = 1") == "a"
            for sql in ("INSERT INTO samples VALUES (2, 'b')", "UPDATE samples SET name = 'x'",
                        "DELETE FROM samples", "CREATE TABLE mine (x int)",
                        "CREATE TEMP TABLE t (x int)", "CREATE SCHEMA own"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await reader.execute(sql)
        finally:
            await reader.close()

    asyncio.run(scenario())


def test_postgres_main_database_provisioned(addresses, cfg):
    async def scenario() -> None:
        for dsn in (cfg.postgres_dsn, cfg.postgres_api_dsn):
            conn = await asyncpg.connect(dsn)
            try:
                assert await conn.fetchval("SELECT current_database()") == \
                    services.postgres.parse(cfg.postgres_dsn).database
            finally:
                await conn.close()

    asyncio.run(scenario())


# --- Mongo -----------------------------------------------------------------------------

def test_mongo_ping(addresses, cfg):
    client = pymongo.MongoClient(cfg.mongo_url, serverSelectionTimeoutMS=5000)
    try:
        assert client.admin.command("ping")["ok"] == 1
    finally:
        client.close()


def test_mongo_does_what_labbus_needs(addresses, cfg):
    failed = [(name, detail) for name, ok, detail in verify(cfg.mongo_url) if not ok]
    assert not failed


# --- errors ------------------------------------------------------------------------------------

def test_port_taken_by_stranger_is_a_clear_error(cfg, tmp_path):
    if cfg.explicitly_set("kafka_bootstrap"):
        pytest.skip("LABBUS_KAFKA_BOOTSTRAP is set")
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        other = dataclasses.replace(cfg, home=tmp_path, kafka_bootstrap=f"127.0.0.1:{port}")
        with pytest.raises(services.ServiceError) as e:
            services.up(other, echo=lambda _: None, only=["kafka"])
    assert e.value.piece == "kafka"
    assert str(e.value).startswith("kafka: ") and "already in use" in str(e.value)
