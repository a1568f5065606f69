"""PostgreSQL read models: devices (with status and heartbeats), measurements, commands, alerts,
colour-mixing campaigns, users, and test service requests with their executions (see
migrations/postgres)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime

import asyncpg
from aiokafka import TopicPartition

from labbus.events import model as m
from labbus.events.config import Config
from labbus.events.db import connect_pool
from labbus.events.model import DeviceHeartbeat, DeviceRegistered, MeasurementValidated
from labbus.events.runtime import Fence, Positioned
from labbus.events.topics import (
    ALERTS,
    COLOUR_READINGS,
    COMMANDS,
    DEVICE_STATUS,
    DEVICES,
    EXPERIMENTS,
    MEASUREMENTS_VALIDATED,
    ROBOT_RUNS,
    TESTING_EXECUTIONS,
    TESTING_REQUESTS,
    TESTING_SAMPLES,
    USERS,
    topic_name,
)
from labbus.projections import partitions
from labbus.projections import postgres_audit as audit
from labbus.projections.migrate import migrate
from labbus.projections.postgres_audit import AUDITED
from labbus.projections.postgres_devices import DEVICE_SQL, HEARTBEATS, heartbeat_args
from labbus.projections.postgres_testing import TESTING_SQL
from labbus.projections.postgres_users import USER_SQL

INSERT_MEASUREMENTS = """
INSERT INTO measurements (measurement_id, device_id, metric, value, unit, measured_at,
                          validated_event_id, source_partition, source_offset)
SELECT m.id, m.device_id, m.metric, m.value, m.unit,
       'epoch'::timestamptz + m.measured_us * interval '1 microsecond',
       m.event_id, m.part, m.off
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::float8[], $5::text[], $6::bigint[],
            $7::uuid[], $8::int[], $9::bigint[])
     AS m(id, device_id, metric, value, unit, measured_us, event_id, part, off)
ON CONFLICT (measurement_id, measured_at) DO NOTHING
"""

UPSERT_DEVICES = """
INSERT INTO devices (device_id, device_type, model, location, metrics, attributes,
                     registered_at, last_event_id, specs, spec_version)
SELECT d.device_id, d.device_type, d.model, d.location,
       ARRAY(SELECT jsonb_array_elements_text(d.metrics)), d.attributes,
       'epoch'::timestamptz + d.registered_us * interval '1 microsecond', d.event_id, d.specs,
       d.spec_version
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[],
            $7::bigint[], $8::uuid[], $9::jsonb[], $10::int[])
     AS d(device_id, device_type, model, location, metrics, attributes, registered_us, event_id,
          specs, spec_version)
ON CONFLICT (device_id) DO UPDATE SET
    device_type = EXCLUDED.device_type, model = EXCLUDED.model, location = EXCLUDED.location,
    metrics = EXCLUDED.metrics, attributes = EXCLUDED.attributes,
    registered_at = EXCLUDED.registered_at, last_event_id = EXCLUDED.last_event_id,
    specs = EXCLUDED.specs, spec_version = EXCLUDED.spec_version
WHERE devices.registered_at IS NULL  -- the row was made by status or heartbeats
   OR (devices.spec_version, devices.registered_at)
      <= (EXCLUDED.spec_version, EXCLUDED.registered_at)
"""

UPSERT_POSITIONS = """
INSERT INTO projection_positions (projection, topic, partition, next_offset, updated_at)
SELECT $1, t, p, o, now() FROM unnest($2::text[], $3::int[], $4::bigint[]) AS x(t, p, o)
ON CONFLICT (projection, topic, partition) DO UPDATE
    SET next_offset = EXCLUDED.next_offset, updated_at = now()
