"""PostgreSQL read models: `devices` and `measurements` (see migrations/postgres)."""

from __future__ import annotations

import json

import asyncpg
from aiokafka import TopicPartition

from events.config import Config
from events.model import DeviceRegistered, MeasurementValidated
from events.topics import DEVICES, MEASUREMENTS_VALIDATED, topic_name
from projections.migrate import migrate
from projections.runner import Positioned

INSERT_MEASUREMENTS = """
INSERT INTO measurements (measurement_id, device_id, metric, value, unit, measured_at,
                          validated_event_id, source_partition, source_offset)
SELECT m.id, m.device_id, m.metric, m.value, m.unit,
       'epoch'::timestamptz + m.measured_us * interval '1 microsecond',
       m.event_id, m.part, m.off
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::float8[], $5::text[], $6::bigint[],
            $7::uuid[], $8::int[], $9::bigint[])
     AS m(id, device_id, metric, value, unit, measured_us, event_id, part, off)
ON CONFLICT (measurement_id) DO NOTHING
"""

UPSERT_DEVICES = """
INSERT INTO devices (device_id, device_type, model, location, metrics, attributes,
                     registered_at, last_event_id)
SELECT d.device_id, d.device_type, d.model, d.location,
       ARRAY(SELECT jsonb_array_elements_text(d.metrics)), d.attributes,
       'epoch'::timestamptz + d.registered_us * interval '1 microsecond', d.event_id
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[],
            $7::bigint[], $8::uuid[])
     AS d(device_id, device_type, model, location, metrics, attributes, registered_us, event_id)
ON CONFLICT (device_id) DO UPDATE SET
    device_type = EXCLUDED.device_type, model = EXCLUDED.model, location = EXCLUDED.location,
    metrics = EXCLUDED.metrics, attributes = EXCLUDED.attributes,
    registered_at = EXCLUDED.registered_at, last_event_id = EXCLUDED.last_event_id
WHERE devices.registered_at <= EXCLUDED.registered_at
"""

UPSERT_POSITIONS = """
INSERT INTO projection_positions (projection, topic, partition, next_offset, updated_at)
SELECT $1, t, p, o, now() FROM unnest($2::text[], $3::int[], $4::bigint[]) AS x(t, p, o)
ON CONFLICT (projection, topic, partition) DO UPDATE
    SET next_offset = EXCLUDED.next_offset, updated_at = now()
"""


class PostgresProjection:
    name = "postgres"

    def __init__(self, cfg: Config, dsn: str | None = None) -> None:
        self.cfg = cfg
        self.dsn = dsn or cfg.postgres_dsn
        self.pool: asyncpg.Pool | None = None

    def topics(self) -> list[str]:
        return [topic_name(self.cfg, DEVICES), topic_name(self.cfg, MEASUREMENTS_VALIDATED)]

    async def start(self) -> None:
        self.pool = await connect_pool(self.dsn, "LABBUS_POSTGRES_DSN")
        async with self.pool.acquire() as con:
            await migrate(con)

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def positions(self) -> dict[TopicPartition, int]:
        rows = await self.pool.fetch(
            "SELECT topic, partition, next_offset FROM projection_positions WHERE projection=$1",
            self.name)
        return {TopicPartition(r["topic"], r["partition"]): r["next_offset"] for r in rows}

    async def apply(self, events: list[Positioned], next_offsets: dict[TopicPartition, int]) -> None:
        m_rows = []
        devices: dict[str, dict] = {}
        for p in events:
            r = p.record
            if p.event_type == MeasurementValidated.TYPE:
                m_rows.append((r["measurement_id"], r["device_id"], r["metric"], r["value"],
                               r["unit"], r["measured_at"], r["event_id"], p.tp.partition,
                               p.offset))
            elif p.event_type == DeviceRegistered.TYPE:
                devices[r["device_id"]] = r  # the last registration in the batch wins
        async with self.pool.acquire() as con, con.transaction():
            if m_rows:
                await con.execute(INSERT_MEASUREMENTS, *map(list, zip(*m_rows)))
            if devices:
                ds = list(devices.values())
                await con.execute(
                    UPSERT_DEVICES, [d["device_id"] for d in ds], [d["device_type"] for d in ds],
                    [d["model"] for d in ds], [d["location"] for d in ds],
                    [json.dumps(d["metrics"]) for d in ds],
                    [json.dumps(d["attributes"]) for d in ds],
                    [d["occurred_at"] for d in ds], [d["event_id"] for d in ds])
            tps = list(next_offsets)
            await con.execute(UPSERT_POSITIONS, self.name, [tp.topic for tp in tps],
                              [tp.partition for tp in tps], [next_offsets[tp] for tp in tps])


async def connect_pool(dsn: str, variable: str, **kwargs) -> asyncpg.Pool:
    try:
        return await asyncpg.create_pool(dsn, min_size=1, max_size=4, **kwargs)
    except (OSError, asyncpg.PostgresError) as exc:
        safe = dsn.split("@")[-1]
        raise ConnectionError(f"PostgreSQL at {variable}=...@{safe} refused: {exc}") from exc
