"""Readings flow agent -> Kafka -> validator -> projectors -> PostgreSQL/Mongo -> API."""

from collections import Counter

import asyncpg
from pymongo import MongoClient

from labbus.events.codec import default_codec
from labbus.events.model import MeasurementRejected
from labbus.events.topics import (
    DEAD_LETTER,
    MEASUREMENTS_RECORDED,
    MEASUREMENTS_REJECTED,
    topic_name,
)
from labbus.producers import sim
from tests.conftest import consumer_lag, read_topic, run, wait_for

N = 3000


async def pg_count(dsn: str) -> int:
    con = await asyncpg.connect(dsn)
    try:
        return await con.fetchval(
            "SELECT count(*) FROM measurements WHERE device_id LIKE 'e2e-%'")
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await con.close()


def test_readings_flow_end_to_end(cfg, processes, query_api):
    workers = {name: processes.start(*args) for name, args in (
        ("validator", ("process", "validate")), ("projector-postgres", ("project", "postgres")),
        ("projector-mongo", ("project", "mongo")))}
    simulator = sim.FleetSimulator(sim.make_fleet(12, seed=7, prefix="e2e"), seed=7,
                                   bad_fraction=0.1)
    summary = run(sim.publish(cfg, simulator, N, rate=0, track_ids=True))
    assert summary.readings == N
    assert set(summary.bad) == set(sim.BAD_KINDS), "every kind of bad reading was injected"

    wait_for(lambda: run(pg_count(cfg.postgres_dsn)) == summary.good, 120,
             "all good readings in PostgreSQL")

    codec = default_codec()
    expected_rejected = sum(v for k, v in summary.bad.items() if k != "undecodable")
    def mine(spec):  # other tests share the session's topics; their keys differ
        return [r for r in run(read_topic(cfg, topic_name(cfg, spec))) if r.key.startswith(b"e2e-")]

    rejected = wait_for(lambda: (r := mine(MEASUREMENTS_REJECTED)) and len(r) >= expected_rejected
                        and r, 60, "rejections")
    dead = wait_for(lambda: mine(DEAD_LETTER), 60, "dead letters")

    rejections = [codec.decode(r.value) for r in rejected]
    assert all(isinstance(e, MeasurementRejected) and e.reason for e in rejections)
    assert Counter(e.reason_code for e in rejections) == Counter(
        {k: v for k, v in summary.bad.items() if k != "undecodable"})
    letters = [codec.decode(r.value) for r in dead]
    assert len(letters) == summary.bad["undecodable"]
    raw_by_offset = {(r.partition, r.offset): r.value for r in
                     run(read_topic(cfg, topic_name(cfg, MEASUREMENTS_RECORDED)))}
    for letter in letters:
        assert letter.error_type in {"not_single_object", "unknown_fingerprint"}
        assert letter.source_topic == topic_name(cfg, MEASUREMENTS_RECORDED)
        assert raw_by_offset[(letter.source_partition, letter.source_offset)] == \
            letter.original_value
    assert summary.good + len(rejections) + len(letters) == N

    with query_api(cfg) as api:
        seen = []
        devices = api.get("/devices", params={"limit": 5})
        device_ids = []
        while True:
            assert devices.status_code == 200, devices.text
            device_ids += [d["device_id"] for d in devices.json()["items"]]
            cursor = devices.json()["next_cursor"]
            if not cursor:
                break
            devices = api.get("/devices", params={"limit": 5, "cursor": cursor})
        device_ids = [d for d in device_ids if d.startswith("e2e-")]
        assert len(device_ids) == 12
        for device in device_ids:
            params = {"limit": 250}
            while True:
                page = api.get(f"/devices/{device}/measurements", params=params)
                assert page.status_code == 200, page.text
                seen += [m["measurement_id"] for m in page.json()["items"]]
                if not page.json()["next_cursor"]:
                    break
                params["cursor"] = page.json()["next_cursor"]
        assert len(seen) == len(set(seen)) == summary.good
        assert {str(i) for i in summary.good_ids} == set(seen)

    mongo = MongoClient(cfg.mongo_url)[cfg.mongo_db]
    e2e = {"_id": {"$regex": "^e2e-"}}
    wait_for(lambda: sum(d.get("total_measurements", 0) for d in mongo.devices.find(e2e))
             == summary.good, 60, "Mongo device documents to count every good reading")
    assert mongo.devices.count_documents(e2e) == 12

    for name, worker in workers.items():  # every consumer reports its lag, drained to zero
        wait_for(lambda w=worker, n=name: consumer_lag(w.metrics_url, n) == 0, 30,
                 f"{name} reporting consumer lag 0")
