"""kill -9 the PostgreSQL projector mid-stream: the read model still equals the log."""

import asyncio
import os
import signal
import uuid

import asyncpg

from labbus.events import kafka
from labbus.events.codec import default_codec
from labbus.events.model import MeasurementValidated, utcnow
from labbus.events.topics import MEASUREMENTS_VALIDATED, topic_name
from tests.conftest import read_topic, run, wait_for

N = 40_000


async def publish_validated(cfg, n: int, prefix: str = "crash",
                            resend: int = 0) -> set[uuid.UUID]:
    """n validated readings over 17 devices; then the first `resend` of them again, byte for byte,
    as a validator re-emits decisions after a crash or a rebalance."""
    await kafka.ensure_topics(cfg)
    codec = default_codec()
    producer = kafka.producer(cfg)
    await producer.start()
    ids = set()
    try:
        futures, sent = [], []
        for i in range(n):
            mid = uuid.uuid4()
            ids.add(mid)
            device = f"{prefix}-{i % 17}"
            event = MeasurementValidated.create(
                source="test", subject=device, sequence=i, measurement_id=mid, device_id=device,
                metric="temperature", value=float(i), unit="degC", measured_at=utcnow())
            sent.append((event.key, codec.encode(event)))
        for key, value in sent + sent[:resend]:
            futures.append(await producer.send(topic_name(cfg, MEASUREMENTS_VALIDATED), value,
                                               key=key))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return ids


async def snapshot(dsn: str):
    con = await asyncpg.connect(dsn)
    try:
        if not await con.fetchval("SELECT to_regclass('measurements') IS NOT NULL"):
            return 0, 0, {}
        total, distinct = await con.fetchrow(
            "SELECT count(*), count(DISTINCT measurement_id) FROM measurements "
            "WHERE device_id LIKE 'crash-%'")
        positions = {(r["topic"], r["partition"]): r["next_offset"] for r in await con.fetch(
            "SELECT topic, partition, next_offset FROM projection_positions "
            "WHERE projection = 'postgres'")}
        return total, distinct, positions
    finally:
        await con.close()


def test_kill_9_mid_stream_loses_and_duplicates_nothing(own_cfg, processes):
    # a namespace of its own: its 40,000 readings stay out of the session's topics, which later
    # tests' projectors and readers would go through
    cfg = own_cfg
    # one name across the restarts (static membership): a restart takes the killed one's
    # partitions at once instead of waiting out its 10 s session
    member = {"LABBUS_GROUP_INSTANCE_ID": "crash-projector-0"}
    ids = run(publish_validated(cfg, N))
    kills = 0
    for threshold in (N // 8, N // 3, 2 * N // 3):
        proc = processes.start("project", "postgres", "--batch", "700", extra_env=member)
        wait_for(lambda t=threshold: run(snapshot(cfg.postgres_dsn))[0] >= t, 90,
                 f"{threshold} rows before the kill")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        total, distinct, _ = run(snapshot(cfg.postgres_dsn))
        assert total == distinct, "a duplicate row appeared after kill -9"
    assert kills == 3
    processes.start("project", "postgres", "--batch", "700", extra_env=member)
    wait_for(lambda: run(snapshot(cfg.postgres_dsn))[0] >= N, 120, "all rows after restart")

    total, distinct, positions = run(snapshot(cfg.postgres_dsn))
    assert total == distinct == N

    async def projected_ids():
        con = await asyncpg.connect(cfg.postgres_dsn)
        try:
            return {r[0] for r in await con.fetch(
                "SELECT measurement_id FROM measurements WHERE device_id LIKE 'crash-%'")}
        finally:
            await con.close()

    assert run(projected_ids()) == ids
    log = run(read_topic(cfg, topic_name(cfg, MEASUREMENTS_VALIDATED)))
    ends = {}
    for rec in log:
        ends[(rec.topic, rec.partition)] = max(ends.get((rec.topic, rec.partition), 0),
                                                rec.offset + 1)
    for tp, end in ends.items():
        assert positions[tp] == end, f"stored position of {tp} is not the log end"
