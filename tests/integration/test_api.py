"""The query API against real PostgreSQL and Mongo: pagination and parameter errors."""

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from labbus.api import cursor
from labbus.events.codec import default_codec
from labbus.events.model import DeviceRegistered, MeasurementValidated
from labbus.events.runtime import Positioned
from labbus.projections.postgres import PostgresProjection
from tests.conftest import run, walk_pages

T0 = datetime(2026, 3, 1, tzinfo=UTC)
DEVICE = "api-dev-1"
ROWS = 137


@pytest.fixture(scope="module")
def api(cfg, query_api):
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
    with query_api(cfg) as client:
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
    (f"/devices/{DEVICE}/measurements", {"from": "2026-03-01T00:00:00"}, 422, "offset"),
    (f"/devices/{DEVICE}/measurements", {"to": "0.5"}, 422, "to"),
    # 400: every parameter matches its schema, the request still cannot be answered
    (f"/devices/{DEVICE}/measurements", {"from": "2026-03-02T00:00:00Z",
                                         "to": "2026-03-01T00:00:00Z"}, 400, "after"),
    (f"/devices/{DEVICE}/measurements", {"cursor": "not-a-cursor"}, 400, "cursor"),
    (f"/devices/{DEVICE}/measurements", {"cursor": "WyJ4IiwgInkiXQ"}, 400, "measured_at"),
    # found by outside testing: a timestamp and an integer answered 500
    (f"/devices/{DEVICE}/measurements", {"cursor": cursor.encode("2024-01-01T00:00:00+00:00", 5)},
     400, "measurement_id must be a uuid"),
    (f"/devices/{DEVICE}/measurements", {"cursor": cursor.encode("2024-01-01T00:00:00", str(
        uuid.UUID(int=1)))}, 400, "measured_at must be a date-time"),
    ("/devices", {"cursor": "%%%"}, 422, "cursor"),
    # found by outside testing: /devices took any JSON as a cursor
    ("/devices", {"cursor": cursor.encode({"a": [1, {"b": None}]})}, 400, "device_id"),
    ("/devices", {"cursor": cursor.encode(["x"])}, 400, "device_id must be a string"),
    ("/devices", {"cursor": cursor.encode(7)}, 400, "device_id must be a string"),
    ("/devices", {"cursor": cursor.encode("a\x00b")}, 400, "cursor"),
    ("/devices", {"cursor": cursor.encode("x", "y")}, 400, "device_id"),
    ("/experiments", {"cursor": cursor.encode(3)}, 400, "experiment_id must be a string"),
    ("/devices/no-such-device", {}, 404, "no-such-device"),
    ("/devices/no-such-device/measurements", {}, 404, "no-such-device"),
    ("/devices/nul%00device", {}, 404, "nul"),
    ("/devices/nul%00device/measurements", {}, 404, "nul"),
])
def test_bad_parameters_get_4xx_with_a_message(api, path, params, status, phrase):
    r = api.get(path, params=params)
    assert r.status_code == status, r.text
    assert phrase in r.json()["detail"]
    assert set(r.json()) == {"detail", "errors"}  # the one documented Error body
    assert isinstance(r.json()["errors"], list) and bool(r.json()["errors"]) == (status == 422)


def test_validation_errors_name_each_parameter(api):
    r = api.get(f"/devices/{DEVICE}/measurements", params={"limit": 0, "from": "yesterday"})
    assert r.status_code == 422
    errors = {tuple(e["loc"]): e for e in r.json()["errors"]}
    assert set(errors) == {("query", "limit"), ("query", "from")}
    assert errors[("query", "limit")]["type"] == "greater_than_equal"


def test_times_at_the_ends_of_the_calendar_are_answered(api):
    """Offsets that push a time past year 1 or 9999 in UTC, leap seconds and year 0 are valid
    RFC 3339; they read as the calendar's ends (or :59) rather than crashing the query."""
    for window in ({"from": "0001-01-01T00:00:00+05:00"}, {"to": "9999-12-31T23:59:59-12:00"},
                   {"from": "0000-01-01T00:00:00Z", "to": "2026-03-01T00:00:00.5Z"},
                   {"from": "2026-02-28T23:59:60Z"}):
        r = api.get(f"/devices/{DEVICE}/measurements", params={"limit": 1000, **window})
        assert r.status_code == 200, (window, r.text)
    assert len(r.json()["items"]) == ROWS


def test_filters_that_no_row_can_match(api):
    """PostgreSQL text cannot hold NUL: such a filter matches nothing (200), such an id is
    unknown (404), instead of a database error."""
    assert api.get("/devices", params={"device_type": "a\x00"}).json() == {
        "items": [], "next_cursor": None}
    r = api.get(f"/devices/{DEVICE}/measurements", params={"metric": "ph\x00"})
    assert r.status_code == 200 and r.json()["items"] == []
    assert api.get("/experiments", params={"status": "\x00"}).json()["items"] == []
    assert api.get("/experiments/x%00y").status_code == 404


def test_health_metrics_and_openapi(api):
    assert api.get("/health/live").json() == {"status": "ok"}
    ready = api.get("/health/ready")
    assert ready.status_code == 200, ready.text
    # the API's own dependencies only: it reads PostgreSQL and MongoDB, never Kafka
    assert ready.json() == {"status": "ok", "checks": {"postgres": "ok", "mongo": "ok"}}
    assert "labbus_api_requests_total" in api.get("/metrics").text
    schema = api.get("/openapi.json").json()
    paths = schema["paths"]
    assert {"/devices", "/devices/{device_id}", "/devices/{device_id}/measurements"} <= set(paths)
    # every error answer is documented, with the one Error body
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path, ops in paths.items():
        for status, response in ops["get"]["responses"].items():
            if status.startswith(("4", "5")) and path != "/health/ready":
                assert response["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/Error"}, (path, status)
    assert "404" in paths["/devices/{device_id}"]["get"]["responses"]
    assert "400" in paths["/devices/{device_id}/measurements"]["get"]["responses"]


def test_a_read_model_that_does_not_answer(cfg, query_api):
    """MongoDB unreachable (a closed port): readiness says which check fails (503), and a route
    that needs MongoDB answers 503 with the Error body, not 500; PostgreSQL-only routes work."""
    from dataclasses import replace

    from tests.conftest import free_port

    down = replace(cfg, mongo_url=f"mongodb://127.0.0.1:{free_port()}")
    with query_api(down) as client:
        ready = client.get("/health/ready")
        assert ready.status_code == 503, ready.text
        assert ready.json()["status"] == "unavailable"
        assert ready.json()["checks"]["postgres"] == "ok"
        assert ready.json()["checks"]["mongo"] != "ok"
        r = client.get(f"/devices/{DEVICE}")
        assert r.status_code == 503 and "MongoDB" in r.json()["detail"], r.text
        assert client.get("/devices").status_code == 200


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
