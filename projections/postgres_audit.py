"""The activity log (migration 0007) from the actor on command events and from the decisions
taken on them, written by the PostgreSQL view (projections/postgres.py) in its transaction.

Any event carrying an actor (the command gateway puts it on what it publishes) is a row: who,
what (`action`, the permission it exercised), when, from which IP and user agent, with which
token. The event that decides it sets the outcome (`accepted` or `rejected` with the reason, or
`denied` for the gateway's refusals) on the row of the event that caused it. Both are upserts
keyed by the command event's id: replays change nothing, and the order in which a request and
its outcome are projected does not matter.
"""

from __future__ import annotations

from datetime import UTC, datetime

from labbus.events import model as m
from labbus.events.runtime import Positioned

# command event type -> the permission it exercised (identity.PERMISSIONS)
ACTIONS = {
    m.CommandIssued.TYPE: "command:send",
    m.ExperimentRequested.TYPE: "experiment:start",
    m.ExperimentCancelRequested.TYPE: "experiment:cancel",
    m.ServiceRequestSubmitted.TYPE: "service-request:submit",
    m.SampleRegistered.TYPE: "service-request:submit",
    m.InspectionRecorded.TYPE: "result:record",
    m.ExecutionAbortRequested.TYPE: "execution:abort",
}

_ASKED = """
INSERT INTO audit (event_id, at, user_id, roles, client_ip, user_agent, token_id, action,
                   event_type, subject)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (event_id) DO UPDATE SET
    at = EXCLUDED.at, user_id = EXCLUDED.user_id, roles = EXCLUDED.roles,
    client_ip = EXCLUDED.client_ip, user_agent = EXCLUDED.user_agent,
    token_id = EXCLUDED.token_id, action = EXCLUDED.action, event_type = EXCLUDED.event_type,
    subject = EXCLUDED.subject
"""
# the first decision stands (a replayed or repeated one changes nothing), except that a
# rejection overrides an acceptance: one processor may pass a request another then refuses
_DECIDED = """
INSERT INTO audit (event_id, outcome, reason, outcome_at, outcome_event)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (event_id) DO UPDATE SET
    outcome = EXCLUDED.outcome, reason = EXCLUDED.reason, outcome_at = EXCLUDED.outcome_at,
    outcome_event = EXCLUDED.outcome_event
WHERE audit.outcome_event IS NULL
   OR (EXCLUDED.outcome = 'rejected' AND audit.outcome <> 'rejected')
"""


_DENIED = """
INSERT INTO audit (event_id, at, user_id, roles, client_ip, user_agent, token_id, action,
                   event_type, subject, outcome, reason, outcome_at, outcome_event)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'denied', $11, $2, $1)
ON CONFLICT (event_id) DO NOTHING
"""


def _ts(micros: int) -> datetime:
    return datetime.fromtimestamp(micros / 1e6, UTC)


def asked(p: Positioned) -> list[tuple[str, tuple]]:
    r = p.record
    a = r["actor"]
    return [(_ASKED, (r["event_id"], _ts(r["occurred_at"]), a["user_id"], a["roles"],
                      a["client_ip"], a["user_agent"], a["token_id"],
                      ACTIONS.get(p.event_type, p.event_type), p.event_type, r["subject"]))]


def _decided(outcome: str, reason_field: str | None = None):
    def statements(p: Positioned) -> list[tuple[str, tuple]]:
        r = p.record
        if r["causation_id"] is None:
            return []
        reason = r[reason_field] if reason_field else None
        return [(_DECIDED, (r["causation_id"], outcome, reason, _ts(r["occurred_at"]),
                            r["event_id"]))]
    return statements


def _request_rejected(p: Positioned) -> list[tuple[str, tuple]]:
    """A service request the testing processor refused: every reason, in one text."""
    r = p.record
    if r["causation_id"] is None:
        return []
    return [(_DECIDED, (r["causation_id"], "rejected", "; ".join(r["reasons"]),
                        _ts(r["occurred_at"]), r["event_id"]))]


def _campaign_started(p: Positioned) -> list[tuple[str, tuple]]:
    """A campaign's first batch is caused by its request: the request was accepted."""
    return _decided("accepted")(p) if p.record["iteration"] == 0 else []


def _aborted(p: Positioned) -> list[tuple[str, tuple]]:
    """An execution the testing processor ended on an abort request (caused by it): the
    request was carried out. (Other ends are caused by instrument events, not by requests.)"""
    return _decided("accepted")(p) if p.record["reason_code"] == "aborted" else []


# decision event type -> the outcome it sets on the row of its cause
OUTCOME_SQL = {
    m.RecipesProposed.TYPE: _campaign_started,
    m.CommandDispatched.TYPE: _decided("accepted"),
    m.CommandRejected.TYPE: _decided("rejected", "reason"),
    m.ExperimentRejected.TYPE: _decided("rejected", "reason"),
    m.ExperimentCancelled.TYPE: _decided("accepted"),
    # a service request's executions are assigned (each caused by it), or it is rejected
    m.ProtocolAssigned.TYPE: _decided("accepted"),
    m.ServiceRequestRejected.TYPE: _request_rejected,
    m.ExecutionFailed.TYPE: _aborted,
}


def denied(p: Positioned) -> list[tuple[str, tuple]]:
    """A request an entry point refused: asked and decided at once."""
    r = p.record
    a = r["actor"] or {"user_id": r["user_id"], "roles": [], "client_ip": None,
                       "user_agent": None, "token_id": None}
    return [(_DENIED, (r["event_id"], _ts(r["occurred_at"]), a["user_id"], a["roles"],
                       a["client_ip"], a["user_agent"], a["token_id"], r["permission"],
                       p.event_type, r["request"], r["reason"]))]


def statements(p: Positioned) -> list[tuple[str, tuple]]:
    """The audit rows an event writes: its own if it carries an actor, its cause's outcome if it
    is a decision."""
    if p.event_type == m.AccessDenied.TYPE:
        return denied(p)
    out = asked(p) if p.record.get("actor") is not None else []
    decide = OUTCOME_SQL.get(p.event_type)
    return out + decide(p) if decide is not None else out


# event types that always touch the log (actors aside)
AUDITED = frozenset(OUTCOME_SQL) | {m.AccessDenied.TYPE}
