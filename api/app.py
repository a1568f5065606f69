"""The read-only FastAPI app. PostgreSQL is read with the SELECT-only role; Mongo for summaries
(pymongo's native asyncio client). The API talks to no broker: Kafka is the workers' business.

Its OpenAPI is a contract, checked by schemathesis (tests/integration/test_api_contract.py):
every error answer has the one `Error` body of api/errors.py, every paginated route reads and
writes its cursor through one `cursor.Key`, and no input gives a 500.

Every route but `/health/*`, `/metrics` and the OpenAPI documents needs a bearer token, checked
by the kernel's `http_auth.Guard` (as the command gateway's routes are): 401 without one or with
a bad one, 403 when the token's roles grant none of the route's permissions. Each route names
its permissions once, in its guard, and the OpenAPI document declares them
(`x-labbus-permissions`) with the 401/403 answers:

- `READ_ALL` (`read:all`): devices, their measurements, alerts. Instrument data is the lab's,
  not one user's: readings of a device may belong to anyone's work (a testing lab's customer
  samples as well as a colour campaign), so it is for the roles that read everything.
- `READ_ALL` too: the testing lab's service requests, executions, non-conformances, reports
  and protocol templates (api/testing.py): a customer's order and its results are the lab's
  records, not one user's.
- `READ_OWN` (`read:own` or `read:all`): experiments (with their wells, plate, convergence and
  robot runs' commands) and device commands. A caller with `read:all` sees all of them; one with
  only `read:own` sees those they started: experiments whose `requested_by`, commands whose
  `issued_by`, is the token's subject (`identity.may_read`). Lists leave the others out; asking
  for another's by id answers **404**, the answer for an id that does not exist, rather than
  403: a 403 would tell a student which ids exist (other students' campaigns), a 404 tells
  nothing.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Literal

import asyncpg
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BeforeValidator
from pymongo import AsyncMongoClient, MongoClient

from labbus.api import cursor, errors, models, series
from labbus.events import labware
from labbus.events.config import Config
from labbus.events.db import connect_pool
from labbus.events.http_auth import Guard, document
from labbus.events.identity import Principal, may_read
from labbus.events.model import CommandProgress
from labbus.events.tokens import TokenVerifier

REQUESTS = Counter("labbus_api_requests_total", "API requests", ["route", "status"])
LATENCY = Histogram("labbus_api_request_seconds", "API request latency", ["route"])


_EARLIEST, _LATEST = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)


def _utc(value: datetime | None) -> datetime | None:
    """In UTC (naive means UTC); times beyond the calendar in UTC become its ends."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+05:00
        return _EARLIEST if value.year == 1 else _LATEST


_RFC3339 = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
                      r"(\.[0-9]+)?([Zz]|([+-])([0-9]{2}):([0-9]{2}))")


def _rfc3339(value):
    """An RFC 3339 date-time (what OpenAPI's `format: date-time` means), as an aware datetime
    in UTC. The offset is required. What Python cannot hold is brought inside its calendar: a
    leap second (:60) reads as :59, year 0 as the earliest time."""
    if not isinstance(value, str):
        return value
    m = _RFC3339.fullmatch(value)
    if m is None:
        raise ValueError("expected an RFC 3339 date-time with an offset, "
                         "e.g. 2026-03-01T12:00:00Z or 2026-03-01T13:00:00+01:00")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    micro = int((m[7][1:] + "000000")[:6]) if m[7] else 0
    if m[9]:
        if int(m[10]) > 23 or int(m[11]) > 59:
            raise ValueError(f"offset {m[8]} out of range")
        delta = timedelta(hours=int(m[10]), minutes=int(m[11]))
        tz = timezone(delta if m[9] == "+" else -delta)
    else:
        tz = UTC
    parsed = datetime(max(year, 1), month, day, hour, minute, min(second, 59), micro, tzinfo=tz)
    return _EARLIEST if year == 0 else _utc(parsed)


async def _known_device(pg: asyncpg.Pool, device_id: str) -> bool:
    """Registered, or with readings (a reading may arrive before its device's registration)."""
    return not _unstorable(device_id) and bool(await pg.fetchval(
        "SELECT 1 FROM devices WHERE device_id = $1 UNION ALL "
        "SELECT 1 FROM measurements WHERE device_id = $1 LIMIT 1", device_id))


def _unstorable(value: str | None) -> bool:
    """PostgreSQL text cannot hold NUL: no stored id or value contains one."""
    return value is not None and "\x00" in value


# One cursor shape per paginated route (api/cursor.py).
DEVICES_KEY = cursor.Key.of(device_id=str)
MEASUREMENTS_KEY = cursor.Key.of(measured_at=datetime, measurement_id=uuid.UUID)
EXPERIMENTS_KEY = cursor.Key.of(experiment_id=str)
COMMANDS_KEY = cursor.Key.of(index=int)
DEVICE_COMMANDS_KEY = cursor.Key.of(first_at=datetime, command_id=str)
ALERTS_KEY = cursor.Key.of(detected_at=datetime, alert_id=uuid.UUID)
AUDIT_KEY = cursor.Key.of(at=datetime, event_id=uuid.UUID)

