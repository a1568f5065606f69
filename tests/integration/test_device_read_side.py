"""The read side of devices' status, commands and alerts against real Kafka and PostgreSQL: events
published to their topics, projected by a running `labbus project postgres`, read through the
tables and the API; out-of-order command events, a full replay, the SELECT-only role."""

from __future__ import annotations

import asyncio
import itertools
import random
import shutil
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from aiokafka import TopicPartition

from labbus.api import cursor
from labbus.deploy.local import postgres
from labbus.events import config, kafka
from labbus.events.codec import default_codec
from labbus.events.model import (
    AnomalyDetected,
    CommandAccepted,
    CommandCompleted,
    CommandDispatched,
    CommandFailed,
    CommandIssued,
    CommandProgress,
    CommandRejected,
    CommandStarted,
    CommandTimedOut,
    DeviceHeartbeat,
    DeviceRegistered,
    DeviceStatusChanged,
)
from labbus.events.runtime import Positioned
from labbus.events.topics import ALERTS, COMMANDS, DEVICE_STATUS, DEVICES, topic_for, topic_name
from labbus.projections import postgres_devices as pd
from labbus.projections.migrate import MIGRATIONS, migrate
from labbus.projections.postgres import PostgresProjection
from tests.conftest import Processes, run, wait_for, walk_pages

T = datetime(2026, 3, 1, tzinfo=UTC)
BAL, PH, GHOST = "rs-bal-1", "rs-ph-2", "rs-ghost-3"
SPEC = {"metric": "mass", "unit": "g", "min": 0.0, "max": 220.0, "expected_interval_s": 1.0}


def at(seconds: float) -> datetime:
    return T + timedelta(seconds=seconds)


def _e(cls, device: str, when: float, **fields):
    return cls.create(source="rs-test", subject=device, sequence=0, occurred_at=at(when),
                      device_id=device, **fields)


def _command_events(cid: str, minute: int, *steps: str, device: str = BAL) -> list:
    """A command's events in the order given, each at its own time from `minute` on."""
    t0 = minute * 60
    made = {
        "issued": lambda: _e(CommandIssued, device, t0, command_id=cid, idempotency_key=f"k-{cid}",
                             command_type="tare", payload_json='{"zero": true}',
                             expires_at=at(t0 + 30), issued_by="alice"),
        "dispatched": lambda: _e(CommandDispatched, device, t0 + 0.5, command_id=cid,
                                 idempotency_key=f"k-{cid}", command_type="tare",
                                 payload_json='{"zero": true}', expires_at=at(t0 + 30),
                                 issued_by="alice"),
        "accepted": lambda: _e(CommandAccepted, device, t0 + 1, command_id=cid),
        "started": lambda: _e(CommandStarted, device, t0 + 2, command_id=cid, progress=0.5),
        "progress": lambda: _e(CommandProgress, device, t0 + 2.25, command_id=cid,
                               progress=0.4, remaining_s=6.0, intermediate_json='{"mass_g": 5}'),
        "progress2": lambda: _e(CommandProgress, device, t0 + 2.5, command_id=cid,
                                progress=0.8, remaining_s=1.5,
                                intermediate_json='{"mass_g": 10}'),
        "completed": lambda: _e(CommandCompleted, device, t0 + 3, command_id=cid,
                                result_json='{"mass_g": 12.5}'),
        "failed": lambda: _e(CommandFailed, device, t0 + 3, command_id=cid, error="jammed"),
        "rejected": lambda: _e(CommandRejected, device, t0 + 1, command_id=cid,
                               reason_code="invalid_payload", reason="zero must be a boolean"),
        "timed_out": lambda: _e(CommandTimedOut, device, t0 + 31, command_id=cid,
                                expires_at=at(t0 + 30)),
    }
    return [made[s]() for s in steps]


# command id -> (its events in log order, the status it must end in)
COMMAND_CASES = {
    "c-happy": (("issued", "accepted", "started", "completed"), "COMPLETED"),
    "c-late": (("issued", "completed", "accepted", "started"), "COMPLETED"),
    "c-race": (("issued", "accepted", "completed", "timed_out"), "COMPLETED"),
    "c-timeout": (("issued", "accepted", "timed_out"), "TIMED_OUT"),
    "c-rejected": (("rejected", "issued"), "REJECTED"),
    "c-failed": (("issued", "started", "failed"), "FAILED"),
    # issued, dispatched, accepted, started, two progress reports, completed
    "c-progress": (("issued", "dispatched", "accepted", "started", "progress", "progress2",
                    "completed"), "COMPLETED"),
    # older events after newer ones (the earlier report, a second dispatch and acceptance with
    # ids of their own, as a relay restarted from an older position sends them): no regression
    "c-regress": (("issued", "dispatched", "accepted", "started", "progress2", "progress",
                   "dispatched", "accepted"), "STARTED"),
    "c-dispatched": (("dispatched", "issued"), "DISPATCHED"),
}


