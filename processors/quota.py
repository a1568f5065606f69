"""The quota processor: each user's balance of wells for colour campaigns, in a faust Table.

A campaign's budget is reserved before it starts (QuotaReserved, which is what the experiment
processor starts a campaign on) or the request is refused (ExperimentRejected, reason
`quota_exceeded: ...`); when the campaign ends (ExperimentCompleted, ExperimentFailed,
ExperimentCancelled, or ExperimentRejected by the experiment processor) the wells it did not use
go back (QuotaRefunded, possibly of 0 wells: every reservation is closed by exactly one refund).

Who is limited (README "Quotas"): a user holding the `student` role, or anyone who was ever
granted a quota (`labbus users quota`), spends from their balance: the wells granted minus those
reserved and not refunded; a student granted nothing has nothing to spend. Everyone else (other
roles, and requesters unknown to lab.users, e.g. operators publishing with broker credentials)
is not limited: their campaigns are reserved uncharged (`charged` false) and never refused.
QuotaGranted adds to the balance. Wells used = the verdict's `wells_used` (completed: every
well measured; failed: the wells of finished batches, so the wells of a failed robot run are
given back; cancelled: every well sent to the robot, a run in flight included).

**Re-keying.** Requests and verdicts are keyed by experiment id on lab.experiments, grants and
roles by user id on lab.users; the three input topics (lab.users, lab.experiments and the
repartition topic lab.quota.inbox) are co-partitioned, and one handler (`handle`, on the one
faust driver) does two things depending on the record's topic:

1. lab.users and lab.experiments records are *forwarded*: the same bytes, keyed by user id, to
   lab.quota.inbox (a request by its `requested_by`; an end of a campaign by the user its
   request named, which the Table keeps under the experiment id from request to end). A
   forward is an output like any other: acknowledged before its input is committed.
2. lab.quota.inbox records are *decided* (`decide`, a pure function) against the user's state,
   the Table value under the user id.

So everything about one user — grants, role changes, requests, ends — is one partition of one
topic, in the order it was forwarded, and is decided by the one worker owning that partition,
one record at a time, against one Table key. Two requests of one user can never both pass on
the same wells: the second is decided against the balance the first left (the driver hands a
decision the states decided before it, written or not). The decisions are a function of the
inbox's order, which is fixed once forwarded: a restart (changelog recovery) or a takeover
decides nothing differently. A record forwarded twice (a crash between a forward's ack and the
commit) is recognised by its event id (the last SEEN ids per user) and ignored.

A request for an experiment id that is open (reserved, not ended) is ignored, as the experiment
processor ignores it: the first request counts. Requests whose budget is outside 1..96 wells are
not judged here: the experiment processor refuses them itself.
"""

from __future__ import annotations

import functools
import uuid
from typing import Any

from labbus.events import faust_runtime
from labbus.events.config import Config
from labbus.events.labware import MAX_WELLS  # not via processors.campaign: colour and scipy
from labbus.events.model import (
    Event,
    ExperimentCancelled,
    ExperimentCompleted,
    ExperimentFailed,
    ExperimentRejected,
    ExperimentRequested,
    QuotaGranted,
    QuotaRefunded,
    QuotaReserved,
    RoleGranted,
    RoleRevoked,
    UserRegistered,
    derived_id,
)
from labbus.events.runtime import Outgoing, Record
from labbus.events.topics import EXPERIMENTS, QUOTA_INBOX, USERS, topic_name

PROCESS = "quota"
SOURCE = "quota"
INPUTS = (USERS, EXPERIMENTS, QUOTA_INBOX)
USER_EVENTS = (UserRegistered, RoleGranted, RoleRevoked, QuotaGranted)
ENDS = (ExperimentCompleted, ExperimentFailed, ExperimentCancelled, ExperimentRejected)
ACCEPTS = {cls.TYPE for cls in (*USER_EVENTS, ExperimentRequested, *ENDS)}
LIMITED_ROLE = "student"
QUOTA_EXCEEDED = "quota_exceeded"
SEEN = 1000  # event ids remembered per user, to recognise a record forwarded twice


# -- the user's balance: pure functions ---------------------------------------------------------

def new_user(user_id: str) -> dict:
    """A user's state: id, roles, wells granted in all, balance, open reservations
    {experiment id: [wells, charged, reservation event id]}, the last SEEN input ids, and the
    sequence number of the last event emitted."""
    return {"id": user_id, "roles": [], "granted": 0, "balance": 0, "open": {}, "seen": [],
            "seq": 0}


def limited(user: dict) -> bool:
    """Whether the user spends from a balance: a student, or anyone ever granted a quota."""
    return LIMITED_ROLE in user["roles"] or user["granted"] > 0


def decide(user: dict, event: Event) -> tuple[dict, list[Event]]:
    """One event about a user (in the inbox's order): the user's new state (`user` itself when
    nothing changed) and the events decided. `user` is not modified."""
    eid = str(event.event_id)
    if eid in user["seen"]:
        return user, []  # forwarded twice
    u = {**user, "roles": list(user["roles"]), "open": dict(user["open"])}
    u["seen"] = [*u["seen"][-(SEEN - 1):], eid]
    if isinstance(event, UserRegistered):
        u["roles"] = sorted(set(u["roles"]) | set(event.roles))
    elif isinstance(event, RoleGranted):
        u["roles"] = sorted(set(u["roles"]) | {event.role})
    elif isinstance(event, RoleRevoked):
        u["roles"] = [r for r in u["roles"] if r != event.role]
    elif isinstance(event, QuotaGranted):
        wells = max(int(event.wells), 0)
        u["granted"] += wells
        u["balance"] += wells
    elif isinstance(event, ExperimentRequested):
        return u, reserve(u, event)
    elif isinstance(event, ENDS):
        return u, refund(u, event)
    return u, []