"""


LOCK_POSITIONS = """
SELECT topic, partition, next_offset FROM projection_positions
WHERE projection = $1 AND (topic, partition) IN (SELECT * FROM unnest($2::text[], $3::int[]))
FOR UPDATE
"""


class PostgresProjection:
    """Rows and positions are written in one transaction, committed without waiting for the WAL
    flush (synchronous_commit=off): a WAL fsync can wait hundreds of ms behind other writes to
    the disk, and the projector would wait with it. A database crash can then lose the last
    commits, rows and positions together. Each write therefore checks that the stored positions
    are still those this projector last read or wrote; if not (lost commits, or another
    projector wrote), it raises PositionsMoved and the runner re-reads them and replays from
    there."""

    name = "postgres"

    def __init__(self, cfg: Config, dsn: str | None = None) -> None:
        self.cfg = cfg
        self.dsn = dsn or cfg.postgres_dsn
        self.pool: asyncpg.Pool | None = None
        self.fence = Fence()
        self.maintenance: asyncio.Task | None = None

    def topics(self) -> list[str]:
        return [topic_name(self.cfg, spec) for spec in
                (DEVICES, MEASUREMENTS_VALIDATED, EXPERIMENTS, ROBOT_RUNS, COLOUR_READINGS,
                 DEVICE_STATUS, COMMANDS, ALERTS, USERS, TESTING_REQUESTS, TESTING_EXECUTIONS,
                 TESTING_SAMPLES)]

    async def start(self) -> None:
        self.pool = await connect_pool(self.dsn, "LABBUS_POSTGRES_DSN",
                                       server_settings={"synchronous_commit": "off"})
        async with self.pool.acquire() as con:
            await migrate(con)
            # partitions for today and the days ahead before the first row arrives; then hourly
            await partitions.maintain(con, self.cfg.measurement_retention_days)
        self.maintenance = asyncio.create_task(partitions.run_periodically(
            self.pool, self.cfg.measurement_retention_days, first_delay=partitions.INTERVAL_S))

    async def stop(self) -> None:
        if self.maintenance is not None:
            self.maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.maintenance
        if self.pool is not None:
            await self.pool.close()

    async def positions(self) -> dict[TopicPartition, int]:
        rows = await self.pool.fetch(
            "SELECT topic, partition, next_offset FROM projection_positions WHERE projection=$1",
            self.name)
        stored = {TopicPartition(r["topic"], r["partition"]): r["next_offset"] for r in rows}
        self.fence.believed = dict(stored)
        return stored

    async def apply(self, events: list[Positioned],
                    next_offsets: dict[TopicPartition, int]) -> None:
        m_rows = []
        devices: dict[str, dict] = {}
        beats: dict[str, int] = {}  # device -> its latest heartbeat in the batch (µs)
        statements: list[tuple[str, tuple]] = []  # (sql, args) in log order
        for p in events:
            if p.event_type in AUDITED or p.record.get("actor") is not None:
                statements.extend(audit.statements(p))
            if p.event_type in CAMPAIGN_SQL:
                statements.extend(CAMPAIGN_SQL[p.event_type](p.record))
                continue
            r = p.record
            if p.event_type == MeasurementValidated.TYPE:
                m_rows.append((r["measurement_id"], r["device_id"], r["metric"], r["value"],
                               r["unit"], r["measured_at"], r["event_id"], p.tp.partition,
                               p.offset))
            elif p.event_type == DeviceRegistered.TYPE:
                devices[r["device_id"]] = r  # the last registration in the batch wins
            elif p.event_type == DeviceHeartbeat.TYPE:
                if r["occurred_at"] > beats.get(r["device_id"], -2**63):
                    beats[r["device_id"]] = r["occurred_at"]
            elif p.event_type in DEVICE_SQL:
                statements.extend(DEVICE_SQL[p.event_type](p))
            elif p.event_type in USER_SQL:
                statements.extend(USER_SQL[p.event_type](p))
            elif p.event_type in TESTING_SQL:
                statements.extend(TESTING_SQL[p.event_type](p))
        async with self.pool.acquire() as con, con.transaction():
            await self._check_positions(con, next_offsets)
            if m_rows:
                await con.execute(INSERT_MEASUREMENTS, *map(list, zip(*m_rows, strict=False)))
            if devices:
                ds = list(devices.values())
                await con.execute(
                    UPSERT_DEVICES, [d["device_id"] for d in ds], [d["device_type"] for d in ds],
                    [d["model"] for d in ds], [d["location"] for d in ds],
                    [json.dumps(d["metrics"]) for d in ds],
                    [json.dumps(d["attributes"]) for d in ds],
                    [d["occurred_at"] for d in ds], [d["event_id"] for d in ds],
                    [json.dumps(d["specs"]) for d in ds], [d["spec_version"] for d in ds])
            if beats:
                await con.execute(HEARTBEATS, *heartbeat_args(beats))
            for sql, rows in _runs(statements):
                await con.executemany(sql, rows)
            tps = list(next_offsets)
            await con.execute(UPSERT_POSITIONS, self.name, [tp.topic for tp in tps],
                              [tp.partition for tp in tps], [next_offsets[tp] for tp in tps])
        self.fence.believed.update(next_offsets)

    async def _check_positions(self, con, next_offsets: dict[TopicPartition, int]) -> None:
        """Lock the positions about to be written and check they are what this projector last
        read or wrote (a partition it has not seen yet is not checked)."""
        known = self.fence.known(next_offsets)
        if not known:
            return
        rows = await con.fetch(LOCK_POSITIONS, self.name, [tp.topic for tp in known],
                               [tp.partition for tp in known])
        self.fence.check(known, {TopicPartition(r["topic"], r["partition"]): r["next_offset"]
                                 for r in rows})


# -- colour-mixing campaigns --------------------------------------------------------------------

def _ts(micros: int) -> datetime:
    return datetime.fromtimestamp(micros / 1e6, UTC)


def _runs(statements: list[tuple[str, tuple]]):
    """Consecutive statements with the same SQL, as (sql, [args, ...]): order kept, fewer trips."""
    out: list[tuple[str, list]] = []
    for sql, args in statements:
        if out and out[-1][0] == sql:
            out[-1][1].append(args)
        else:
            out.append((sql, [args]))
    return out


_EXPERIMENT_REQUESTED = """
INSERT INTO experiments (experiment_id, status, target_hex, target_lab, dyes, budget_wells,
                         batch_size, tolerance_de, requested_by, requested_at, last_event_id)