def log_events() -> list:
    """Everything this module publishes, in publishing order (duplicates included)."""
    events = [
        # the pH meter's status comes before its registration
        _e(DeviceStatusChanged, PH, 5, status="MAINTENANCE", reason="calibrating"),
        _e(DeviceRegistered, BAL, 0, device_type="balance", model="XS205", location="bench 1",
           metrics=["mass"], specs=[SPEC], spec_version=2),
        _e(DeviceRegistered, PH, 0, device_type="ph-meter", model="S220", location="bench 2",
           metrics=["ph"], specs=[dict(SPEC, metric="ph", unit="pH", min=None, max=None)]),
        _e(DeviceStatusChanged, BAL, 1, status="ONLINE", reason="registered"),
        _e(DeviceStatusChanged, BAL, 2, status="OFFLINE", reason="no heartbeat for 3 s"),
        _e(DeviceStatusChanged, BAL, 3, status="ONLINE", reason="heartbeats resumed"),
        # heartbeats out of order: the latest time wins, whatever the order
        _e(DeviceHeartbeat, BAL, 10, gateway="gw-0"),
        _e(DeviceHeartbeat, BAL, 30, gateway="gw-0"),
        _e(DeviceHeartbeat, BAL, 20, gateway="gw-0"),
        _e(DeviceHeartbeat, GHOST, 5, gateway="gw-0"),  # never registered
    ]
    for minute, (cid, (steps, _)) in enumerate(COMMAND_CASES.items(), start=1):
        events += _command_events(cid, minute, *steps)
    events.append(next(e for e in events if isinstance(e, CommandAccepted)))  # re-sent: dropped
    events += [next(e for e in events if isinstance(e, cls))  # re-sent too, after completion
               for cls in (CommandDispatched, CommandProgress)]
    alerts = [_e(AnomalyDetected, device, when, metric=metric, value=value, unit=unit,
                 measured_at=at(when - 1), measurement_id=uuid.uuid4(), rule="zscore",
                 score=score, threshold=4.0, window_mean=10.0, window_stddev=0.5,
                 window_count=120)
              for device, when, metric, value, unit, score in (
                  (BAL, 100, "mass", 99.0, "g", 178.0), (PH, 200, "ph", 13.9, "pH", 7.5),
                  (BAL, 300, "mass", -4.0, "g", 28.0))]
    return events + alerts + alerts[:1]


EVENTS = log_events()
N_COMMAND_EVENTS = sum(len(steps) for steps, _ in COMMAND_CASES.values())


async def publish(cfg, events) -> None:
    await kafka.ensure_topics(cfg)
    codec = default_codec()
    producer = kafka.producer(cfg)
    await producer.start()
    try:
        futures = [await producer.send(topic_for(cfg, e), codec.encode(e), key=e.key)
                   for e in events]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def fetch(dsn: str, sql: str, *args):
    con = await asyncpg.connect(dsn)
    try:
        return await con.fetch(sql, *args)
    finally:
        await con.close()


def apply_each(cfg, tp: TopicPartition, events, dsn: str | None = None) -> None:
    """Each (offset, event) through the projection code, in a transaction of its own."""
    codec = default_codec()

    async def go():
        projection = PostgresProjection(cfg, dsn=dsn)
        await projection.start()
        try:
            for offset, event in events:
                plain = codec.decode_record(codec.encode(event), plain=True)
                await projection.apply([Positioned(tp, offset, *plain)], {})
        finally:
            await projection.stop()

    run(go())


