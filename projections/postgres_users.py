"""The users read model (migrations 0006, 0008) from lab.users and the quota processor's
events: the SQL each event becomes, written by the PostgreSQL view (projections/postgres.py) in
its transaction, positions included.

One user's events share a partition (keyed by user id), so their offsets order them: each row
keeps the offset of the last event applied to it and an event at or below it changes nothing,
which makes a replay harmless and keeps a grant and a later revoke of the same role in order.
Credentials are not here: they never enter the event log (auth.credentials, written by
`labbus users add`).

Quota reservations and refunds (QuotaReserved, QuotaRefunded) are keyed by experiment, so one
user's are spread over partitions: they go into `quota_ledger` once each (by event id) and add
their `spent_delta` to `users.quota_spent_wells`, sums that do not depend on the order;
`users.quota_remaining` (generated) is granted minus spent for a limited user.
"""

from __future__ import annotations

from datetime import UTC, datetime

from labbus.events import model as m
from labbus.events.runtime import Positioned

_REGISTERED = """
INSERT INTO users (user_id, email, roles, registered_at, registered_by, updated_at,
                   last_event_id, last_offset, quota_spent_wells)
VALUES ($1, $2, ARRAY(SELECT DISTINCT r FROM unnest($3::text[]) AS r ORDER BY r), $4, $5, $4,
        $6, $7, (SELECT COALESCE(sum(spent_delta), 0) FROM quota_ledger WHERE user_id = $1))
ON CONFLICT (user_id) DO NOTHING
"""

# $1 user, $2 the event's value, $3 occurred_at, $4 event id, $5 offset
_CHANGE = """
UPDATE users SET {change}, updated_at = $3, last_event_id = $4, last_offset = $5
WHERE user_id = $1 AND last_offset < $5
"""
_GRANTED = _CHANGE.format(change="roles = ARRAY(SELECT DISTINCT r FROM "
                                  "unnest(array_append(roles, $2::text)) AS r ORDER BY r)")
_REVOKED = _CHANGE.format(change="roles = array_remove(roles, $2::text)")
_DISABLED = _CHANGE.format(change="disabled = true, disabled_reason = $2::text, "
                                  "disabled_at = $3")
_QUOTA = _CHANGE.format(change="quota_granted_wells = quota_granted_wells + $2::bigint")


# $1 event id, $2 user, $3 experiment, $4 kind, $5 wells, $6 charged, $7 spent delta,
# $8 remaining, $9 occurred_at
_LEDGER = """
WITH added AS (
    INSERT INTO quota_ledger (event_id, user_id, experiment_id, kind, wells, charged,
                              spent_delta, remaining, occurred_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING user_id, spent_delta)
UPDATE users SET quota_spent_wells = users.quota_spent_wells + added.spent_delta
FROM added WHERE users.user_id = added.user_id
"""


def _ts(micros: int) -> datetime:
    return datetime.fromtimestamp(micros / 1e6, UTC)


def _registered(p: Positioned) -> list[tuple[str, tuple]]:
    r = p.record
    return [(_REGISTERED, (r["user_id"], r["email"], r["roles"], _ts(r["occurred_at"]),
                           r["registered_by"], r["event_id"], p.offset))]


def _change(sql: str, field: str):
    def statements(p: Positioned) -> list[tuple[str, tuple]]:
        r = p.record
        return [(sql, (r["user_id"], r[field], _ts(r["occurred_at"]), r["event_id"],
                       p.offset))]
    return statements


def _ledger(kind: str, sign: int):
    def statements(p: Positioned) -> list[tuple[str, tuple]]:
        r = p.record
        delta = sign * r["wells"] if r["charged"] else 0
        return [(_LEDGER, (r["event_id"], r["user_id"], r["experiment_id"], kind, r["wells"],
                           r["charged"], delta, r["remaining"], _ts(r["occurred_at"])))]
    return statements


# event type -> its statements, in log order
USER_SQL = {
    m.UserRegistered.TYPE: _registered,
    m.RoleGranted.TYPE: _change(_GRANTED, "role"),
    m.RoleRevoked.TYPE: _change(_REVOKED, "role"),
    m.UserDisabled.TYPE: _change(_DISABLED, "reason"),
    m.QuotaGranted.TYPE: _change(_QUOTA, "wells"),
    m.QuotaReserved.TYPE: _ledger("reserved", 1),
    m.QuotaRefunded.TYPE: _ledger("refunded", -1),
}