VALUES ($1, 'running', $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (experiment_id) DO NOTHING
"""
_EXPERIMENT_ENDED = """
INSERT INTO experiments (experiment_id, status, reason, wells_used, best_well, best_volumes,
                         best_de, finished_at, last_event_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (experiment_id) DO UPDATE SET
    status = EXCLUDED.status, reason = EXCLUDED.reason, wells_used = EXCLUDED.wells_used,
    best_well = EXCLUDED.best_well, best_volumes = EXCLUDED.best_volumes,
    best_de = EXCLUDED.best_de, finished_at = EXCLUDED.finished_at,
    last_event_id = EXCLUDED.last_event_id
"""
_RECIPES_PROPOSED = """
UPDATE experiments SET iterations = GREATEST(iterations, $2 + 1) WHERE experiment_id = $1
"""
_WELL_PROPOSED = """
INSERT INTO wells (experiment_id, well, iteration, volumes, water_ul, proposed_at)
SELECT $1, r.well, $2, r.volumes, r.water_ul, $4
FROM jsonb_to_recordset($3::jsonb) AS r(well text, volumes jsonb, water_ul float8)
ON CONFLICT (experiment_id, well) DO UPDATE SET
    iteration = EXCLUDED.iteration, volumes = EXCLUDED.volumes, water_ul = EXCLUDED.water_ul,
    proposed_at = EXCLUDED.proposed_at
"""
_WELL_DISPENSED = """
INSERT INTO wells (experiment_id, well, run_id, dispensed, dispensed_at)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (experiment_id, well) DO UPDATE SET
    run_id = EXCLUDED.run_id, dispensed = EXCLUDED.dispensed, dispensed_at = EXCLUDED.dispensed_at
"""
_WELL_MEASURED = """
INSERT INTO wells (experiment_id, well, rgb, lab, instrument_id, measured_at)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (experiment_id, well) DO UPDATE SET
    rgb = EXCLUDED.rgb, lab = EXCLUDED.lab, instrument_id = EXCLUDED.instrument_id,
    measured_at = EXCLUDED.measured_at
"""
_WELL_SCORED = """
INSERT INTO wells (experiment_id, well, delta_e, scored_at) VALUES ($1, $2, $3, $4)
ON CONFLICT (experiment_id, well) DO UPDATE SET
    delta_e = EXCLUDED.delta_e, scored_at = EXCLUDED.scored_at
"""
_RUN_REQUESTED = """
INSERT INTO robot_runs (run_id, experiment_id, iteration, status, protocol_hash, requested_at)
VALUES ($1, $2, $3, 'requested', $4, $5)
ON CONFLICT (run_id) DO UPDATE SET protocol_hash = EXCLUDED.protocol_hash,
    requested_at = EXCLUDED.requested_at
"""
_RUN_STARTED = """
INSERT INTO robot_runs (run_id, experiment_id, iteration, status, mode, started_at)
VALUES ($1, $2, $3, 'running', $4, $5)
ON CONFLICT (run_id) DO UPDATE SET mode = EXCLUDED.mode, started_at = EXCLUDED.started_at,
    status = CASE WHEN robot_runs.status = 'requested' THEN 'running' ELSE robot_runs.status END
"""
_RUN_ENDED = """
INSERT INTO robot_runs (run_id, experiment_id, iteration, status, commands, wells, error,
                        finished_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (run_id) DO UPDATE SET status = EXCLUDED.status, commands = EXCLUDED.commands,
    wells = EXCLUDED.wells, error = EXCLUDED.error, finished_at = EXCLUDED.finished_at
"""
_COMMAND = """
INSERT INTO robot_commands (run_id, index, command_id, command_key, command_type, status, params,
                            result, error, created_at, started_at, completed_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (run_id, index) DO UPDATE SET command_id = EXCLUDED.command_id,
    command_key = EXCLUDED.command_key, status = EXCLUDED.status, params = EXCLUDED.params,
    result = EXCLUDED.result, error = EXCLUDED.error, created_at = EXCLUDED.created_at,
    started_at = EXCLUDED.started_at, completed_at = EXCLUDED.completed_at
"""


def _ended(status: str):
    def row(r: dict) -> list[tuple[str, tuple]]:
        volumes = r.get("best_volumes")
        return [(_EXPERIMENT_ENDED, (
            r["experiment_id"], status, r["reason"], r.get("wells_used"), r.get("best_well"),
            None if volumes is None else json.dumps(volumes), r.get("best_de"),
            _ts(r["occurred_at"]), r["event_id"]))]
    return row


CAMPAIGN_SQL = {
    m.ExperimentRequested.TYPE: lambda r: [(_EXPERIMENT_REQUESTED, (
        r["experiment_id"], r["target_hex"], r["target_lab"], r["dyes"], r["budget_wells"],
        r["batch_size"], r["tolerance_de"], r["requested_by"], _ts(r["occurred_at"]),
        r["event_id"]))],
    m.ExperimentRejected.TYPE: _ended("rejected"),
    m.ExperimentCompleted.TYPE: _ended("completed"),
    m.ExperimentFailed.TYPE: _ended("failed"),
    m.ExperimentCancelled.TYPE: _ended("cancelled"),
    m.RecipesProposed.TYPE: lambda r: [
        (_RECIPES_PROPOSED, (r["experiment_id"], r["iteration"])),
        (_WELL_PROPOSED, (r["experiment_id"], r["iteration"], json.dumps(r["recipes"]),
                          _ts(r["occurred_at"])))],
    m.WellDispensed.TYPE: lambda r: [(_WELL_DISPENSED, (
        r["experiment_id"], r["well"], r["run_id"], json.dumps(r["volumes"]),
        _ts(r["occurred_at"])))],
    m.WellColourMeasured.TYPE: lambda r: [(_WELL_MEASURED, (
        r["experiment_id"], r["well"], r["rgb"], r["lab"], r["instrument_id"],
        _ts(r["occurred_at"])))],
    m.WellScored.TYPE: lambda r: [(_WELL_SCORED, (
        r["experiment_id"], r["well"], r["delta_e"], _ts(r["occurred_at"])))],
    m.RobotRunRequested.TYPE: lambda r: [(_RUN_REQUESTED, (
        r["run_id"], r["experiment_id"], r["iteration"], r["protocol_hash"],
        _ts(r["occurred_at"])))],
    m.RobotRunStarted.TYPE: lambda r: [(_RUN_STARTED, (
        r["run_id"], r["experiment_id"], r["iteration"], r["mode"], _ts(r["occurred_at"])))],
    m.RobotRunFinished.TYPE: lambda r: [(_RUN_ENDED, (
        r["run_id"], r["experiment_id"], r["iteration"], "succeeded", r["commands"], r["wells"],
        None, _ts(r["occurred_at"])))],
    m.RobotRunFailed.TYPE: lambda r: [(_RUN_ENDED, (
        r["run_id"], r["experiment_id"], r["iteration"], "failed", None, None, r["error"],
        _ts(r["occurred_at"])))],
    m.RobotCommandExecuted.TYPE: lambda r: [(_COMMAND, (
        r["run_id"], r["index"], r["command_id"], r["command_key"], r["command_type"],
        r["status"], r["params_json"], r["result_json"], r["error_json"], r["created_at"],
        r["started_at"], r["completed_at"]))],
}
