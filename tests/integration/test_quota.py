"""Quotas against the real broker and PostgreSQL: `labbus process quota` (and, for cancel, the
experiment processor, the OT-2 agent, the plate reader) started as a user starts them.

Each test works with its own user and experiment ids and ignores everything else in the
session's namespace."""

from __future__ import annotations

import asyncio
import subprocess
import uuid

import asyncpg

from labbus.events import kafka
from labbus.events.codec import default_codec
from labbus.events.model import (
    Event,
    ExperimentCancelled,
    ExperimentCompleted,
    ExperimentRejected,
    ExperimentRequested,
    QuotaGranted,
    QuotaRefunded,
    QuotaReserved,
    RobotRunRequested,
    UserRegistered,
    WellScored,
)
from labbus.events.topics import EXPERIMENTS, QUOTA_INBOX, ROBOT_RUNS, topic_name
from tests.conftest import LABBUS, REPO, read_topic, run, wait_for

BUDGET = 24
GRANT = 200


def student(cfg, wells: int) -> str:
    """A student with a grant of `wells`, as `labbus users add/quota` publish them; returns
    the user id once the quota processor has forwarded both events (so they are decided
    before any request published afterwards)."""
    user = f"student-{uuid.uuid4().hex[:8]}"
    events = [UserRegistered.create(source="t", subject=user, sequence=0, user_id=user,
                                    email=f"{user}@lab.example", roles=["student"],
                                    registered_by="t"),
              QuotaGranted.create(source="t", subject=user, sequence=0, user_id=user,
                                  wells=wells, granted_by="t")]
    run(kafka.publish(cfg, *events))
    wait_for(lambda: len(of_key(cfg, QUOTA_INBOX, user)) >= 2, 90,
             "the quota processor to forward the user's events")
    return user


def of_key(cfg, spec, key: str) -> list[Event]:
    codec = default_codec()
    out = []
    for r in run(read_topic(cfg, topic_name(cfg, spec))):
        if r.key == key.encode():
            try:
                out.append(codec.decode(r.value))
            except ValueError:
                continue  # another test's junk
    return out


def experiment_events(cfg, xids: set[str], spec=EXPERIMENTS) -> list[Event]:
    codec = default_codec()
    out = []
    for r in run(read_topic(cfg, topic_name(cfg, spec))):
        if r.key is None or r.key.decode("utf-8", "replace") not in xids:
            continue
        try:
            out.append(codec.decode(r.value))
        except ValueError:
            continue
    return out


def requests(user: str, n: int, tag: str) -> list[ExperimentRequested]:
    return [ExperimentRequested.create(
        source="t", subject=f"{tag}-{i}", sequence=1, experiment_id=f"{tag}-{i}",
        target_hex=None, target_lab=[50.0, 10.0, -20.0], dyes=["red", "yellow"],
        budget_wells=BUDGET, batch_size=8, tolerance_de=2.0, requested_by=user)
        for i in range(n)]


async def publish_at_once(cfg, events: list[Event]) -> None:
    """Every event handed to the producer before any ack is awaited: concurrent requests."""
    await kafka.ensure_topics(cfg)
    codec = default_codec()
    producer = kafka.producer(cfg)
    await producer.start()
    try:
        topic = topic_name(cfg, EXPERIMENTS)
        futures = [await producer.send(topic, codec.encode(e), key=e.key) for e in events]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def decisions(cfg, xids: set[str]) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = {}
    for e in experiment_events(cfg, xids):
        if isinstance(e, (QuotaReserved, ExperimentRejected, QuotaRefunded)):
            out.setdefault(e.experiment_id, []).append(e)
    return out


async def pg(cfg, sql: str, *args):
    con = await asyncpg.connect(cfg.postgres_dsn)
    try:
        return await con.fetch(sql, *args)
    finally:
        await con.close()


def remaining(cfg, user: str):
    rows = run(pg(cfg, "SELECT quota_remaining FROM users WHERE user_id = $1", user))
    return rows[0]["quota_remaining"] if rows else "no row"


def check_fifty(cfg, user: str, xids: set[str]) -> dict[str, Event]:
    """Exactly 8 of the 50 reserved, the 42 others rejected (quota_exceeded), one decision
    each (distinct ids: a decision re-sent after a crash has the same id)."""
    wait_for(lambda: len(decisions(cfg, xids)) == len(xids), 120,
             "a quota decision on every request")
    decided = {}
    for xid, events in decisions(cfg, xids).items():
        kinds = {type(e) for e in events}
        assert len(kinds) == 1 and len({e.event_id for e in events}) == 1, (xid, events)
        decided[xid] = events[0]
    ok = [e for e in decided.values() if isinstance(e, QuotaReserved)]
    no = [e for e in decided.values() if isinstance(e, ExperimentRejected)]
    assert len(ok) == GRANT // BUDGET == 8 and len(no) == 42, (len(ok), len(no))
    assert all(e.charged and e.user_id == user and e.wells == BUDGET for e in ok)
    assert sorted(e.remaining for e in ok) == [GRANT - BUDGET * k for k in range(8, 0, -1)]
    assert all(e.reason.startswith("quota_exceeded: the campaign asks for 24 wells, the "
                                   f"balance of {user} is 8 ") for e in no), no[0].reason
    return decided