Limit = Annotated[int, Query(ge=1, le=1000, description="Items per page.")]
Cursor = Annotated[str | None, Query(
    alias="cursor", max_length=cursor.MAX_LENGTH, pattern=cursor.PATTERN,
    description="The `next_cursor` of the previous page, unchanged (absent or empty: the first "
                "page). A cursor this route did not issue gives 400.")]
DeviceId = Annotated[str, Path(description="A device id.")]
ExperimentId = Annotated[str, Path(description="An experiment id.")]
RunId = Annotated[str, Path(description="A robot run id.")]
CommandId = Annotated[str, Path(description="A command id.")]

# What each route needs (see the module's docstring).
READ_ALL = Guard("read:all")
READ_OWN = Guard("read:own", "read:all")
ReadsAll = Annotated[Principal, Depends(READ_ALL)]
ReadsOwn = Annotated[Principal, Depends(READ_OWN)]
ReadsAudit = Annotated[Principal, Depends(Guard("audit:read"))]


def _owner(principal: Principal) -> str | None:
    """Whose experiments and commands a caller may list: None = everyone's (read:all), else
    the caller's own (read:own)."""
    return None if principal.may("read:all") else principal.user_id


# The SVG routes keep response_class=Response (no media type of its own), so that their error
# answers are documented as JSON; their 200 is declared here.
SVG = {200: {"description": "An SVG image.",
             "content": {"image/svg+xml": {"schema": {"type": "string"}}}}}


def _links(source: str, **targets: dict[str, str]) -> dict:
    """OpenAPI links of a 200 answer: the operations its body gives ids to, e.g.
    `get_device={"device_id": "items/0/device_id"}` (schemathesis follows them)."""
    return {200: {"links": {
        f"{source}_to_{operation}": {
            "operationId": operation,
            "parameters": {name: f"$response.body#/{pointer}" for name, pointer in params.items()}}
        for operation, params in targets.items()}}}


_FIRST_DEVICE = {"device_id": "items/0/device_id"}
_FIRST_COMMAND = {"command_id": "items/0/command_id"}
_FIRST_EXPERIMENT = {"experiment_id": "items/0/experiment_id"}
_THIS_EXPERIMENT = {"experiment_id": "experiment_id"}


def _page(rows: list, limit: int, key: cursor.Key, item=dict) -> dict:
    """A page of `limit` items from `rows` (one more fetched tells whether a next page exists),
    with the cursor of its last row."""
    page = rows[:limit]
    return {"items": [item(r) for r in page],
            "next_cursor": key.encode(page[-1]) if len(rows) > limit else None}


_STATE = ("status", "status_reason", "status_at", "last_heartbeat_at")


def _device(row: asyncpg.Record) -> dict:
    """A device_overview row (registered) or a devices row (perhaps known from status only)."""
    body = {"device_id": row["device_id"]}
    if row["registered_at"] is not None:
        body.update({"device_type": row["device_type"], "model": row["model"],
                     "location": row["location"], "metrics": list(row["metrics"]),
                     "attributes": row["attributes"], "registered_at": row["registered_at"],
                     "specs": row["specs"], "spec_version": row["spec_version"]})
    body.update({name: row[name] for name in _STATE})
    return body


_COMMAND_COLUMNS = """command_id, device_id, idempotency_key, command_type, payload, issued_by,
    issued_at, expires_at, status, status_at, progress, remaining_s, intermediate, progress_at,
    result, error, reason_code, reason, updated_at"""


