"""Experiment read models against real PostgreSQL and Mongo: a campaign's events written through
the real projection code, then read through the API (convergence chart, paged robot commands,
the Mongo experiment document and its idempotent replay)."""

from __future__ import annotations

from datetime import datetime
from xml.etree import ElementTree

import pytest
from aiokafka import TopicPartition

from labbus.api import cursor
from labbus.events.codec import default_codec
from labbus.events.model import (
    ExperimentCompleted,
    ExperimentRequested,
    RecipesProposed,
    RobotCommandExecuted,
    RobotRunFinished,
    RobotRunRequested,
    RobotRunStarted,
    WellColourMeasured,
    WellDispensed,
    WellScored,
)
from labbus.events.runtime import Positioned
from labbus.projections.mongo import MongoProjection
from labbus.projections.postgres import PostgresProjection
from tests.conftest import run, walk_pages

XID = "rm-campaign"
ITERATIONS, BATCH = 3, 4
COMMANDS = [37, 41, 29]  # per run, so pages of 10 end mid-run
TOLERANCE = 2.0
# best ΔE of each iteration, falling below the tolerance in the last
BEST = [14.5, 6.25, 1.5]
# fake topic names: the seeded positions must not steer the session's real projectors
TOPICS = {"experiments": "rm-test.experiments", "runs": "rm-test.runs",
          "readings": "rm-test.readings"}
SVG = "{http://www.w3.org/2000/svg}"


def well_name(i: int) -> str:
    return f"{'ABCDEFGH'[i % 8]}{i // 8 + 1}"


def campaign_events(xid: str, requested_by: str = "test") -> dict[str, list]:
    """The events of a three-iteration campaign, per topic, in log order."""
    t = dict(source="t", subject=xid)
    ex: list = [ExperimentRequested.create(
        **t, sequence=0, experiment_id=xid, target_hex="#7a3cc0", target_lab=[40.0, 50.0, -50.0],
        dyes=["red", "yellow", "blue"], budget_wells=48, batch_size=BATCH,
        tolerance_de=TOLERANCE, requested_by=requested_by)]
    runs: list = []
    readings: list = []
    best = None
    for it in range(ITERATIONS):
        wells = [well_name(it * BATCH + k) for k in range(BATCH)]
        recipes = [{"well": w, "volumes": {"red": 10.0 * (k + 1), "blue": 20.0},
                    "water_ul": 100.0} for k, w in enumerate(wells)]
        ex.append(RecipesProposed.create(**t, sequence=len(ex), experiment_id=xid, iteration=it,
                                         recipes=recipes, predicted_de=None, note=""))
        run_id = f"{xid}-run-{it}"
        ids = dict(run_id=run_id, experiment_id=xid, iteration=it)
        runs.append(RobotRunRequested.create(**t, sequence=len(runs), protocol_hash="h",
                                             protocol_text="", recipes=recipes, **ids))
        runs.append(RobotRunStarted.create(**t, sequence=len(runs), mode="simulate", **ids))
        for i in range(COMMANDS[it]):
            runs.append(RobotCommandExecuted.create(
                **t, sequence=len(runs), command_id=f"{run_id}-c{i}", command_key=None,
                command_type=("aspirate", "dispense", "pickUpTip")[i % 3],
                params_json=f'{{"i": {i}}}', result_json="{}", status="succeeded",
                created_at=None, started_at=None, completed_at=None, error_json=None, index=i,
                **ids))
        for r in recipes:
            runs.append(WellDispensed.create(**t, sequence=len(runs), well=r["well"],
                                             volumes=r["volumes"], **ids))
        runs.append(RobotRunFinished.create(**t, sequence=len(runs), commands=COMMANDS[it],
                                            wells=BATCH, **ids))
        for k, r in enumerate(recipes):
            readings.append(WellColourMeasured.create(
                **t, sequence=len(readings), rgb=[120, 60, 190 - k], lab=[40.0, 50.0, -49.0],
                instrument_id="reader", well=r["well"], **ids))
            delta_e = BEST[it] + 3.0 * k  # the first well of each batch is its best
            ex.append(WellScored.create(**t, sequence=len(ex), experiment_id=xid, iteration=it,
                                        well=r["well"], delta_e=delta_e, volumes=r["volumes"],
                                        rgb=[120, 60, 190 - k]))
            if best is None or delta_e < best[1]:
                best = (r, delta_e)
    ex.append(ExperimentCompleted.create(
        **t, sequence=len(ex), experiment_id=xid, best_well=best[0]["well"],
        best_volumes=best[0]["volumes"], best_de=best[1], wells_used=ITERATIONS * BATCH,
        reason="matched"))
    return {"experiments": ex, "runs": runs, "readings": readings}


