"""The users read model (migration 0006) from lab.users: the SQL each user event becomes,
written by the PostgreSQL view (projections/postgres.py) in its transaction, positions included.

One user's events share a partition (keyed by user id), so their offsets order them: each row
keeps the offset of the last event applied to it and an event at or below it changes nothing,
which makes a replay harmless and keeps a grant and a later revoke of the same role in order.
Credentials are not here: they never enter the event log (auth.credentials, written by
`labbus users add`).
"""

from __future__ import annotations

from datetime import UTC, datetime

from labbus.events import model as m
from labbus.events.runtime import Positioned

_REGISTERED = """
INSERT INTO users (user_id, email, roles, registered_at, registered_by, updated_at,
                   last_event_id, last_offset)
VALUES ($1, $2, ARRAY(SELECT DISTINCT r FROM unnest($3::text[]) AS r ORDER BY r), $4, $5, $4,
        $6, $7)
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


# event type -> its statements, in log order
USER_SQL = {
    m.UserRegistered.TYPE: _registered,
    m.RoleGranted.TYPE: _change(_GRANTED, "role"),
    m.RoleRevoked.TYPE: _change(_REVOKED, "role"),
    m.UserDisabled.TYPE: _change(_DISABLED, "reason"),
    m.QuotaGranted.TYPE: _change(_QUOTA, "wells"),
}