def projected(cfg) -> bool:
    if not run(fetch(cfg.postgres_dsn, "SELECT to_regclass('alerts') IS NOT NULL"))[0][0]:
        return False  # the projector has not migrated yet
    counts = run(fetch(cfg.postgres_dsn, """
        SELECT (SELECT count(*) FROM command_events WHERE device_id = $1),
               (SELECT count(*) FROM alerts WHERE device_id LIKE 'rs-%'),
               (SELECT count(*) FROM device_status_history WHERE device_id LIKE 'rs-%'),
               (SELECT count(*) FROM devices WHERE device_id LIKE 'rs-%'
                  AND (registered_at IS NOT NULL OR last_heartbeat_at IS NOT NULL))""", BAL))
    return tuple(counts[0]) == (N_COMMAND_EVENTS, 3, 4, 3)


TOPICS = (DEVICES, DEVICE_STATUS, COMMANDS, ALERTS)


@pytest.fixture(scope="module")
def projector(env, cfg, tmp_path_factory):
    procs = Processes(env, tmp_path_factory.mktemp("read-side"))
    run(publish(cfg, EVENTS))
    procs.start("project", "postgres")
    wait_for(lambda: projected(cfg), 60, "the events in the read models")
    yield procs
    procs.stop_all()


@pytest.fixture(scope="module")
def api(projector, cfg, query_api):
    with query_api(cfg) as client:
        yield client


def test_status_heartbeats_and_specs_in_the_devices_table(projector, cfg):
    rows = {r["device_id"]: r for r in run(fetch(
        cfg.postgres_dsn, "SELECT * FROM devices WHERE device_id LIKE 'rs-%'"))}
    assert rows[BAL]["status"] == "ONLINE" and rows[BAL]["status_reason"] == "heartbeats resumed"
    assert rows[BAL]["status_at"] == at(3)
    assert rows[BAL]["last_heartbeat_at"] == at(30)  # not the later-published 20
    assert rows[BAL]["spec_version"] == 2 and rows[BAL]["device_type"] == "balance"
    assert '"expected_interval_s": 1.0' in rows[BAL]["specs"]
    # a status before the registration, on another topic: both kept
    assert (rows[PH]["status"], rows[PH]["device_type"]) == ("MAINTENANCE", "ph-meter")
    assert rows[GHOST]["registered_at"] is None and rows[GHOST]["last_heartbeat_at"] == at(5)


def test_commands_end_in_the_status_their_events_rank_highest(projector, cfg):
    rows = {r["command_id"]: r for r in run(fetch(
        cfg.postgres_dsn, "SELECT * FROM commands WHERE device_id = $1", BAL))}
    assert {cid: r["status"] for cid, r in rows.items()} == {
        cid: final for cid, (_, final) in COMMAND_CASES.items()}
    # fields of CommandIssued arrive whenever it does
    assert all(r["command_type"] == "tare" and r["issued_by"] == "alice" for r in rows.values())
    assert rows["c-rejected"]["reason_code"] == "invalid_payload"
    assert rows["c-rejected"]["issued_at"] == at(5 * 60) == rows["c-rejected"]["first_at"]
    assert rows["c-late"]["status_at"] == at(2 * 60 + 3) and rows["c-late"]["progress"] == 0.5
    assert rows["c-race"]["reason"] is None  # the completion outranks the racing timeout
    assert rows["c-timeout"]["reason_code"] == "timed_out"
    assert rows["c-failed"]["error"] == "jammed"
    # the latest progress report, whatever order the reports came in
    for cid, minute in (("c-progress", 7), ("c-regress", 8)):
        row = rows[cid]
        assert (row["progress"], row["remaining_s"], row["intermediate"]) == (
            0.8, 1.5, '{"mass_g": 10}'), cid
        assert row["progress_at"] == at(minute * 60 + 2.5), cid
    assert rows["c-regress"]["status_at"] == at(8 * 60 + 2)  # the CommandStarted's
    assert rows["c-dispatched"]["status_at"] == at(9 * 60 + 0.5)
    assert rows["c-dispatched"]["issued_at"] == at(9 * 60)  # from the later CommandIssued
    assert rows["c-dispatched"]["payload"] == '{"zero": true}'
    assert rows["c-dispatched"]["progress"] is None and rows["c-happy"]["remaining_s"] is None
    history = run(fetch(cfg.postgres_dsn, "SELECT command_id, count(*) AS n FROM command_events "
                                          "WHERE device_id = $1 GROUP BY 1", BAL))
    assert {r["command_id"]: r["n"] for r in history} == {
        cid: len(steps) for cid, (steps, _) in COMMAND_CASES.items()}  # the re-send dropped