def positioned(by_topic: dict[str, list], partition: int = 0) -> list[list[Positioned]]:
    """One batch per topic, as the runner hands them over."""
    codec = default_codec()
    batches = []
    for alias, events in by_topic.items():
        tp = TopicPartition(TOPICS[alias], partition)
        batches.append([Positioned(tp, offset, *codec.decode_record(codec.encode(e), plain=True))
                        for offset, e in enumerate(events)])
    return batches


def next_offsets(batch: list[Positioned]) -> dict[TopicPartition, int]:
    return {batch[-1].tp: batch[-1].offset + 1} if batch else {}


def mongo_projection(cfg) -> MongoProjection:
    projection = MongoProjection(cfg)
    projection.aliases = {topic: alias for alias, topic in TOPICS.items()}
    return projection


@pytest.fixture(scope="module")
def api(cfg, query_api):
    async def seed():
        pg, mongo = PostgresProjection(cfg), mongo_projection(cfg)
        await pg.start()
        await mongo.start()
        try:
            for batch in positioned(campaign_events(XID)):
                await pg.apply(batch, next_offsets(batch))
                await mongo.apply(batch, next_offsets(batch))
        finally:
            await pg.stop()
            await mongo.stop()

    run(seed())
    with query_api(cfg) as client:
        yield client


def test_convergence_svg_has_one_point_per_iteration_and_the_tolerance(api):
    r = api.get(f"/experiments/{XID}/convergence.svg")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("image/svg+xml")
    root = ElementTree.fromstring(r.text)
    assert root.tag == f"{SVG}svg"
    points = [c for c in root.iter(f"{SVG}circle") if c.get("class") == "point"]
    assert len(points) == ITERATIONS
    ys = [float(c.get("cy")) for c in points]
    assert ys == sorted(ys), "ΔE falls each iteration, so the points go down (SVG y grows down)"
    xs = [float(c.get("cx")) for c in points]
    assert xs == sorted(xs) and len(set(xs)) == ITERATIONS
    ticks = [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "x-tick"]
    assert ticks == [str(i) for i in range(ITERATIONS)]
    tolerance = [ln for ln in root.iter(f"{SVG}line") if ln.get("class") == "tolerance"]
    assert len(tolerance) == 1
    # the tolerance (2.0) lies between the last iteration's best (1.5) and the one before (6.25)
    assert ys[1] < float(tolerance[0].get("y1")) < ys[2]
    assert f"{BEST[-1]:.2f}" in r.text


def test_convergence_svg_of_an_unscored_or_unknown_experiment(cfg, api):
    async def seed():
        pg = PostgresProjection(cfg)
        await pg.start()
        try:
            batch = positioned({"experiments": campaign_events("rm-fresh")["experiments"][:1]})[0]
            await pg.apply(batch, {})
        finally:
            await pg.stop()

    run(seed())
    r = api.get("/experiments/rm-fresh/convergence.svg")
    assert r.status_code == 200, r.text
    root = ElementTree.fromstring(r.text)
    assert not [c for c in root.iter(f"{SVG}circle") if c.get("class") == "point"]
    assert "no scored wells yet" in r.text
    assert api.get("/experiments/nope/convergence.svg").status_code == 404


def walk_commands(api, run_id: str, **params) -> tuple[list[dict], int]:
    return walk_pages(api, f"/robot-runs/{run_id}/commands", **params)