class Observe:
    """Counts and times every request (`labbus_api_requests_total`, `_request_seconds`) by
    route. A plain ASGI middleware: Starlette's `BaseHTTPMiddleware` (`@app.middleware`) cost
    about a tenth of a bucketed query's time in the query benchmark."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def observed_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except Exception:
            REQUESTS.labels(_scope_route(scope), "500").inc()
            raise
        LATENCY.labels(_scope_route(scope)).observe(time.perf_counter() - started)
        REQUESTS.labels(_scope_route(scope), str(status)).inc()


def create_app(cfg: Config, *, auth: bool = True) -> FastAPI:
    """The app. `auth=False` builds it without the token check (every caller may read
    everything): for the benchmark that measures what the check costs, never for serving.
    `labbus api` always builds it with the check, and no setting turns it off."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.verifier = TokenVerifier.from_config(cfg) if auth else None
        app.state.pg = await connect_pool(
            cfg.postgres_api_dsn, "LABBUS_POSTGRES_API_DSN",
            init=lambda con: con.set_type_codec("jsonb", encoder=str, decoder=_json_loads,
                                                schema="pg_catalog"))
        app.state.mongo = AsyncMongoClient(cfg.mongo_url, serverSelectionTimeoutMS=3000,
                                           tz_aware=True)
        # the artifact store (reports) is synchronous: read in a thread (api/testing.py)
        app.state.mongo_sync = MongoClient(cfg.mongo_url, serverSelectionTimeoutMS=3000,
                                           tz_aware=True)
        yield
        await app.state.pg.close()
        await app.state.mongo.close()
        app.state.mongo_sync.close()
        if app.state.verifier is not None:
            await app.state.verifier.aclose()

    app = FastAPI(title="labbus query API", version="0.1.0", lifespan=lifespan,
                  description="Read-only access to labbus read models: devices and their "
                              "validated measurements, colour-mixing experiments and their "
                              "plates, test service requests with their executions, "
                              "non-conformances and reports, protocol templates. "
                              "Cursor-paginated; times are UTC.")

    app.add_middleware(Observe)

    errors.install(app)

    @app.get("/devices", summary="List registered devices, with their status",
             operation_id="list_devices", response_model=models.DevicePage,
             responses=_links("list_devices", get_device=_FIRST_DEVICE,
                              device_measurements=_FIRST_DEVICE)
             | errors.responses(400, 422, 503))
    async def list_devices(
        request: Request,
        _: ReadsAll,
        type_: Annotated[str | None, Query(
            alias="type", description="Only devices of this type, e.g. ph-meter.")] = None,
        device_type: Annotated[str | None, Query(
            deprecated=True, description="The former name of `type`.")] = None,
        status: Annotated[models.DeviceStatus | None, Query(
            description="Only devices whose current status is this one.")] = None,
        limit: Limit = 100,
        cursor_: Cursor = None,
    ) -> dict:
        after = DEVICES_KEY.decode(cursor_)[0] if cursor_ else ""
        if type_ is not None and device_type is not None and type_ != device_type:
            raise HTTPException(400, "type and device_type name the same filter; give one")
        kind = type_ if type_ is not None else device_type
        if _unstorable(kind):
            return {"items": [], "next_cursor": None}
        rows = await request.app.state.pg.fetch(
            """SELECT * FROM device_overview
               WHERE device_id > $1 AND ($2::text IS NULL OR device_type = $2)
                 AND ($3::text IS NULL OR status = $3)
               ORDER BY device_id LIMIT $4""", after, kind, status, limit + 1)
        return _page(rows, limit, DEVICES_KEY, _device)

    @app.get("/devices/{device_id}",
             summary="One device: registration, status and its history, latest readings",
             operation_id="get_device", response_model=models.DeviceDetail,
             response_model_exclude_unset=True, responses=errors.responses(404, 422, 503))
    async def get_device(request: Request, device_id: DeviceId, _: ReadsAll) -> dict:
        if _unstorable(device_id):
            raise HTTPException(404, f"no device {device_id!r}")
        pg = request.app.state.pg
        row = await pg.fetchrow("SELECT * FROM devices WHERE device_id = $1", device_id)
        summary = await request.app.state.mongo[cfg.mongo_db].devices.find_one(
            {"_id": device_id}, {"latest": 1, "counts": 1, "total_measurements": 1})
        if row is None and summary is None:
            raise HTTPException(404, f"no device {device_id!r}")
        body = _device(row) if row else {"device_id": device_id}
        summary = summary or {}
        body.update({"latest": summary.get("latest", {}), "counts": summary.get("counts", {}),
                     "total_measurements": summary.get("total_measurements", 0)})
        history = await pg.fetch(
            """SELECT event_id, status, reason, occurred_at, source FROM device_status_history
               WHERE device_id = $1 ORDER BY source_offset DESC, event_id LIMIT 100""",
            device_id) if row is not None and row["status"] is not None else []
        body["status_history"] = [dict(r) for r in history]
        return body

    @app.get("/devices/{device_id}/measurements",
             summary="Validated measurements of a device, raw or bucketed",
             description="Without `bucket`: the raw readings, cursor-paginated in "
                         "(measured_at, measurement_id) order. With `bucket` (and `metric`, "
                         "`from`, `to`): one aggregate per bucket, computed in PostgreSQL; "
                         "buckets are aligned to the Unix epoch (1m buckets start on whole "
                         "minutes, 1d at UTC midnight), every bucket from the one holding "
                         "`from` to the one holding the last instant before `to` is answered, "
                         "an empty one with count 0 and value null (0 for agg=count); at most "
                         f"{series.MAX_BUCKETS:,} buckets per request.",
             operation_id="device_measurements",
             response_model=models.MeasurementPage | models.BucketSeries,
             responses=errors.responses(400, 404, 422, 503))
    async def device_measurements(
        request: Request,
        device_id: DeviceId,
        _: ReadsAll,
        metric: str | None = None,
        from_: Annotated[datetime | None, BeforeValidator(_rfc3339), Query(
            alias="from", description="Inclusive; RFC 3339, e.g. 2026-03-01T12:00:00Z.")] = None,
        to: Annotated[datetime | None, BeforeValidator(_rfc3339), Query(
            description="Exclusive; RFC 3339, e.g. 2026-03-01T13:00:00+01:00.")] = None,
        limit: Limit = 100,
        cursor_: Cursor = None,
        bucket: Annotated[str | None, Query(
            pattern=series.BUCKET_PATTERN, max_length=6,
            description="Bucket width: a whole number and s, m, h or d (30s, 1m, 1h, 1d). "
                        "Needs `metric`, `from` and `to`; `limit` and `cursor` do not apply."
        )] = None,
        agg: Annotated[Literal["avg", "min", "max", "count", "p95"] | None, Query(
            description="Aggregate per bucket (with `bucket`; default avg): p95 is the 95th "
                        "percentile, interpolated (PostgreSQL percentile_cont).")] = None,
    ) -> dict:
        from_, to = _utc(from_), _utc(to)
        if from_ and to and from_ > to:
            raise HTTPException(400, "'from' must not be after 'to'")
        grid = None
        if bucket is not None:
            missing = [n for n, v in (("metric", metric), ("from", from_), ("to", to))
                       if v is None]
            if missing:
                raise HTTPException(400, f"bucket={bucket} needs {' and '.join(missing)}: a "
                                         "bucketed series is one metric over from..to")
            if cursor_:
                raise HTTPException(400, "bucketed series are not paginated: leave out cursor")
            try:
                grid = series.grid(from_, to, series.parse_bucket(bucket))
            except series.SeriesError as exc:
                raise HTTPException(400, str(exc)) from None
        elif agg is not None:
            raise HTTPException(400, f"agg={agg} needs bucket (e.g. bucket=1m)")
        pg = request.app.state.pg
        if grid is not None:
            agg = agg or "avg"
            storable = not (_unstorable(device_id) or _unstorable(metric))
            rows = [] if not storable or grid.count == 0 else await pg.fetch(
                series.QUERIES[agg], device_id, metric, from_, to, series.micros(grid.stride))
            if not rows and not await _known_device(pg, device_id):  # rows prove the device
                raise HTTPException(404, f"no device {device_id!r}")
            # written here rather than through the response model: the hot path of time-series
            # reads (the body is the BucketSeries the route declares; tests check it)
            return Response(series.to_json(metric, bucket, agg, grid, rows),
                            media_type="application/json")
        if not await _known_device(pg, device_id):
            raise HTTPException(404, f"no device {device_id!r}")
        after_t, after_id = _EARLIEST, uuid.UUID(int=0)
        if cursor_:
            after_t, after_id = MEASUREMENTS_KEY.decode(cursor_)
        if _unstorable(metric):
            return {"items": [], "next_cursor": None}
        rows = await pg.fetch(
            """SELECT measurement_id, metric, value, unit, measured_at FROM measurements
               WHERE device_id = $1 AND ($2::text IS NULL OR metric = $2)
                 AND ($3::timestamptz IS NULL OR measured_at >= $3)
                 AND ($4::timestamptz IS NULL OR measured_at < $4)
                 AND (measured_at, measurement_id) > ($5, $6)
               ORDER BY measured_at, measurement_id LIMIT $7""",
            device_id, metric, from_, to, after_t, after_id, limit + 1)
        return _page(rows, limit, MEASUREMENTS_KEY)

    @app.get("/experiments", summary="List colour-mixing experiments",
             operation_id="list_experiments", response_model=models.ExperimentPage,
             responses=_links("list_experiments", get_experiment=_FIRST_EXPERIMENT,
                              experiment_wells=_FIRST_EXPERIMENT,
                              experiment_plate=_FIRST_EXPERIMENT,
                              experiment_convergence=_FIRST_EXPERIMENT)
             | errors.responses(400, 422, 503))
    async def list_experiments(
        request: Request,
        principal: ReadsOwn,
        status: str | None = None,
        limit: Limit = 100,
        cursor_: Cursor = None,
    ) -> dict:
        after = EXPERIMENTS_KEY.decode(cursor_)[0] if cursor_ else ""
        if _unstorable(status):
            return {"items": [], "next_cursor": None}
        rows = await request.app.state.pg.fetch(
            f"""SELECT {_EXPERIMENT_COLUMNS} FROM experiments e
                WHERE experiment_id > $1 AND ($2::text IS NULL OR status = $2)
                  AND ($4::text IS NULL OR requested_by = $4)
                ORDER BY experiment_id LIMIT $3""", after, status, limit + 1,
            _owner(principal))
        return _page(rows, limit, EXPERIMENTS_KEY)

    async def _experiment(pg, experiment_id: str, principal: Principal) -> dict:
        """The experiment, if the caller may read it; 404 alike when it does not exist and when
        it is another's (see the module's docstring)."""
        if _unstorable(experiment_id):
            raise HTTPException(404, f"no experiment {experiment_id!r}")
        row = await pg.fetchrow(f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments e "
                                "WHERE experiment_id = $1", experiment_id)
        if row is None or not may_read(principal.roles, principal.user_id, row["requested_by"]):
            raise HTTPException(404, f"no experiment {experiment_id!r}")
        return dict(row)

    @app.get("/experiments/{experiment_id}", summary="One experiment with its robot runs",
             operation_id="get_experiment", response_model=models.ExperimentDetail,
             responses=_links("get_experiment", run_commands={"run_id": "runs/0/run_id"},
                              experiment_wells=_THIS_EXPERIMENT)
             | errors.responses(404, 422, 503))
    async def get_experiment(request: Request, experiment_id: ExperimentId,
                             principal: ReadsOwn) -> dict:
        pg = request.app.state.pg
        body = await _experiment(pg, experiment_id, principal)
        runs = await pg.fetch(
            """SELECT run_id, iteration, status, protocol_hash, mode, commands, wells, error,
                      requested_at, started_at, finished_at
               FROM robot_runs WHERE experiment_id = $1 ORDER BY iteration""", experiment_id)
        body["runs"] = [dict(r) for r in runs]
        body["summary"] = await _mongo_summary(request.app.state.mongo[cfg.mongo_db],
                                               experiment_id)
        return body

    @app.get("/experiments/{experiment_id}/wells", summary="Every well of an experiment's plate",
             operation_id="experiment_wells", response_model=models.WellList,
             responses=errors.responses(404, 422, 503))
    async def experiment_wells(request: Request, experiment_id: ExperimentId,
                               principal: ReadsOwn) -> dict:
        pg = request.app.state.pg
        await _experiment(pg, experiment_id, principal)
        return {"items": await _wells(pg, experiment_id)}

    @app.get("/experiments/{experiment_id}/plate.svg", summary="The plate as measured, as SVG",
             operation_id="experiment_plate", response_class=Response,
             responses=SVG | errors.responses(404, 422, 503))
    async def experiment_plate(request: Request, experiment_id: ExperimentId,
                               principal: ReadsOwn) -> Response:
        pg = request.app.state.pg
        experiment = await _experiment(pg, experiment_id, principal)
        svg = plate_svg(experiment, await _wells(pg, experiment_id))
        return Response(svg, media_type="image/svg+xml")

    @app.get("/experiments/{experiment_id}/convergence.svg",
             summary="Best ΔE00 of each iteration, with the tolerance, as an SVG line chart",
             operation_id="experiment_convergence", response_class=Response,
             responses=SVG | errors.responses(404, 422, 503))
    async def experiment_convergence(request: Request, experiment_id: ExperimentId,
                                     principal: ReadsOwn) -> Response:
        pg = request.app.state.pg
        experiment = await _experiment(pg, experiment_id, principal)
        rows = await pg.fetch(
            """SELECT iteration, min(delta_e) AS best_de, count(*)::int AS wells FROM wells
               WHERE experiment_id = $1 AND iteration IS NOT NULL AND delta_e IS NOT NULL
               GROUP BY iteration ORDER BY iteration""", experiment_id)
        return Response(convergence_svg(experiment, [dict(r) for r in rows]),
                        media_type="image/svg+xml")

    @app.get("/robot-runs/{run_id}/commands",
             summary="The engine commands of a robot run, in execution order",
             operation_id="run_commands", response_model=models.CommandPage,
             responses=errors.responses(400, 404, 422, 503))
    async def run_commands(
        request: Request,
        run_id: RunId,
        principal: ReadsOwn,
        limit: Limit = 100,
        cursor_: Cursor = None,
    ) -> dict:
        after = COMMANDS_KEY.decode(cursor_)[0] if cursor_ else -1
        pg = request.app.state.pg
        owner = _owner(principal)
        if _unstorable(run_id) or (owner is not None and not await pg.fetchval(
                """SELECT 1 FROM robot_runs r JOIN experiments e USING (experiment_id)
                   WHERE r.run_id = $1 AND e.requested_by = $2""", run_id, owner)):
            raise HTTPException(404, f"no robot run {run_id!r}")  # or another's: see the top
        if not await pg.fetchval(
                "SELECT 1 FROM robot_runs WHERE run_id = $1 UNION ALL "
                "SELECT 1 FROM robot_commands WHERE run_id = $1 LIMIT 1", run_id):
            raise HTTPException(404, f"no robot run {run_id!r}")
        rows = await pg.fetch(
            """SELECT index, command_id, command_key, command_type, status, params, result, error,
                      created_at, started_at, completed_at
               FROM robot_commands WHERE run_id = $1 AND index > $2
               ORDER BY index LIMIT $3""", run_id, min(max(after, -1), 2**31 - 1), limit + 1)
        return _page(rows, limit, COMMANDS_KEY)

    @app.get("/commands", summary="Commands to devices, newest first",
             description="Ordered by the time of each command's first event (its issue, once "
                         "known) and id, newest first; cursor-paginated. `status` is the "
                         "command's current status (see DeviceCommand).",
             operation_id="list_commands", response_model=models.DeviceCommandPage,
             responses=_links("list_commands", get_command=_FIRST_COMMAND)
             | errors.responses(400, 422, 503))
    async def list_commands(
        request: Request,
        principal: ReadsOwn,
        device: Annotated[str | None, Query(description="Only this device's commands.")] = None,
        status: Annotated[models.CommandStatus | None, Query(
            description="Only commands whose current status is this one.")] = None,
        limit: Limit = 100,
        cursor_: Cursor = None,
    ) -> dict:
        before_t, before_id = DEVICE_COMMANDS_KEY.decode(cursor_) if cursor_ else (None, None)
        if _unstorable(device):
            return {"items": [], "next_cursor": None}
        rows = await request.app.state.pg.fetch(
            f"""SELECT {_COMMAND_COLUMNS}, first_at FROM commands
                WHERE ($1::text IS NULL OR device_id = $1) AND ($2::text IS NULL OR status = $2)
                  AND ($3::timestamptz IS NULL OR (first_at, command_id) < ($3, $4))
                  AND ($6::text IS NULL OR issued_by = $6)
                ORDER BY first_at DESC, command_id DESC LIMIT $5""",
            device, status, before_t, before_id, limit + 1, _owner(principal))
        return _page(rows, limit, DEVICE_COMMANDS_KEY, _command)

    @app.get("/commands/{command_id}", summary="One command with its full status history",
             operation_id="get_command", response_model=models.DeviceCommandDetail,
             responses=_links("get_command", get_device={"device_id": "device_id"})
             | errors.responses(404, 422, 503))
    async def get_command(request: Request, command_id: CommandId, principal: ReadsOwn) -> dict:
        pg = request.app.state.pg
        row = None if _unstorable(command_id) else await pg.fetchrow(
            f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE command_id = $1", command_id)
        if row is None or not may_read(principal.roles, principal.user_id, row["issued_by"]):
            raise HTTPException(404, f"no command {command_id!r}")
        body = _command(row)
        body["history"] = [dict(r) for r in await pg.fetch(
            """SELECT event_id, event_type, status, occurred_at, source, detail
               FROM command_events WHERE command_id = $1
               ORDER BY occurred_at, status_rank, event_type = $2, event_id""",
            command_id, CommandProgress.TYPE)]
        return body

    @app.get("/alerts", summary="Anomalies flagged in devices' readings, oldest first",
             description="Ordered by detection time and id, oldest first, from `since` "
                         "(inclusive); cursor-paginated.",
             operation_id="list_alerts", response_model=models.AlertPage,
             responses=_links("list_alerts", get_device=_FIRST_DEVICE)
             | errors.responses(400, 422, 503))
    async def list_alerts(
        request: Request,
        _: ReadsAll,
        since: Annotated[datetime | None, BeforeValidator(_rfc3339), Query(
            description="Alerts detected at or after this time; RFC 3339, e.g. "
                        "2026-03-01T12:00:00Z.")] = None,
        device: Annotated[str | None, Query(description="Only this device's alerts.")] = None,
        limit: Limit = 100,
        cursor_: Cursor = None,
    ) -> dict:
        after_t, after_id = _EARLIEST, uuid.UUID(int=0)
        if cursor_:
            after_t, after_id = ALERTS_KEY.decode(cursor_)
        if _unstorable(device):
            return {"items": [], "next_cursor": None}
        rows = await request.app.state.pg.fetch(
            """SELECT alert_id, device_id, metric, value, unit, measured_at, measurement_id, rule,
                      score, threshold, window_mean, window_stddev, window_count, detected_at
               FROM alerts
               WHERE ($1::text IS NULL OR device_id = $1) AND detected_at >= $2
                 AND (detected_at, alert_id) > ($3, $4)
               ORDER BY detected_at, alert_id LIMIT $5""",
            device, _utc(since) or _EARLIEST, after_t, after_id, limit + 1)
        return _page(rows, limit, ALERTS_KEY)

    @app.get("/audit", summary="The activity log: who asked for what, when, from where, and "
                                "the outcome",
             description="Every command event an entry point published for a verified caller "
                         "(starting or cancelling a campaign, a device command), every request "
                         "refused for a missing permission, and the decision on each; newest "
                         "first, cursor-paginated. Admins only (`audit:read`).",
             operation_id="list_audit", response_model=models.AuditPage,
             responses=errors.responses(400, 422, 503))
    async def list_audit(
        request: Request,
        _: ReadsAudit,
        user: Annotated[str | None, Query(description="Only this user's (a user id).")] = None,
        action: Annotated[str | None, Query(
            description="Only this action, e.g. experiment:start, command:send.")] = None,
        since: Annotated[datetime | None, BeforeValidator(_rfc3339), Query(
            description="At or after this time; RFC 3339, e.g. 2026-03-01T12:00:00Z.")] = None,
        limit: Limit = 100,
        cursor_: Cursor = None,
    ) -> dict:
        before_t, before_id = AUDIT_KEY.decode(cursor_) if cursor_ else (None, None)
        if _unstorable(user) or _unstorable(action):
            return {"items": [], "next_cursor": None}
        rows = await request.app.state.pg.fetch(
            """SELECT event_id, at, user_id, roles, client_ip, user_agent, token_id,
                      action, event_type, subject, outcome, reason, outcome_at
               FROM audit
               WHERE user_id IS NOT NULL AND ($1::text IS NULL OR user_id = $1)
                 AND ($2::text IS NULL OR action = $2) AND at >= $3
                 AND ($4::timestamptz IS NULL OR (at, event_id) < ($4, $5))
               ORDER BY at DESC, event_id DESC LIMIT $6""",
            user, action, _utc(since) or _EARLIEST, before_t, before_id, limit + 1)
        return _page(rows, limit, AUDIT_KEY)

    from labbus.api import testing  # it imports this module's guards and helpers

    testing.register(app, cfg)

    @app.get("/health/live", summary="The process is up", operation_id="live",
             response_model=models.Live)
    async def live() -> dict:
        return {"status": "ok"}

    @app.get("/health/ready", summary="PostgreSQL and MongoDB, the API's read models, answer",
             operation_id="ready", response_model=models.Readiness,
             responses={503: {"model": models.Readiness, "description": "A read model does not "
                                                                 "answer; `checks` says which."}})
    async def ready(request: Request) -> JSONResponse:
        checks = await asyncio.gather(_check_pg(request.app.state.pg),
                                      _check_mongo(request.app.state.mongo))
        body = dict(zip(("postgres", "mongo"), checks, strict=True))
        ok = all(v == "ok" for v in body.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "checks": body},
                            status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    document(app, "Error")
    return app


_EXPERIMENT_COLUMNS = """experiment_id, status, target_hex, target_lab, dyes, budget_wells,
    batch_size, tolerance_de, requested_by, requested_at, iterations,
    COALESCE(wells_used, (SELECT count(*) FROM wells w WHERE w.experiment_id = e.experiment_id
                          AND w.delta_e IS NOT NULL))::int AS wells_used,
    best_well, best_volumes, best_de, reason, finished_at"""


def _well_order(well: str) -> tuple[int, str]:
    """The rulebook's well order (the order wells are allocated); unknown names last."""
    order = labware.well_names()
    return (order.index(well), "") if well in order else (len(order), well)


async def _wells(pg: asyncpg.Pool, experiment_id: str) -> list[dict]:
    rows = await pg.fetch(
        """SELECT well, iteration, volumes, water_ul, run_id, dispensed, rgb, lab, instrument_id,
                  delta_e, proposed_at, dispensed_at, measured_at, scored_at
           FROM wells WHERE experiment_id = $1""", experiment_id)
    items = [dict(r) for r in rows]
    for item in items:
        item["rgb"] = list(item["rgb"]) if item["rgb"] is not None else None
        item["lab"] = list(item["lab"]) if item["lab"] is not None else None
    return sorted(items, key=lambda i: _well_order(i["well"]))


def plate_svg(experiment: dict, wells: list[dict]) -> str:
    """A 96-well plate: each well filled with its measured colour, the best well ringed."""
    from html import escape

    plate, pitch, r, left, top = labware.PLATE, 36, 15, 30, 50
    width, height = left + plate.columns * pitch + 10, top + len(plate.rows) * pitch + 40
    by_well = {w["well"]: w for w in wells}
    target = experiment.get("target_hex")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="#f4f4f4"/>',
             f'<text x="{left}" y="18" font-size="13">{escape(experiment["experiment_id"])} '
             f'({escape(experiment["status"])})</text>']
    if target:
        parts.append(f'<text x="{left}" y="36">target</text>'
                     f'<rect x="{left + 42}" y="26" width="28" height="14" fill="{escape(target)}"'
                     ' stroke="#333"/>')
    if experiment.get("best_de") is not None:
        parts.append(f'<text x="{left + 90}" y="36">best ΔE00 {experiment["best_de"]:.2f}'
                     f'{" in " + escape(best) if (best := experiment.get("best_well")) else ""}'
                     f', {experiment.get("wells_used") or 0} wells</text>')
    for c in range(1, plate.columns + 1):
        parts.append(f'<text x="{left + (c - 1) * pitch + pitch / 2}" y="{top - 4}" '
                     f'text-anchor="middle">{c}</text>')
    for ri, (row, names) in enumerate(zip(plate.rows, labware.plate_rows(plate), strict=True)):
        y = top + ri * pitch + pitch / 2
        parts.append(f'<text x="{left - 14}" y="{y + 4}">{row}</text>')
        for c, name in enumerate(names, start=1):
            x = left + (c - 1) * pitch + pitch / 2
            w = by_well.get(name)
            if w and w.get("rgb"):
                fill = "#" + "".join(f"{v:02x}" for v in w["rgb"])
            elif w:
                fill = "#ffffff"
            else:
                fill = "none"
            ring = 'stroke="#000" stroke-width="3"' if name == experiment.get("best_well") else \
                'stroke="#999" stroke-width="1"'
            title = name
            if w and w.get("delta_e") is not None:
                title += f" ΔE00 {w['delta_e']:.2f} {escape(str(w.get('volumes')))}"
            parts.append(f'<circle cx="{x}" cy="{y}" r="{r}" fill="{fill}" {ring}>'
                         f'<title>{title}</title></circle>')
            if w and w.get("delta_e") is not None:
                dark = w.get("rgb") and sum(w["rgb"]) < 3 * 110
                parts.append(f'<text x="{x}" y="{y + 3}" text-anchor="middle" font-size="9" '
                             f'fill="{"#fff" if dark else "#000"}">{w["delta_e"]:.1f}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def convergence_svg(experiment: dict, points: list[dict]) -> str:
    """Best ΔE00 per iteration as a line chart with the tolerance as a dashed line."""
    from html import escape

    width, height, left, right, top, bottom = 560, 320, 56, 16, 40, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    tolerance = experiment.get("tolerance_de")
    values = [p["best_de"] for p in points] + ([tolerance] if tolerance is not None else [])
    y_max = _nice_ceiling(max(values, default=1.0) * 1.1 or 1.0)
    last_iteration = max((p["iteration"] for p in points), default=0)
    span = max(last_iteration, 1)

    def x(iteration: int) -> float:
        return left + (plot_w * iteration / span if last_iteration else plot_w / 2)

    def y(value: float) -> float:
        return top + plot_h * (1 - value / y_max)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
             f'<text x="{left}" y="18" font-size="13">{escape(experiment["experiment_id"])} '
             f'({escape(experiment["status"])}): best ΔE00 per iteration</text>',
             f'<g class="axes" stroke="#333"><line x1="{left}" y1="{top + plot_h}" '
             f'x2="{left + plot_w}" y2="{top + plot_h}"/><line x1="{left}" y1="{top}" x2="{left}" '
             f'y2="{top + plot_h}"/></g>',
             f'<text x="{left + plot_w / 2}" y="{height - 8}" '
             'text-anchor="middle">iteration</text>',
             f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" '
             f'transform="rotate(-90 14 {top + plot_h / 2})">ΔE00</text>']
    for i in range(5):
        value = y_max * i / 4
        parts.append(f'<line x1="{left - 4}" y1="{y(value):.1f}" x2="{left}" y2="{y(value):.1f}" '
                     f'stroke="#333"/><text class="y-tick" x="{left - 7}" y="{y(value) + 4:.1f}" '
                     f'text-anchor="end">{value:g}</text>')
    step = max(1, -(-(last_iteration + 1) // 20))  # at most ~20 labels
    for iteration in range(0, last_iteration + 1, step):
        parts.append(f'<line x1="{x(iteration):.1f}" y1="{top + plot_h}" x2="{x(iteration):.1f}" '
                     f'y2="{top + plot_h + 4}" stroke="#333"/><text class="x-tick" '
                     f'x="{x(iteration):.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                     f'{iteration}</text>')
    if tolerance is not None:
        parts.append(f'<line class="tolerance" x1="{left}" y1="{y(tolerance):.1f}" '
                     f'x2="{left + plot_w}" y2="{y(tolerance):.1f}" stroke="#c0392b" '
                     f'stroke-dasharray="6 4"/><text x="{left + plot_w - 2}" '
                     f'y="{y(tolerance) - 4:.1f}" text-anchor="end" fill="#c0392b">'
                     f'tolerance {tolerance:g}</text>')
    if points:
        line = " ".join(f"{x(p['iteration']):.1f},{y(p['best_de']):.1f}" for p in points)
        parts.append(f'<polyline class="best" points="{line}" fill="none" stroke="#2c6fbb" '
                     'stroke-width="2"/>')
        for p in points:
            parts.append(f'<circle class="point" cx="{x(p["iteration"]):.1f}" '
                         f'cy="{y(p["best_de"]):.1f}" r="4" fill="#2c6fbb"><title>iteration '
                         f'{p["iteration"]}: best ΔE00 {p["best_de"]:.2f} of {p["wells"]} '
                         f'wells</title></circle>')
    else:
        parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" '
                     f'text-anchor="middle" fill="#666">no scored wells yet</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten that is at least value."""
    import math

    power = 10 ** math.floor(math.log10(value))
    return next(f * power for f in (1, 2, 2.5, 5, 10) if f * power >= value)


async def _mongo_summary(db, experiment_id: str) -> dict | None:
    """Counts from the Mongo experiment document; None when Mongo has none or does not answer."""
    from pymongo.errors import PyMongoError

    try:
        doc = await db.experiments.find_one({"_id": experiment_id},
                                            {"wells": 1, "runs": 1, "best_de": 1})
    except PyMongoError:
        return None
    if doc is None:
        return None
    wells = (doc.get("wells") or {}).values()
    return {"wells": {"proposed": sum("volumes" in w for w in wells),
                      "dispensed": sum("dispensed" in w for w in wells),
                      "measured": sum("rgb" in w for w in wells),
                      "scored": sum("delta_e" in w for w in wells)},
            "best_de": doc.get("best_de"),
            "runs": {run_id: {"status": r.get("status"),
                              "command_types": r.get("command_types", {}),
                              "command_statuses": r.get("command_statuses", {})}
                     for run_id, r in (doc.get("runs") or {}).items()}}


def _command(row: asyncpg.Record) -> dict:
    return {name: value for name, value in row.items() if name != "first_at"}


def _scope_route(scope) -> str:
    return getattr(scope.get("route"), "path", "unmatched")


def _json_loads(text: str):
    import json

    return json.loads(text)


async def _check_pg(pool: asyncpg.Pool) -> str:
    try:
        await asyncio.wait_for(pool.fetchval("SELECT 1"), 2)
        return "ok"
    except Exception as exc:  # any failure means not ready
        return f"failing: {exc!r}"


async def _check_mongo(client: AsyncMongoClient) -> str:
    try:
        await asyncio.wait_for(client.admin.command("ping"), 3)
        return "ok"
    except Exception as exc:  # any failure means not ready
        return f"failing: {exc!r}"
