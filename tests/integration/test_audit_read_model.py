"""The activity log through the PostgreSQL projection code against the real database: a row per
command event carrying an actor, its outcome from the decision caused by it (whichever is
projected first), replays changing nothing, events without an actor leaving no trace."""

from __future__ import annotations

import uuid

from aiokafka import TopicPartition

from labbus.events.codec import default_codec
from labbus.events.colour_target import request_experiment
from labbus.events.model import (
    AccessDenied,
    Actor,
    CommandDispatched,
    CommandRejected,
    ExperimentRejected,
    RecipesProposed,
    issue_command,
)
from labbus.events.runtime import Positioned
from labbus.projections.postgres import PostgresProjection
from tests.conftest import run

RUN = uuid.uuid4().hex[:8]


def test_command_events_and_their_outcomes_make_the_activity_log(cfg):
    student = Actor(f"stu-{RUN}", ("student",), "10.1.2.3", "labbus-cli/1", "jti-s")
    operator = Actor(f"op-{RUN}", ("operator",), "10.1.2.4", "curl/8", "jti-o")
    accepted_req = request_experiment("#7a3cc0", 16, 8, ["red", "yellow", "blue"],
                                      student.user_id, actor=student)
    rejected_req = request_experiment("#7a3cc0", 16, 8, ["red", "red"], student.user_id,
                                      actor=student)
    cmd_ok = issue_command(f"dev-{RUN}", "measure", {}, 30, "k1", operator.user_id,
                           actor=operator)
    cmd_bad = issue_command(f"dev-{RUN}", "measure", {}, 30, "k2", operator.user_id,
                            actor=operator)
    no_actor = issue_command(f"dev-{RUN}", "measure", {}, 30, "k3", "cli-user")
    denied = AccessDenied.create(source="gw", subject=student.user_id, sequence=0, actor=student,
                                 user_id=student.user_id, permission="command:send",
                                 request="POST /commands", reason="not for students")

    def caused(cls, cause, **payload):
        return cls.create(source="t", subject=cause.envelope.subject, sequence=1,
                          causation_id=cause.event_id, **payload)

    proposed = caused(RecipesProposed, accepted_req, experiment_id=accepted_req.experiment_id,
                      iteration=0, recipes=[], predicted_de=None, note="first batch")
    refused = caused(ExperimentRejected, rejected_req, experiment_id=rejected_req.experiment_id,
                     reason="dyes repeat: red, red")
    dispatched = caused(CommandDispatched, cmd_ok, **{
        f: getattr(cmd_ok, f) for f in CommandDispatched.__dataclass_fields__
        if f not in ("envelope", "TYPE")})
    cmd_refused = caused(CommandRejected, cmd_bad, command_id=cmd_bad.command_id,
                         device_id=cmd_bad.device_id, reason_code="device_unknown",
                         reason="no such device")
    codec = default_codec()
    tp = TopicPartition(f"audit-test-{RUN}", 0)
    # the rejection of the second request is projected before the request itself
    order = [accepted_req, refused, proposed, rejected_req, cmd_ok, dispatched, cmd_bad,
             cmd_refused, no_actor, denied]
    events = [Positioned(tp, i, *codec.decode_record(codec.encode(e), plain=True))
              for i, e in enumerate(order)]
    ids = [str(e.event_id) for e in (accepted_req, rejected_req, cmd_ok, cmd_bad, denied,
                                     no_actor)]

    async def go():
        projection = PostgresProjection(cfg)
        await projection.start()
        try:
            await projection.apply(events, {})
            query = ("SELECT event_id::text, user_id, roles, client_ip, user_agent, token_id, "
                     "action, subject, outcome, reason FROM audit WHERE event_id = ANY($1::uuid[])"
                     " ORDER BY event_id")
            first = [dict(r) for r in await projection.pool.fetch(query, ids)]
            await projection.apply(events, {})  # a replay
            again = [dict(r) for r in await projection.pool.fetch(query, ids)]
            return first, again
        finally:
            await projection.stop()

    first, again = run(go())
    assert again == first
    rows = {r["event_id"]: r for r in first}
    assert set(rows) == set(ids[:5])  # the command without an actor is not in the log
    a = rows[str(accepted_req.event_id)]
    assert (a["user_id"], a["roles"], a["client_ip"], a["user_agent"], a["token_id"]) == (
        student.user_id, ["student"], "10.1.2.3", "labbus-cli/1", "jti-s")
    assert (a["action"], a["subject"], a["outcome"]) == (
        "experiment:start", accepted_req.experiment_id, "accepted")
    r = rows[str(rejected_req.event_id)]
    assert (r["user_id"], r["outcome"], r["reason"]) == (
        student.user_id, "rejected", "dyes repeat: red, red")
    c = rows[str(cmd_ok.event_id)]
    assert (c["user_id"], c["action"], c["outcome"]) == (operator.user_id, "command:send",
                                                         "accepted")
    b = rows[str(cmd_bad.event_id)]
    assert (b["outcome"], b["reason"]) == ("rejected", "no such device")
    d = rows[str(denied.event_id)]
    assert (d["user_id"], d["client_ip"], d["action"], d["subject"], d["outcome"]) == (
        student.user_id, "10.1.2.3", "command:send", "POST /commands", "denied")
