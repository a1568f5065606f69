"""The quota processor's decisions (pure functions) and its handler's routing (forward or
decide), and the experiment processor's side: start on QuotaReserved, cancel."""

from __future__ import annotations

import json

from labbus.events.codec import default_codec
from labbus.events.faust_runtime import Shared
from labbus.events.model import (
    ExperimentCancelled,
    ExperimentCancelRequested,
    ExperimentCompleted,
    ExperimentFailed,
    ExperimentRejected,
    ExperimentRequested,
    QuotaGranted,
    QuotaRefunded,
    QuotaReserved,
    RecipesProposed,
    RobotRunRequested,
    RoleGranted,
    RoleRevoked,
    UserRegistered,
    WellScored,
)
from labbus.events.runtime import Outgoing, Record
from labbus.processors import experiment, quota
from tests.unit.test_campaign import reader, request
from tests.unit.test_campaign_state import readings_of, reserved

USER = "u-student"


def registered(roles=("student",), user=USER):
    return UserRegistered.create(source="t", subject=user, sequence=0, user_id=user,
                                 email=f"{user}@lab.example", roles=list(roles),
                                 registered_by="t")


def granted(wells, user=USER):
    return QuotaGranted.create(source="t", subject=user, sequence=0, user_id=user, wells=wells,
                               granted_by="t")


def req(i, wells=24, user=USER):
    xid = f"x{i}"
    return ExperimentRequested.create(
        source="t", subject=xid, sequence=1, experiment_id=xid, target_hex=None,
        target_lab=[50.0, 10.0, -20.0], dyes=["red", "yellow"], budget_wells=wells,
        batch_size=8, tolerance_de=2.0, requested_by=user)


def completed(xid, used):
    return ExperimentCompleted.create(source="experiment", subject=xid, sequence=9,
                                      experiment_id=xid, best_well="A1",
                                      best_volumes={"red": 1.0}, best_de=1.0, wells_used=used,
                                      reason="t")


def feed(user, *events):
    out = []
    for e in events:
        user, more = quota.decide(user, e)
        user = json.loads(json.dumps(user))  # the Table's JSON round trip
        out += more
    return user, out


def test_fifty_requests_of_one_user_never_exceed_the_balance():
    u, out = feed(quota.new_user(USER), registered(), granted(200),
                  *[req(i) for i in range(50)])
    ok = [e for e in out if isinstance(e, QuotaReserved)]
    no = [e for e in out if isinstance(e, ExperimentRejected)]
    assert len(ok) == 8 and len(no) == 42 and u["balance"] == 200 - 8 * 24
    assert all(e.charged and e.user_id == USER for e in ok)
    assert [e.remaining for e in ok] == [200 - 24 * k for k in range(1, 9)]
    assert no[0].reason.startswith("quota_exceeded: ")
    assert "asks for 24 wells" in no[0].reason and "balance of u-student is 8" in no[0].reason
    assert "200 granted, 192 reserved" in no[0].reason
    # refunds: the unused wells come back, and the balance adds up
    u, back = feed(u, *[completed(e.experiment_id, used=8 + k) for k, e in enumerate(ok)])
    assert [e.wells for e in back] == [24 - 8 - k for k in range(8)]
    assert u["balance"] == 200 - sum(8 + k for k in range(8)) and u["open"] == {}
    assert all(isinstance(e, QuotaRefunded) and e.charged for e in back)
    assert back[-1].remaining == u["balance"]


def test_a_student_without_a_grant_has_nothing_to_spend_others_are_not_limited():
    _, out = feed(quota.new_user(USER), registered(), req(1, wells=1))
    assert isinstance(out[0], ExperimentRejected) and "quota_exceeded" in out[0].reason
    # a researcher, and a requester lab.users does not know: reserved, uncharged
    for user in (feed(quota.new_user("r"), registered(("researcher",), "r"))[0],
                 quota.new_user("cli-operator")):
        u, out = feed(user, req(1, wells=96, user=user["id"]))
        assert isinstance(out[0], QuotaReserved) and not out[0].charged
        assert out[0].remaining is None and u["balance"] == 0
        u, back = feed(u, completed("x1", used=40))
        assert back[0].wells == 56 and not back[0].charged and u["balance"] == 0
    # a researcher granted a quota is limited by it; losing the student role does not unlimit
    u, out = feed(quota.new_user("r"), registered(("researcher",), "r"), granted(10, "r"),
                  req(1, wells=24, user="r"))
    assert isinstance(out[0], ExperimentRejected)
    student = RoleRevoked.create(source="t", subject=USER, sequence=0, user_id=USER,
                                 role="student", revoked_by="t")
    u, out = feed(quota.new_user(USER), registered(), student, req(2, wells=24))
    assert isinstance(out[0], QuotaReserved) and not out[0].charged
    again = RoleGranted.create(source="t", subject=USER, sequence=0, user_id=USER,
                               role="student", granted_by="t")
    u, out = feed(u, again, req(3, wells=24))
    assert isinstance(out[0], ExperimentRejected)


