"""The read-only FastAPI app. PostgreSQL is read with the SELECT-only role; Mongo for summaries."""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated

import asyncpg
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pymongo import MongoClient

from labbus.api import cursor
from labbus.events import labware
from labbus.events.config import Config
from labbus.events.db import connect_pool

REQUESTS = Counter("labbus_api_requests_total", "API requests", ["route", "status"])
LATENCY = Histogram("labbus_api_request_seconds", "API request latency", ["route"])


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _device(row: asyncpg.Record) -> dict:
    return {"device_id": row["device_id"], "device_type": row["device_type"],
            "model": row["model"], "location": row["location"], "metrics": list(row["metrics"]),
            "attributes": row["attributes"], "registered_at": row["registered_at"]}


def create_app(cfg: Config) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.pg = await connect_pool(
            cfg.postgres_api_dsn, "LABBUS_POSTGRES_API_DSN",
            init=lambda con: con.set_type_codec("jsonb", encoder=str, decoder=_json_loads,
                                                schema="pg_catalog"))
        app.state.mongo = MongoClient(cfg.mongo_url, serverSelectionTimeoutMS=3000, tz_aware=True)
        yield
        await app.state.pg.close()
        app.state.mongo.close()

    app = FastAPI(title="labbus query API", version="0.1.0", lifespan=lifespan,
                  description="Read-only access to labbus read models: devices and their "
                              "validated measurements, colour-mixing experiments and their "
                              "plates. Cursor-paginated; times are UTC.")

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            REQUESTS.labels(_route(request), "500").inc()
            raise
        LATENCY.labels(_route(request)).observe(time.perf_counter() - started)
        REQUESTS.labels(_route(request), str(response.status_code)).inc()
        return response

    @app.exception_handler(asyncpg.DataError)
    async def bad_value(request: Request, exc: asyncpg.DataError):
        return JSONResponse({"detail": f"invalid parameter: {exc}"}, status_code=422)

    @app.get("/devices", summary="List devices")
    async def list_devices(
        request: Request,
        device_type: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor_: Annotated[str | None, Query(alias="cursor")] = None,
    ) -> dict:
        after = cursor.decode(cursor_, 1)[0] if cursor_ else ""
        rows = await request.app.state.pg.fetch(
            """SELECT * FROM device_overview
               WHERE device_id > $1 AND ($2::text IS NULL OR device_type = $2)
               ORDER BY device_id LIMIT $3""", str(after), device_type, limit + 1)
        page = rows[:limit]
        nxt = cursor.encode(page[-1]["device_id"]) if len(rows) > limit else None
        return {"items": [_device(r) for r in page], "next_cursor": nxt}

    @app.get("/devices/{device_id}", summary="One device with its latest readings and counts")
    async def get_device(request: Request, device_id: str) -> dict:
        row = await request.app.state.pg.fetchrow(
            "SELECT * FROM device_overview WHERE device_id = $1", device_id)
        summary = await asyncio.to_thread(
            request.app.state.mongo[cfg.mongo_db].devices.find_one, {"_id": device_id},
            {"latest": 1, "counts": 1, "total_measurements": 1})
        if row is None and summary is None:
            raise HTTPException(404, f"no device {device_id!r}")
        body = _device(row) if row else {"device_id": device_id}
        summary = summary or {}
        body.update({"latest": summary.get("latest", {}), "counts": summary.get("counts", {}),
                     "total_measurements": summary.get("total_measurements", 0)})
        return body

    @app.get("/devices/{device_id}/measurements", summary="Validated measurements of a device")
    async def device_measurements(
        request: Request,
        device_id: str,
        metric: str | None = None,
        from_: Annotated[datetime | None, Query(alias="from")] = None,
        to: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor_: Annotated[str | None, Query(alias="cursor")] = None,
    ) -> dict:
        from_, to = _utc(from_), _utc(to)
        if from_ and to and from_ > to:
            raise HTTPException(422, "'from' must not be after 'to'")
        pg = request.app.state.pg
        if not await pg.fetchval("SELECT 1 FROM devices WHERE device_id = $1 UNION ALL "
                                 "SELECT 1 FROM measurements WHERE device_id = $1 LIMIT 1",
                                 device_id):
            raise HTTPException(404, f"no device {device_id!r}")
        after_t, after_id = datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0)
        if cursor_:
            raw_t, raw_id = cursor.decode(cursor_, 2)
            try:
                after_t, after_id = datetime.fromisoformat(raw_t), uuid.UUID(raw_id)
            except (TypeError, ValueError) as exc:
                raise HTTPException(422, f"invalid cursor {cursor_!r}") from exc
        rows = await pg.fetch(
            """SELECT measurement_id, metric, value, unit, measured_at FROM measurements
               WHERE device_id = $1 AND ($2::text IS NULL OR metric = $2)
                 AND ($3::timestamptz IS NULL OR measured_at >= $3)
                 AND ($4::timestamptz IS NULL OR measured_at < $4)
                 AND (measured_at, measurement_id) > ($5, $6)
               ORDER BY measured_at, measurement_id LIMIT $7""",
            device_id, metric, from_, to, after_t, after_id, limit + 1)
        page = rows[:limit]
        nxt = (cursor.encode(page[-1]["measured_at"].isoformat(), str(page[-1]["measurement_id"]))
               if len(rows) > limit else None)
        return {"items": [dict(r) for r in page], "next_cursor": nxt}

    @app.get("/experiments", summary="List colour-mixing experiments")
    async def list_experiments(
        request: Request,
        status: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor_: Annotated[str | None, Query(alias="cursor")] = None,
    ) -> dict:
        after = cursor.decode(cursor_, 1)[0] if cursor_ else ""
        rows = await request.app.state.pg.fetch(
            f"""SELECT {_EXPERIMENT_COLUMNS} FROM experiments e
                WHERE experiment_id > $1 AND ($2::text IS NULL OR status = $2)
                ORDER BY experiment_id LIMIT $3""", str(after), status, limit + 1)
        page = rows[:limit]
        nxt = cursor.encode(page[-1]["experiment_id"]) if len(rows) > limit else None
        return {"items": [dict(r) for r in page], "next_cursor": nxt}

    async def _experiment(pg, experiment_id: str) -> dict:
        row = await pg.fetchrow(f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments e "
                                "WHERE experiment_id = $1", experiment_id)
        if row is None:
            raise HTTPException(404, f"no experiment {experiment_id!r}")
        return dict(row)

    @app.get("/experiments/{experiment_id}", summary="One experiment with its robot runs")
    async def get_experiment(request: Request, experiment_id: str) -> dict:
        pg = request.app.state.pg
        body = await _experiment(pg, experiment_id)
        runs = await pg.fetch(
            """SELECT run_id, iteration, status, protocol_hash, mode, commands, wells, error,
                      requested_at, started_at, finished_at
               FROM robot_runs WHERE experiment_id = $1 ORDER BY iteration""", experiment_id)
        body["runs"] = [dict(r) for r in runs]
        body["summary"] = await _mongo_summary(request.app.state.mongo[cfg.mongo_db],
                                               experiment_id)
        return body

    @app.get("/experiments/{experiment_id}/wells", summary="Every well of an experiment's plate")
    async def experiment_wells(request: Request, experiment_id: str) -> dict:
        pg = request.app.state.pg
        await _experiment(pg, experiment_id)
        return {"items": await _wells(pg, experiment_id)}

    @app.get("/experiments/{experiment_id}/plate.svg", summary="The plate as measured, as SVG",
             response_class=Response)
    async def experiment_plate(request: Request, experiment_id: str) -> Response:
        pg = request.app.state.pg
        experiment = await _experiment(pg, experiment_id)
        svg = plate_svg(experiment, await _wells(pg, experiment_id))
        return Response(svg, media_type="image/svg+xml")

    @app.get("/experiments/{experiment_id}/convergence.svg",
             summary="Best ΔE00 of each iteration, with the tolerance, as an SVG line chart",
             response_class=Response)
    async def experiment_convergence(request: Request, experiment_id: str) -> Response:
        pg = request.app.state.pg
        experiment = await _experiment(pg, experiment_id)
        rows = await pg.fetch(
            """SELECT iteration, min(delta_e) AS best_de, count(*)::int AS wells FROM wells
               WHERE experiment_id = $1 AND iteration IS NOT NULL AND delta_e IS NOT NULL
               GROUP BY iteration ORDER BY iteration""", experiment_id)
        return Response(convergence_svg(experiment, [dict(r) for r in rows]),
                        media_type="image/svg+xml")

    @app.get("/robot-runs/{run_id}/commands",
             summary="The engine commands of a robot run, in execution order")
    async def run_commands(
        request: Request,
        run_id: str,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor_: Annotated[str | None, Query(alias="cursor")] = None,
    ) -> dict:
        after = -1
        if cursor_:
            after = cursor.decode(cursor_, 1)[0]
            if type(after) is not int:
                raise HTTPException(422, f"invalid cursor {cursor_!r}: pass the next_cursor of "
                                         "a previous page unchanged")
        pg = request.app.state.pg
        if not await pg.fetchval("SELECT 1 FROM robot_runs WHERE run_id = $1 UNION ALL "
                                 "SELECT 1 FROM robot_commands WHERE run_id = $1 LIMIT 1", run_id):
            raise HTTPException(404, f"no robot run {run_id!r}")
        rows = await pg.fetch(
            """SELECT index, command_id, command_key, command_type, status, params, result, error,
                      created_at, started_at, completed_at
               FROM robot_commands WHERE run_id = $1 AND index > $2
               ORDER BY index LIMIT $3""", run_id, min(max(after, -1), 2**31 - 1), limit + 1)
        page = rows[:limit]
        nxt = cursor.encode(page[-1]["index"]) if len(rows) > limit else None
        return {"items": [dict(r) for r in page], "next_cursor": nxt}

    @app.get("/health/live", summary="The process is up")
    async def live() -> dict:
        return {"status": "ok"}

    @app.get("/health/ready", summary="Kafka, PostgreSQL and Mongo answer")
    async def ready(request: Request) -> JSONResponse:
        checks = await asyncio.gather(_check_kafka(cfg), _check_pg(request.app.state.pg),
                                      _check_mongo(request.app.state.mongo))
        body = dict(zip(("kafka", "postgres", "mongo"), checks, strict=False))
        ok = all(v == "ok" for v in body.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "checks": body},
                            status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

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
        doc = await asyncio.to_thread(db.experiments.find_one, {"_id": experiment_id},
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


def _route(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


def _json_loads(text: str):
    import json

    return json.loads(text)


async def _check_kafka(cfg: Config) -> str:
    """A metadata round trip, not just a TCP connect: the broker must answer as Kafka."""
    from aiokafka import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=cfg.kafka_bootstrap, request_timeout_ms=2000)
    try:
        await asyncio.wait_for(client.bootstrap(), 3)
        return "ok" if client.cluster.brokers() else "no brokers in metadata"
    except Exception as exc:  # any failure means not ready
        return f"unreachable: {exc!r}"
    finally:
        await client.close()


async def _check_pg(pool: asyncpg.Pool) -> str:
    try:
        await asyncio.wait_for(pool.fetchval("SELECT 1"), 2)
        return "ok"
    except Exception as exc:  # any failure means not ready
        return f"failing: {exc!r}"


async def _check_mongo(client: MongoClient) -> str:
    try:
        await asyncio.wait_for(asyncio.to_thread(client.admin.command, "ping"), 3)
        return "ok"
    except Exception as exc:  # any failure means not ready
        return f"failing: {exc!r}"