def test_fifty_concurrent_requests_of_one_user_never_exceed_the_balance(cfg, processes):
    processes.start("process", "quota")
    processes.start("project", "postgres")
    user = student(cfg, GRANT)
    tag = f"q50-{uuid.uuid4().hex[:6]}"
    reqs = requests(user, 50, tag)
    xids = {r.experiment_id for r in reqs}
    run(publish_at_once(cfg, reqs))
    decided = check_fifty(cfg, user, xids)
    wait_for(lambda: remaining(cfg, user) == GRANT - 8 * BUDGET, 60,
             "users.quota_remaining after the reservations")

    # the eight campaigns end (as the experiment processor would say), each using some wells
    ok = sorted(xid for xid, e in decided.items() if isinstance(e, QuotaReserved))
    used = {xid: 5 + 2 * k for k, xid in enumerate(ok)}
    run(kafka.publish(cfg, *[ExperimentCompleted.create(
        source="t", subject=xid, sequence=9, experiment_id=xid, best_well="A1",
        best_volumes={"red": 1.0}, best_de=1.0, wells_used=n, reason="t")
        for xid, n in used.items()]))
    refunds = {}
    wait_for(lambda: len(refunds.update({e.experiment_id: e for es in decisions(
        cfg, set(ok)).values() for e in es if isinstance(e, QuotaRefunded)}) or refunds) == 8,
        60, "a refund per campaign")
    assert {x: e.wells for x, e in refunds.items()} == {x: BUDGET - n for x, n in used.items()}
    assert sum(e.wells for e in refunds.values()) == 8 * BUDGET - sum(used.values())
    final = GRANT - sum(used.values())
    assert max(refunds.values(), key=lambda e: e.envelope.sequence).remaining == final
    wait_for(lambda: remaining(cfg, user) == final, 60, "users.quota_remaining after refunds")
    rows = run(pg(cfg, "SELECT kind, count(*) AS n, sum(spent_delta) AS spent FROM quota_ledger "
                       "WHERE user_id = $1 GROUP BY kind ORDER BY kind", user))
    assert [(r["kind"], r["n"], r["spent"]) for r in rows] == [
        ("refunded", 8, -(8 * BUDGET - sum(used.values()))), ("reserved", 8, 8 * BUDGET)]


def test_kill_9_of_the_quota_processor_mid_stream_changes_no_decision(cfg, processes):
    # one name across the restart (static membership): the restarted processor takes the
    # killed one's partitions at once instead of waiting out its 10 s session
    member = {"LABBUS_GROUP_INSTANCE_ID": "qkill-quota-0"}
    first = processes.start("process", "quota", extra_env=member)
    user = student(cfg, GRANT)
    tag = f"qkill-{uuid.uuid4().hex[:6]}"
    reqs = requests(user, 50, tag)
    xids = {r.experiment_id for r in reqs}
    run(publish_at_once(cfg, reqs))
    wait_for(lambda: decisions(cfg, xids), 60, "the first decision", interval=0.05)
    first.kill()  # SIGKILL, mid-stream (or just after: the decisions are on the broker anyway)
    first.wait(10)
    seen_before = sum(len(v) for v in decisions(cfg, xids).values())
    processes.start("process", "quota", extra_env=member)
    check_fifty(cfg, user, xids)
    print(f"\n{seen_before} of 50 decisions were on the broker at the kill -9")


def test_cancel_ends_a_running_campaign_and_refunds(own_cfg, processes):
    # a namespace of its own: in the session's, the experiment processor also runs every
    # campaign earlier tests reserved (16 in this file alone: 41 robot runs beside this one's
    # two, 40-80 s instead of ~11 s, and an agent still mid-run at the teardown)
    cfg = own_cfg
    processes.start("process", "experiment")  # and the quota processor (tests/conftest.py)
    processes.start("agent", "ot2", "--simulate")
    processes.start("agent", "reader", "--delay", "0.3")
    processes.start("project", "postgres")
    user = student(cfg, 96)
    xid = f"qcancel-{uuid.uuid4().hex[:6]}"
    req = ExperimentRequested.create(
        source="t", subject=xid, sequence=1, experiment_id=xid, target_hex=None,
        target_lab=[50.0, 10.0, -20.0], dyes=["red", "yellow", "blue"], budget_wells=96,
        batch_size=8, tolerance_de=0.01, requested_by=user)  # too strict to finish soon
    run(kafka.publish(cfg, req))
    wait_for(lambda: any(isinstance(e, WellScored) for e in experiment_events(cfg, {xid})),
             120, "the campaign to score its first well")
    cli = subprocess.run([LABBUS, "experiment", "cancel", xid, "--reason", "test"],
                         env=processes.env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    wait_for(lambda: any(isinstance(e, QuotaRefunded) for e in experiment_events(cfg, {xid})),
             60, "the refund")
    events = experiment_events(cfg, {xid})
    (cancelled,) = [e for e in events if isinstance(e, ExperimentCancelled)]
    (refund,) = [e for e in events if isinstance(e, QuotaRefunded)]
    assert cancelled.reason == "test" and cancelled.wells_used < 96
    assert refund.wells == 96 - cancelled.wells_used and refund.remaining == refund.wells
    # no batch after the cancel: every well sent to the robot is counted by it
    runs = [e for e in experiment_events(cfg, {xid}, ROBOT_RUNS)
            if isinstance(e, RobotRunRequested)]
    assert sum(len(r.recipes) for r in runs) == cancelled.wells_used
    assert not any(type(e).__name__ in ("ExperimentCompleted", "ExperimentFailed")
                   for e in events)
    wait_for(lambda: run(pg(cfg, "SELECT status FROM experiments WHERE experiment_id = $1",
                            xid)) == [("cancelled",)], 60, "the experiment shown cancelled")
    wait_for(lambda: remaining(cfg, user) == 96 - cancelled.wells_used, 60,
             "users.quota_remaining after the refund")