def test_every_order_of_a_commands_events_gives_the_same_row(cfg):
    """All 120 orders of issued/accepted/started/completed/timed_out, each event in its own
    transaction, through the projection code: the same row every time."""
    def each():
        for i, order in enumerate(itertools.permutations(range(5))):
            events = _command_events(f"perm-{i}", 1, "issued", "accepted", "started",
                                     "completed", "timed_out", device="rs-perm")
            yield from ((j, events[j]) for j in order)

    apply_each(cfg, TopicPartition("rs-perm.commands", 0), each())
    rows = run(fetch(cfg.postgres_dsn, """
        SELECT status, status_at, progress, result::text, reason, command_type, issued_at,
               first_at, updated_at, (SELECT count(*) FROM command_events e
                                      WHERE e.command_id = c.command_id) AS events
        FROM commands c WHERE device_id = 'rs-perm'"""))
    assert len(rows) == 120
    assert {tuple(r) for r in rows} == {("COMPLETED", at(63), 0.5, '{"mass_g": 12.5}', None,
                                         "tare", at(60), at(60), at(91), 5)}


def test_sampled_orders_of_a_progressing_command_give_the_same_row(cfg):
    """60 shuffled orders of issued/dispatched/accepted/started/two progress reports/completed,
    each event in its own transaction and one of them delivered twice: the same row and
    history every time (of the 5,040 orders, a seeded sample)."""
    steps = ("issued", "dispatched", "accepted", "started", "progress", "progress2", "completed")
    rng = random.Random(20260301)

    def each():
        for i in range(60):
            events = _command_events(f"perm-p-{i}", 1, *steps, device="rs-perm-p")
            order = rng.sample(range(len(events)), len(events))
            yield from ((j, events[j]) for j in order + [rng.choice(order)])

    apply_each(cfg, TopicPartition("rs-perm.commands", 0), each())
    rows = run(fetch(cfg.postgres_dsn, """
        SELECT status, status_at, progress, remaining_s, intermediate::text, progress_at,
               result::text, command_type, issued_at, first_at, updated_at,
               (SELECT string_agg(e.event_type || ':' || e.status, ' '
                                  ORDER BY e.occurred_at, e.status_rank, e.event_id)
                FROM command_events e WHERE e.command_id = c.command_id) AS history
        FROM commands c WHERE device_id = 'rs-perm-p'"""))
    assert len(rows) == 60
    history = " ".join(f"lab.command.Command{t}:{s}" for t, s in (
        ("Issued", "ISSUED"), ("Dispatched", "DISPATCHED"), ("Accepted", "ACCEPTED"),
        ("Started", "STARTED"), ("Progress", "STARTED"), ("Progress", "STARTED"),
        ("Completed", "COMPLETED")))
    assert {tuple(r) for r in rows} == {(
        "COMPLETED", at(63), 0.8, 1.5, '{"mass_g": 10}', at(62.5), '{"mass_g": 12.5}', "tare",
        at(60), at(60), at(63), history)}


def test_heartbeats_and_status_never_move_back_across_batches(cfg):
    """One event per transaction: a heartbeat older than the stored one, a status change from
    earlier in the log (a replay from a rewound position), leave the device as it was."""
    device = "rs-back-4"
    steps = [(0, _e(DeviceHeartbeat, device, 10, gateway="g")),
             (1, _e(DeviceHeartbeat, device, 30, gateway="g")),
             (2, _e(DeviceHeartbeat, device, 20, gateway="g")),
             (7, _e(DeviceStatusChanged, device, 40, status="ERROR", reason="jammed")),
             (5, _e(DeviceStatusChanged, device, 50, status="ONLINE", reason="earlier in log"))]
    apply_each(cfg, TopicPartition("rs-back.status", 0), steps)
    row = run(fetch(cfg.postgres_dsn, "SELECT status, status_reason, last_heartbeat_at, "
                                      "(SELECT count(*) FROM device_status_history h "
                                      " WHERE h.device_id = d.device_id) AS changes "
                                      "FROM devices d WHERE device_id = $1", device))[0]
    assert tuple(row) == ("ERROR", "jammed", at(30), 2)


