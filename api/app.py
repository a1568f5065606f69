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

from api import cursor
from events.config import Config
from projections.postgres import connect_pool

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
                              "validated measurements. Cursor-paginated; times are UTC.")

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

    @app.get("/health/live", summary="The process is up")
    async def live() -> dict:
        return {"status": "ok"}

    @app.get("/health/ready", summary="Kafka, PostgreSQL and Mongo answer")
    async def ready(request: Request) -> JSONResponse:
        checks = await asyncio.gather(_check_kafka(cfg), _check_pg(request.app.state.pg),
                                      _check_mongo(request.app.state.mongo))
        body = dict(zip(("kafka", "postgres", "mongo"), checks))
        ok = all(v == "ok" for v in body.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "checks": body},
                            status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


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