def test_every_end_closes_the_reservation_once():
    u, _ = feed(quota.new_user(USER), registered(), granted(100), req(1), req(2), req(3),
                req(4))
    assert u["balance"] == 4
    failed = ExperimentFailed.create(source="e", subject="x2", sequence=9, experiment_id="x2",
                                     reason="robot", wells_used=8, best_de=None)
    cancelled = ExperimentCancelled.create(source="e", subject="x3", sequence=9,
                                           experiment_id="x3", reason="r", cancelled_by="s",
                                           wells_used=16, best_de=None)
    rejected = ExperimentRejected.create(source="e", subject="x4", sequence=1,
                                         experiment_id="x4", reason="bad dyes")
    u, back = feed(u, completed("x1", 24), failed, cancelled, rejected, completed("x1", 24))
    assert [(e.experiment_id, e.wells, e.wells_used) for e in back] == [
        ("x1", 0, 24), ("x2", 16, 8), ("x3", 8, 16), ("x4", 24, 0)]
    assert u["balance"] == 4 + 16 + 8 + 24 and u["open"] == {}


def test_repeats_decide_nothing_and_ids_derive_from_the_inputs():
    first = req(1)
    u, out = feed(quota.new_user(USER), registered(), granted(50), first)
    again, nothing = quota.decide(u, first)  # the same record forwarded twice
    assert nothing == [] and again is u
    other = req(1)  # another request for the open experiment: the first counts
    u2, nothing = feed(u, other)
    assert nothing == [] and u2["balance"] == u["balance"]
    u3, twice = feed(u, granted(50))
    same = granted(50)
    u3, _ = feed(u3, same, same)
    assert u3["balance"] == u["balance"] + 100
    _, replay = feed(quota.new_user(USER), registered(), granted(50), first)
    assert [e.event_id for e in replay] == [e.event_id for e in out]
    # budgets the experiment processor refuses itself are not judged here
    assert feed(u, req(7, wells=0))[1] == [] and feed(u, req(8, wells=97))[1] == []
    before = json.loads(json.dumps(u))
    quota.decide(u, req(9))
    assert u == before  # not modified


INBOX, USERS, EXPERIMENTS = "ns.lab.quota.inbox", "ns.lab.users", "ns.lab.experiments"


def handle(state, event, topic, key=None):
    data = default_codec().encode(event)
    rec = Record(topic, 0, 1, (key or event.key.decode()).encode(), data, 1)
    return quota.handle(state, event, rec, Shared(), users=USERS, experiments=EXPERIMENTS,
                        inbox=INBOX), data


def test_the_handler_forwards_by_user_then_decides():
    (state, out), data = handle(None, granted(30), USERS)
    assert state is None and out == [Outgoing(INBOX, USER.encode(), data)]
    r = req(1)
    (state, out), data = handle(None, r, EXPERIMENTS)
    assert out == [Outgoing(INBOX, USER.encode(), data)] and state == {"x": {"user": USER}}
    assert handle(state, req(1), EXPERIMENTS)[0] == (state, [])  # open: the first counts
    (gone, out), data = handle(state, completed("x1", 3), EXPERIMENTS)
    assert gone is None and out == [Outgoing(INBOX, USER.encode(), data)]
    assert handle(None, completed("x1", 3), EXPERIMENTS)[0] == (None, [])
    # decided on the inbox, keyed by user; an experiment id equal to a user id touches nothing
    (u, _), _ = handle({"x": {"user": "someone"}}, granted(30), INBOX)
    (u, out), _ = handle(u, r, INBOX)
    assert isinstance(out[0], QuotaReserved) and u["x"] == {"user": "someone"}
    assert u["u"]["balance"] == 6 and u["u"]["id"] == USER


def test_a_campaign_starts_on_its_reservation_and_stops_on_cancel():
    r = request()
    shared = Shared({})

    def at(state, event, t):
        new, out = experiment.handle(state, event, Record("t", 0, t, b"x1", b"", t), shared)
        shared.apply()
        return (None if new is None else json.loads(json.dumps(new))), out

    state, out = at(None, r, 1)
    assert out == [] and "request" in state
    # refused by the quota processor: forgotten
    no = ExperimentRejected.create(source="quota", subject="x1", sequence=1, experiment_id="x1",
                                   reason="quota_exceeded: ...")
    assert at(state, no, 2) == (None, [])
    # cancelled while waiting for the reservation: nothing used, the reservation is dropped
    cancel = ExperimentCancelRequested.create(source="cli", subject="x1", sequence=0,
                                              experiment_id="x1", reason="oops",
                                              requested_by="sam")
    waiting, out = at(state, cancel, 3)
    early = out[0]
    assert waiting == {"cancelled": True} and early.wells_used == 0
    assert isinstance(out[0], ExperimentCancelled) and out[0].cancelled_by == "sam"
    assert at(waiting, reserved(r), 4) == (None, [])
    # reserved: the first batch; cancelled with the run in flight: no batch after it
    state, out = at(state, reserved(r), 5)
    run = next(e for e in out if isinstance(e, RobotRunRequested))
    state, out = at(state, cancel, 6)
    assert isinstance(out[0], ExperimentCancelled) and out[0].wells_used == len(run.recipes)
    assert out[0].event_id == early.event_id  # one id per campaign, whenever it was cancelled
    later = []
    for t, reading in enumerate(readings_of(run, reader(seed=3)), start=7):
        state, more = at(state, reading, t)
        later += more
    assert state is None  # settled: the run's wells are scored, nothing else happens
    assert all(isinstance(e, WellScored) for e in later) and len(later) == len(run.recipes)
    assert not any(isinstance(e, RecipesProposed) for e in later)