def test_device_routes(api):
    listed, _ = walk_pages(api, "/devices", type="balance", limit=1)
    assert [d["device_id"] for d in listed] == [BAL]
    bal = listed[0]
    assert (bal["status"], bal["spec_version"], bal["specs"]) == ("ONLINE", 2, [SPEC])
    assert bal["last_heartbeat_at"] == "2026-03-01T00:00:30Z"
    assert PH in [d["device_id"] for d in api.get("/devices", params={
        "status": "MAINTENANCE", "limit": 500}).json()["items"]]
    assert PH in {d["device_id"] for d in api.get(  # other tests register ph-meters too
        "/devices", params={"device_type": "ph-meter", "limit": 500}).json()["items"]}
    assert GHOST not in {d["device_id"] for d in api.get("/devices").json()["items"]}
    detail = api.get(f"/devices/{BAL}").json()
    assert detail["status"] == "ONLINE"
    assert [(h["status"], h["reason"]) for h in detail["status_history"]] == [
        ("ONLINE", "heartbeats resumed"), ("OFFLINE", "no heartbeat for 3 s"),
        ("ONLINE", "registered")]
    ghost = api.get(f"/devices/{GHOST}")
    assert ghost.status_code == 200, ghost.text
    assert "device_type" not in ghost.json() and ghost.json()["status_history"] == []
    assert ghost.json()["last_heartbeat_at"] == "2026-03-01T00:00:05Z"


def test_command_routes(api):
    items, pages = walk_pages(api, "/commands", device=BAL, limit=4)
    assert pages == 3
    assert [c["command_id"] for c in items] == list(reversed(COMMAND_CASES))  # newest first
    def with_status(status):
        return {c["command_id"] for c in api.get(
            "/commands", params={"device": BAL, "status": status}).json()["items"]}

    assert with_status("COMPLETED") == {"c-happy", "c-late", "c-race", "c-progress"}
    assert with_status("DISPATCHED") == {"c-dispatched"}
    assert with_status("STARTED") == {"c-regress"}
    late = api.get("/commands/c-late").json()
    assert late["status"] == "COMPLETED" and late["result"] == {"mass_g": 12.5}
    assert late["payload"] == {"zero": True}
    assert [h["status"] for h in late["history"]] == ["ISSUED", "ACCEPTED", "STARTED",
                                                      "COMPLETED"]  # by time, not log order
    assert late["history"][3]["detail"] == {"result": {"mass_g": 12.5}}
    # issued, dispatched, accepted, started, progressed twice, completed: all of it, in order
    done = api.get("/commands/c-progress").json()
    assert (done["status"], done["status_at"]) == ("COMPLETED", "2026-03-01T00:07:03Z")
    assert (done["progress"], done["remaining_s"], done["intermediate"], done["progress_at"]) == (
        0.8, 1.5, {"mass_g": 10}, "2026-03-01T00:07:02.500000Z")
    assert [(h["event_type"].removeprefix("lab.command."), h["status"])
            for h in done["history"]] == [
        ("CommandIssued", "ISSUED"), ("CommandDispatched", "DISPATCHED"),
        ("CommandAccepted", "ACCEPTED"), ("CommandStarted", "STARTED"),
        ("CommandProgress", "STARTED"), ("CommandProgress", "STARTED"),
        ("CommandCompleted", "COMPLETED")]  # the re-sent dispatch and report dropped
    assert done["history"][1]["detail"]["command_type"] == "tare"
    assert [h["detail"] for h in done["history"][4:6]] == [
        {"progress": 0.4, "remaining_s": 6.0, "intermediate": {"mass_g": 5}},
        {"progress": 0.8, "remaining_s": 1.5, "intermediate": {"mass_g": 10}}]
    # older events after newer ones: in the history by time, the status still STARTED
    regress = api.get("/commands/c-regress").json()
    assert regress["status"] == "STARTED" and regress["progress"] == 0.8
    assert [h["status"] for h in regress["history"]] == [
        "ISSUED", "DISPATCHED", "DISPATCHED", "ACCEPTED", "ACCEPTED", "STARTED", "STARTED",
        "STARTED"]
    assert [h["detail"].get("progress") for h in regress["history"][-2:]] == [0.4, 0.8]
    assert api.get("/commands", params={"device": "nobody"}).json() == {
        "items": [], "next_cursor": None}


def test_alert_routes(api):
    # other tests of the session (the API contract's seed) add alerts of their own devices
    items, pages = walk_pages(api, "/alerts", limit=1)
    mine = [a for a in items if a["device_id"].startswith("rs-")]
    assert pages == len(items) and [a["score"] for a in mine] == [178.0, 7.5, 28.0]  # oldest 1st
    since = [a for a in api.get("/alerts", params={"since": "2026-03-01T00:03:20Z"}).json()[
        "items"] if a["device_id"].startswith("rs-")]
    assert [a["detected_at"] for a in since] == ["2026-03-01T00:03:20Z", "2026-03-01T00:05:00Z"]
    ph = api.get("/alerts", params={"device": PH}).json()["items"]
    assert [(a["metric"], a["rule"], a["window_count"]) for a in ph] == [("ph", "zscore", 120)]