def _emit(u: dict, cls: type[Event], event_id: str, xid: str, correlation: uuid.UUID,
          cause: uuid.UUID, **payload: Any) -> Event:
    u["seq"] += 1
    return cls.create(source=SOURCE, subject=xid, sequence=u["seq"],
                      event_id=uuid.UUID(event_id), correlation_id=correlation,
                      causation_id=cause, experiment_id=xid, **payload)


def reserve(u: dict, req: ExperimentRequested) -> list[Event]:
    """Reserve a request's budget (QuotaReserved) or refuse it (ExperimentRejected); changes
    `u`."""
    xid, wells = req.experiment_id, req.budget_wells
    if xid in u["open"] or not 1 <= wells <= MAX_WELLS:
        return []  # a repeated request, or one the experiment processor refuses itself
    user = u["id"]
    if not limited(u):
        rid = derived_id(req.event_id, "quota-reserved")
        u["open"][xid] = [wells, False, rid]
        return [_emit(u, QuotaReserved, rid, xid, req.event_id, req.event_id, user_id=user,
                      wells=wells, charged=False, remaining=None)]
    if wells > u["balance"]:
        return [_emit(u, ExperimentRejected, derived_id(req.event_id, "quota-rejected"), xid,
                      req.event_id, req.event_id, reason=exceeded_message(u, user, wells))]
    u["balance"] -= wells
    rid = derived_id(req.event_id, "quota-reserved")
    u["open"][xid] = [wells, True, rid]
    return [_emit(u, QuotaReserved, rid, xid, req.event_id, req.event_id, user_id=user,
                  wells=wells, charged=True, remaining=u["balance"])]


def exceeded_message(u: dict, user: str, wells: int) -> str:
    held = sum(w for w, charged, _ in u["open"].values() if charged)
    return (f"{QUOTA_EXCEEDED}: the campaign asks for {wells} wells, the balance of {user} is "
            f"{u['balance']} ({u['granted']} granted, {held} reserved by campaigns still "
            f"running, {u['granted'] - u['balance'] - held} used)")


def refund(u: dict, end: Event) -> list[Event]:
    """Close the reservation of a campaign that ended: its unused wells back to the balance
    (when it was charged); changes `u`. Nothing for a campaign without a reservation."""
    xid = end.experiment_id
    if xid not in u["open"]:
        return []
    wells, charged, rid = u["open"].pop(xid)
    used = 0 if isinstance(end, ExperimentRejected) else max(int(end.wells_used), 0)
    back = max(wells - used, 0)
    if charged:
        u["balance"] += back
    return [_emit(u, QuotaRefunded, derived_id(rid, "refunded"), xid, end.envelope.correlation_id
                  or end.event_id, end.event_id, user_id=u["id"], wells=back,
                  wells_used=min(used, wells), charged=charged,
                  remaining=u["balance"] if charged else None)]


# -- the faust handler: forward (re-key by user) or decide ----------------------------------------

def handle(state: dict | None, event: Event, record: Record, shared: Any = None, *,
           users: str, experiments: str, inbox: str) -> tuple[dict | None, list]:
    """One input record. `users`, `experiments`, `inbox`: the three topics' names (namespace
    included). The Table value of a key holds `"u"` (the user's state, key = user id) and/or
    `"x"` (the user an open experiment's request named, key = experiment id): ids of either
    kind may coincide without touching each other."""
    if record.topic == inbox:
        user = (state or {}).get("u")
        decided, out = decide(user or new_user(_key(record)), event)
        if decided is user:
            return state, out
        return {**(state or {}), "u": decided}, out
    if record.topic == users:
        return state, [_forward(inbox, event.user_id, record)]
    if record.topic == experiments:
        held = (state or {}).get("x")
        if isinstance(event, ExperimentRequested):
            if held is not None:
                return state, []  # the experiment is open: the first request counts
            return ({**(state or {}), "x": {"user": event.requested_by}},
                    [_forward(inbox, event.requested_by, record)])
        if held is not None:  # a campaign's end
            rest = {k: v for k, v in state.items() if k != "x"}
            return rest or None, [_forward(inbox, held["user"], record)]
    return state, []


def _key(record: Record) -> str:
    return record.key.decode("utf-8", "replace") if record.key is not None else ""


def _forward(inbox: str, user: str, record: Record) -> Outgoing:
    return Outgoing(inbox, user.encode(), record.value)


def build_app(cfg: Config, **settings):
    handler = functools.partial(handle, users=topic_name(cfg, USERS),
                                experiments=topic_name(cfg, EXPERIMENTS),
                                inbox=topic_name(cfg, QUOTA_INBOX))
    return faust_runtime.build_app(cfg, PROCESS, INPUTS, handler, accepts=ACCEPTS,
                                   table="quotas", **settings)


def run(cfg: Config) -> None:
    """Run the quota worker until SIGINT/SIGTERM; start more and they share the users."""
    faust_runtime.run(build_app(cfg), cfg)
