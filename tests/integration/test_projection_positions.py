"""The PostgreSQL projection commits without waiting for the WAL flush, so a database crash can
lose its last commits (rows and positions together). It must notice and replay them."""

import uuid
from pathlib import Path

import asyncpg
import pytest
from aiokafka import TopicPartition

from labbus.events.codec import default_codec
from labbus.events.model import MeasurementValidated, utcnow
from labbus.events.runtime import Positioned, PositionsMoved
from labbus.events.topics import MEASUREMENTS_VALIDATED, topic_name
from labbus.projections.postgres import PostgresProjection
from tests.conftest import run, wait_for
from tests.integration.test_projector_crash import publish_validated


def readings(tp: TopicPartition, offsets: range, device: str) -> list[Positioned]:
    codec = default_codec()
    return [Positioned(tp, o, *codec.decode_record(codec.encode(MeasurementValidated.create(
        source="t", subject=device, sequence=o, measurement_id=uuid.uuid4(), device_id=device,
        metric="temperature", value=20.0, unit="degC", measured_at=utcnow())), plain=True))
        for o in offsets]

async def count(dsn: str, device_prefix: str) -> tuple[int, int]:
    con = await asyncpg.connect(dsn)
    try:
        return tuple(await con.fetchrow(
            "SELECT count(*), count(DISTINCT measurement_id) FROM measurements "
            "WHERE device_id LIKE $1", device_prefix + "%"))
    finally:
        await con.close()

async def lose_last_commits(dsn: str, topic: str, back: int) -> None:
    """What a crash with asynchronous commit does: the last commits vanish, rows and positions
    alike, as if never made."""
    con = await asyncpg.connect(dsn)
    try:
        async with con.transaction():
            for r in await con.fetch(
                    "SELECT partition, next_offset FROM projection_positions "
                    "WHERE projection = 'postgres' AND topic = $1", topic):
                lost_from = max(r["next_offset"] - back, 0)
                await con.execute("DELETE FROM measurements WHERE source_partition = $1 "
                                  "AND source_offset >= $2", r["partition"], lost_from)
                await con.execute("UPDATE projection_positions SET next_offset = $3 "
                                  "WHERE projection = 'postgres' AND topic = $1 "
                                  "AND partition = $2", topic, r["partition"], lost_from)
    finally:
        await con.close()

def test_a_batch_on_moved_positions_is_refused_whole(cfg):
    tp = TopicPartition(f"positions-{uuid.uuid4().hex[:6]}", 0)

    async def scenario():
        projection = PostgresProjection(cfg)
        await projection.start()
        try:
            await projection.positions()
            await projection.apply(readings(tp, range(0, 10), "moved-a"), {tp: 10})
            con = await asyncpg.connect(cfg.postgres_dsn)
            await con.execute("UPDATE projection_positions SET next_offset = 5 "
                              "WHERE projection = 'postgres' AND topic = $1", tp.topic)
            with pytest.raises(PositionsMoved, match="10, 5"):
                await projection.apply(readings(tp, range(10, 20), "moved-b"), {tp: 20})
            assert await count(cfg.postgres_dsn, "moved-b") == (0, 0)
            assert await con.fetchval("SELECT next_offset FROM projection_positions "
                                      "WHERE projection = 'postgres' AND topic = $1",
                                      tp.topic) == 5
            await con.close()
            assert (await projection.positions())[tp] == 5  # re-read: writes are accepted again
            await projection.apply(readings(tp, range(5, 20), "moved-c"), {tp: 20})
            assert await count(cfg.postgres_dsn, "moved-c") == (15, 15)
        finally:
            await projection.stop()

    run(scenario())

def test_the_projector_replays_commits_lost_in_a_database_crash(cfg, processes):
    n, more = 6000, 600
    ids = run(publish_validated(cfg, n, prefix="lost"))
    proc = processes.start("project", "postgres", "--batch", "500")
    wait_for(lambda: run(count(cfg.postgres_dsn, "lost"))[0] >= n, 90, "all rows projected")

    run(lose_last_commits(cfg.postgres_dsn, topic_name(cfg, MEASUREMENTS_VALIDATED), back=400))
    assert run(count(cfg.postgres_dsn, "lost"))[0] < n  # the crash took rows with it
    ids |= run(publish_validated(cfg, more, prefix="lost"))  # the projector's next write notices

    wait_for(lambda: run(count(cfg.postgres_dsn, "lost"))[0] >= n + more, 60,
             "lost rows replayed")
    assert run(count(cfg.postgres_dsn, "lost")) == (n + more, n + more) == (len(ids), len(ids))
    assert "positions moved" in Path(proc.log_path).read_text()

def test_asynchronous_commit_is_on_for_the_projection_only(cfg):
    async def settings():
        projection = PostgresProjection(cfg)
        await projection.start()
        try:
            async with projection.pool.acquire() as con:
                mine = await con.fetchval("SHOW synchronous_commit")
        finally:
            await projection.stop()
        con = await asyncpg.connect(cfg.postgres_dsn)
        try:
            default = await con.fetchval("SHOW synchronous_commit")
        finally:
            await con.close()
        return mine, default

    assert run(settings()) == ("off", "on")