@pytest.mark.parametrize("path,params,status,phrase", [
    ("/commands", {"status": "DONE"}, 422, "status"),
    ("/commands", {"cursor": cursor.encode("x")}, 400, "first_at"),
    ("/commands", {"cursor": cursor.encode("2026-03-01T00:00:00+00:00", 3)}, 400,
     "command_id must be a string"),
    ("/commands/no-such-command", {}, 404, "no-such-command"),
    ("/commands/nul%00command", {}, 404, "nul"),
    ("/devices", {"status": "ASLEEP"}, 422, "status"),
    ("/devices", {"type": "balance", "device_type": "ph-meter"}, 400, "device_type"),
    ("/alerts", {"since": "yesterday"}, 422, "since"),
    ("/alerts", {"since": "2026-03-01T00:00:00"}, 422, "offset"),
    ("/alerts", {"cursor": cursor.encode("2026-03-01T00:00:00+00:00", "x")}, 400,
     "alert_id must be a uuid"),
])
def test_bad_parameters_get_4xx_with_a_message(api, path, params, status, phrase):
    r = api.get(path, params=params)
    assert r.status_code == status, r.text
    assert phrase in r.json()["detail"] and set(r.json()) == {"detail", "errors"}


def test_the_api_role_reads_the_new_tables_and_cannot_write_them(projector, cfg):
    async def attempt():
        con = await asyncpg.connect(cfg.postgres_api_dsn)
        try:
            for table in ("commands", "command_events", "alerts", "device_status_history"):
                assert await con.fetchval(f"SELECT count(*) FROM {table}") > 0
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await con.execute(f"DELETE FROM {table}")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await con.execute("UPDATE devices SET status = 'ERROR'")
        finally:
            await con.close()

    run(attempt())


SNAPSHOT = {
    "devices": "SELECT * FROM devices WHERE device_id LIKE 'rs-%' ORDER BY device_id",
    "device_status_history": "SELECT xmin::text, * FROM device_status_history "
                             "WHERE device_id LIKE 'rs-%' ORDER BY event_id",
    "commands": "SELECT xmin::text, * FROM commands WHERE device_id = 'rs-bal-1' "
                "ORDER BY command_id",
    "command_events": "SELECT xmin::text, * FROM command_events WHERE device_id = 'rs-bal-1' "
                      "ORDER BY event_id",
    "alerts": "SELECT xmin::text, * FROM alerts WHERE device_id LIKE 'rs-%' ORDER BY alert_id",
}


def test_a_full_replay_changes_nothing(projector, cfg):
    """The projector stopped, its positions of these topics forgotten, restarted: it reads them
    all again, and every row is as it was (rows with xmin: not even rewritten)."""
    def snapshot():
        return {name: [tuple(r) for r in run(fetch(cfg.postgres_dsn, sql))]
                for name, sql in SNAPSHOT.items()}

    names = [topic_name(cfg, spec) for spec in TOPICS]
    positions_sql = ("SELECT topic, partition, next_offset FROM projection_positions "
                     "WHERE projection = 'postgres' AND topic = ANY($1) ORDER BY 1, 2")
    def positions():
        return {(r["topic"], r["partition"]): r["next_offset"]
                for r in run(fetch(cfg.postgres_dsn, positions_sql, names))}

    before, reached = snapshot(), positions()
    assert sum(reached.values()) >= len(EVENTS)
    projector.stop_all()
    run(fetch(cfg.postgres_dsn, "DELETE FROM projection_positions WHERE topic = ANY($1)", names))
    assert positions() == {}
    projector.start("project", "postgres")
    wait_for(lambda: all(positions().get(tp, -1) >= n for tp, n in reached.items()), 60,
             "the replay to reach the former positions")
    assert snapshot() == before