@pytest.mark.parametrize("limit", [1, 10, 41, 1000])
def test_command_pages_walk_every_command_once_in_order(api, limit):
    for it, n in enumerate(COMMANDS):
        items, pages = walk_commands(api, f"{XID}-run-{it}", limit=limit)
        assert [c["index"] for c in items] == list(range(n))
        assert len({c["command_id"] for c in items}) == n
        assert pages == max(1, -(-n // limit))
        assert items[5]["params"] == {"i": 5} and items[5]["command_type"] == "pickUpTip"


@pytest.mark.parametrize("path,params,status,phrase", [
    (f"/robot-runs/{XID}-run-0/commands", {"limit": 0}, 422, "limit"),
    (f"/robot-runs/{XID}-run-0/commands", {"limit": "ten"}, 422, "limit"),
    (f"/robot-runs/{XID}-run-0/commands", {"limit": 5000}, 422, "limit"),
    (f"/robot-runs/{XID}-run-0/commands", {"cursor": "%%%"}, 422, "cursor"),
    # 400: a string, as the schema says, but not a cursor this route issued
    (f"/robot-runs/{XID}-run-0/commands", {"cursor": "not-a-cursor"}, 400, "cursor"),
    (f"/robot-runs/{XID}-run-0/commands", {"cursor": cursor.encode("x")}, 400, "cursor"),
    (f"/robot-runs/{XID}-run-0/commands", {"cursor": cursor.encode(1.5)}, 400, "cursor"),
    (f"/robot-runs/{XID}-run-0/commands", {"cursor": cursor.encode(True)}, 400, "cursor"),
    (f"/robot-runs/{XID}-run-0/commands", {"cursor": cursor.encode(1, 2)}, 400, "cursor"),
    ("/robot-runs/no-such-run/commands", {}, 404, "no-such-run"),
])
def test_command_pages_bad_parameters_get_4xx(api, path, params, status, phrase):
    r = api.get(path, params=params)
    assert r.status_code == status, r.text
    assert phrase in r.text


def test_command_pages_tolerate_out_of_range_cursors(api):
    for after in (-10**12, 10**12):
        r = api.get(f"/robot-runs/{XID}-run-0/commands", params={"cursor": cursor.encode(after)})
        assert r.status_code == 200, r.text
    assert r.json() == {"items": [], "next_cursor": None}


def mongo_doc(cfg, xid: str) -> dict:
    from pymongo import MongoClient

    with MongoClient(cfg.mongo_url, tz_aware=True) as client:
        return client[cfg.mongo_db].experiments.find_one({"_id": xid})


def test_mongo_experiment_document(cfg, api):
    doc = mongo_doc(cfg, XID)
    assert doc["status"] == "completed" and doc["target"]["hex"] == "#7a3cc0"
    assert doc["tolerance_de"] == TOLERANCE and doc["dyes"] == ["red", "yellow", "blue"]
    assert len(doc["wells"]) == doc["wells_used"] == ITERATIONS * BATCH
    assert doc["best_de"] == min(BEST) and doc["best_well"] == well_name(2 * BATCH)
    assert sorted(doc["iterations"]) == [str(i) for i in range(ITERATIONS)]
    assert all(len(doc["iterations"][str(i)]["recipes"]) == BATCH for i in range(ITERATIONS))
    a1 = doc["wells"]["A1"]
    assert a1["volumes"] == {"red": 10.0, "blue": 20.0} and a1["water_ul"] == 100.0
    assert a1["dispensed"] == a1["volumes"] and a1["run_id"] == f"{XID}-run-0"
    assert a1["rgb"] == [120, 60, 190] and a1["delta_e"] == BEST[0] and a1["iteration"] == 0
    assert len(a1["lab"]) == 3
    for it, n in enumerate(COMMANDS):
        r = doc["runs"][f"{XID}-run-{it}"]
        assert r["status"] == "succeeded" and r["commands"] == n and r["wells"] == BATCH
        assert sum(r["command_types"].values()) == n == r["command_statuses"]["succeeded"]
        assert r["command_types"]["aspirate"] == -(-n // 3)

    summary = api.get(f"/experiments/{XID}").json()["summary"]
    assert summary["wells"] == {"proposed": 12, "dispensed": 12, "measured": 12, "scored": 12}
    assert summary["best_de"] == min(BEST)
    assert summary["runs"][f"{XID}-run-1"]["command_types"] == {
        "aspirate": 14, "dispense": 14, "pickUpTip": 13}
    assert api.get("/experiments/rm-fresh").json()["summary"] is None  # not in Mongo


def test_mongo_experiment_replay_and_topic_order_change_nothing(cfg):
    """The same batches applied twice, in whatever order the topics come, give one document."""
    batches = {xid: positioned(campaign_events(xid)) for xid in ("rm-replay", "rm-reorder")}

    async def apply(projection, batch_list):
        for batch in batch_list:
            await projection.apply(batch, next_offsets(batch))

    async def scenario():
        projection = mongo_projection(cfg)
        await projection.start()
        try:
            await apply(projection, batches["rm-replay"])
            once = mongo_doc(cfg, "rm-replay")
            await apply(projection, batches["rm-replay"])  # a replay after a crash
            # a replay of a suffix of a batch, as after a crash between documents and positions
            await apply(projection, [b[len(b) // 2:] for b in batches["rm-replay"]])
            twice = mongo_doc(cfg, "rm-replay")
            await apply(projection, list(reversed(batches["rm-reorder"])))
            reordered = mongo_doc(cfg, "rm-reorder")
            return once, twice, reordered
        finally:
            await projection.stop()

    once, twice, reordered = run(scenario())
    assert twice == once
    assert len(once["wells"]) == ITERATIONS * BATCH and once["best_de"] == min(BEST)

    # the same campaign with its topics read in the opposite order: equal up to ids and times
    assert _normalised(reordered) == _normalised(once)


def _normalised(x):
    if isinstance(x, dict):
        return {k.replace("rm-reorder", "rm-replay"): _normalised(v) for k, v in x.items()
                if k != "_id"}
    if isinstance(x, list):
        return [_normalised(v) for v in x]
    if isinstance(x, str):
        return x.replace("rm-reorder", "rm-replay")
    if isinstance(x, datetime):
        return "time"
    return x
