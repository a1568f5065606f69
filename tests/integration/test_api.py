"""The query API against real PostgreSQL and Mongo: pagination and parameter errors."""

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from labbus.api.app import create_app
from labbus.events.codec import default_codec
from labbus.events.model import DeviceRegistered, MeasurementValidated
from labbus.projections.postgres import PostgresProjection
from labbus.events.runtime import Positioned
from tests.conftest import run, walk_pages

T0 = datetime(2026, 3, 1, tzinfo=UTC)
DEVICE = "api-dev-1"
ROWS = 137


@pytest.fixture(scope="module")
def api(cfg):
    """Rows written through the real projection code, then read through the API."""
    from aiokafka import TopicPartition

    async def seed():
        projection = PostgresProjection(cfg)
        await projection.start()
        tp = TopicPartition("api-test", 0)
        codec = default_codec()

        def at(offset, event):
            return Positioned(tp, offset, *codec.decode_record(codec.encode(event), plain=True))

        events = [at(0, DeviceRegistered.create(
            source="t", subject=DEVICE, sequence=0, device_id=DEVICE, device_type="ph-meter",
            model="m", location="l", metrics=["ph", "temperature"]))]
        for i in range(ROWS):
            # several readings share a timestamp, so order must fall back to the id
            events.append(at(i + 1, MeasurementValidated.create(
                source="t", subject=DEVICE, sequence=i, measurement_id=uuid.uuid4(),
                device_id=DEVICE, metric="ph" if i % 3 else "temperature", value=7.0,
                unit="pH" if i % 3 else "degC", measured_at=T0 + timedelta(seconds=i // 4))))
        await projection.apply(events, {tp: ROWS + 1})
        await projection.stop()

    run(seed())
    with TestClient(create_app(cfg)) as client:
        yield client


def walk(api, **params):
    return walk_pages(api, f"/devices/{DEVICE}/measurements", **params)


def test_pagination_walks_every_row_once_in_stable_order(api):
    items, pages = walk(api, limit=10)
    assert pages == 14
    ids = [i["measurement_id"] for i in items]
    assert len(ids) == len(set(ids)) == ROWS
    keys = [(i["measured_at"], i["measurement_id"]) for i in items]
    assert keys == sorted(keys)


def test_filters_by_metric_and_time(api):
    ph, _ = walk(api, limit=25, metric="ph")
    assert len(ph) == sum(1 for i in range(ROWS) if i % 3) and {i["unit"] for i in ph} == {"pH"}
    window, _ = walk(api, limit=7, **{"from": (T0 + timedelta(seconds=5)).isoformat(),
                                      "to": (T0 + timedelta(seconds=10)).isoformat()})
    assert len(window) == 20  # seconds 5..9, four readings each


def test_device_and_listing(api):
    r = api.get(f"/devices/{DEVICE}")
    assert r.status_code == 200 and r.json()["device_type"] == "ph-meter"
    assert any(d["device_id"] == DEVICE for d in api.get("/devices").json()["items"])


@pytest.mark.parametrize("path,params,status,phrase", [
    (f"/devices/{DEVICE}/measurements", {"limit": 0}, 422, "limit"),
    (f"/devices/{DEVICE}/measurements", {"limit": "ten"}, 422, "limit"),
    (f"/devices/{DEVICE}/measurements", {"limit": 5000}, 422, "limit"),
    (f"/devices/{DEVICE}/measurements", {"from": "yesterday"}, 422, "from"),
    (f"/devices/{DEVICE}/measurements", {"from": "2026-03-02T00:00:00Z",
                                         "to": "2026-03-01T00:00:00Z"}, 422, "after"),
    (f"/devices/{DEVICE}/measurements", {"cursor": "not-a-cursor"}, 422, "cursor"),
    (f"/devices/{DEVICE}/measurements", {"cursor": "WyJ4IiwgInkiXQ"}, 422, "cursor"),
    ("/devices", {"cursor": "%%%"}, 422, "cursor"),
    ("/devices/no-such-device", {}, 404, "no-such-device"),
    ("/devices/no-such-device/measurements", {}, 404, "no-such-device"),
])
def test_bad_parameters_get_4xx_with_a_message(api, path, params, status, phrase):
    r = api.get(path, params=params)
    assert r.status_code == status, r.text
    assert phrase in r.text


def test_health_metrics_and_openapi(api):
    assert api.get("/health/live").json() == {"status": "ok"}
    ready = api.get("/health/ready")
    assert ready.status_code == 200, ready.text
    assert set(ready.json()["checks"]) == {"kafka", "postgres", "mongo"}
    assert "labbus_api_requests_total" in api.get("/metrics").text
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/devices", "/devices/{device_id}", "/devices/{device_id}/measurements"} <= set(paths)


def test_the_api_role_cannot_write(cfg):
    import asyncpg

    async def attempt():
        con = await asyncpg.connect(cfg.postgres_api_dsn)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await con.execute("DELETE FROM measurements")
        finally:
            await con.close()

    asyncio.run(attempt())