def test_migration_0005_reranks_stored_commands_and_keeps_them_from_regressing(base_env):
    """A database with commands projected before CommandDispatched existed (ranks ISSUED 1,
    ACCEPTED 2, STARTED 3, COMPLETED 6): migration 0005 re-ranks them, names their events and
    takes the CommandStarted's progress as the latest report; later events projected on top
    move nothing back."""
    base = config.load(base_env)
    name = f"labbus_cmdmig_{uuid.uuid4().hex[:8]}"
    dsn = postgres.create_database(base, name)
    old = Path(tempfile.mkdtemp())
    ids = {k: uuid.uuid4() for k in ("i1", "a1", "s1", "c1", "i2", "s2")}
    rows = [  # (event, command, old status, old rank, seconds, detail)
        ("i1", "m-done", "ISSUED", 1, 0, '{"command_type": "tare"}'),
        ("a1", "m-done", "ACCEPTED", 2, 1, "{}"),
        ("s1", "m-done", "STARTED", 3, 2, '{"progress": 0.5}'),
        ("c1", "m-done", "COMPLETED", 6, 3, '{"result": {"mass_g": 1}}'),
        ("i2", "m-run", "ISSUED", 1, 60, "{}"),
        ("s2", "m-run", "STARTED", 3, 62, "{}")]
    late = [  # an older-status event with an id of its own, and a progress report
        _e(CommandDispatched, "rs-mig", 60.5, command_id="m-run", idempotency_key="k",
           command_type="tare", payload_json="{}", expires_at=at(90), issued_by="bob"),
        _e(CommandAccepted, "rs-mig", 1, command_id="m-done"),
        _e(CommandProgress, "rs-mig", 63, command_id="m-run", progress=0.3,
           intermediate_json='{"mass_g": 0.2}')]

    async def go():
        for path in sorted(MIGRATIONS.glob("*.sql")):
            if path.stem < "0005":
                shutil.copy(path, old)
        con = await asyncpg.connect(dsn)
        try:
            assert (await migrate(con, old))[-1] == "0004_devices_commands_alerts"
            await con.executemany(
                "INSERT INTO command_events (event_id, command_id, device_id, status, "
                "status_rank, occurred_at, source, detail) VALUES ($1, $2, 'rs-mig', $3, $4, "
                "$5, 'old', $6::jsonb)",
                [(ids[e], c, s, r, at(t), d) for e, c, s, r, t, d in rows])
            await con.execute("""
                INSERT INTO commands (command_id, device_id, status, status_rank, status_at,
                                      status_event_id, progress, first_at, updated_at)
                VALUES ('m-done', 'rs-mig', 'COMPLETED', 6, $1, $2, 0.5, $3, $1),
                       ('m-run', 'rs-mig', 'STARTED', 3, $4, $5, NULL, $6, $4)""",
                at(3), ids["c1"], at(0), at(62), ids["s2"], at(60))
            assert (await migrate(con))[0] == "0005_command_dispatched_progress"
            events = await con.fetch("SELECT event_id, status_rank, event_type "
                                     "FROM command_events")
            assert {r["event_id"]: (r["status_rank"], r["event_type"]) for r in events} == {
                ids[e]: (pd.COMMAND_RANK[s], next(t for t, st in pd.COMMAND_STATUS.items()
                                                 if st == s))
                for e, _, s, _, _, _ in rows}
            stored = {r["command_id"]: r for r in await con.fetch("SELECT * FROM commands")}
            assert stored["m-done"]["status_rank"] == pd.COMMAND_RANK["COMPLETED"]
            assert (stored["m-done"]["progress"], stored["m-done"]["progress_at"],
                    stored["m-done"]["progress_event_id"]) == (0.5, at(2), ids["s1"])
            assert stored["m-run"]["status_rank"] == pd.COMMAND_RANK["STARTED"]
            assert stored["m-run"]["progress_at"] is None
        finally:
            await con.close()

    try:
        run(go())
        apply_each(base, TopicPartition("rs-mig.commands", 0), enumerate(late), dsn=dsn)
        after = {r["command_id"]: r for r in run(fetch(dsn, "SELECT * FROM commands"))}
    finally:
        shutil.rmtree(old)
        postgres.drop_database(base, name)
    assert (after["m-done"]["status"], after["m-done"]["status_event_id"]) == (
        "COMPLETED", ids["c1"])
    assert (after["m-run"]["status"], after["m-run"]["status_event_id"]) == ("STARTED", ids["s2"])
    assert (after["m-run"]["progress"], after["m-run"]["intermediate"]) == (
        0.3, '{"mass_g": 0.2}')
    assert after["m-run"]["command_type"] == "tare"  # the dispatch's copy fills the gaps
