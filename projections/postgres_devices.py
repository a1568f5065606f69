"""PostgreSQL read models of devices' status, their commands and alerts (migration 0004): the SQL
each event becomes, written by the PostgreSQL view (projections/postgres.py) in its transaction.

Every statement is idempotent by event id, and none depends on the order the view meets the
events of different topics in:

- status: each DeviceStatusChanged goes into `device_status_history` once; the device's current
  status is the one latest in log order (one device's events share a partition, so their offsets
  order them) — a replay of an older event does not move it back.
- heartbeats: a batch's heartbeats become one upsert of the latest time per device;
  `last_heartbeat_at` only moves forwards.
- commands: each event goes into `command_events` once and, only then, into its `commands` row.
  The row's status is the highest-ranked of its events' (COMMAND_RANK): final states outrank the
  others, so a late CommandAccepted cannot move a completed command back. A CommandProgress is a
  history entry of status STARTED; the row's progress, remaining_s and intermediate are those of
  the latest progress report (by event time, then event id), whatever order they arrive in.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from labbus.events import model as m
from labbus.events.runtime import Positioned

# A command's status is the highest-ranked status of its events, whatever order they arrive in.
# Final states outrank the rest. Among them the device's own word (COMPLETED, FAILED) outranks a
# processor's (REJECTED, TIMED_OUT): a command that ran did run, even if a timeout raced it; a
# rejection outranks a timeout (a rejected command never ran, its timeout is a consequence);
# FAILED outranks COMPLETED (a device that says both is not believed to have succeeded).
# DISPATCHED (the device processor let the command through to its device) comes between ISSUED
# and ACCEPTED. A CommandProgress gives STARTED: a command that reports progress runs. Migration
# 0005 sets the stored ranks from these (a unit test compares the two).
COMMAND_RANK = {"ISSUED": 1, "DISPATCHED": 2, "ACCEPTED": 3, "STARTED": 4, "TIMED_OUT": 5,
                "REJECTED": 6, "COMPLETED": 7, "FAILED": 8}
COMMAND_FINAL = ("TIMED_OUT", "REJECTED", "COMPLETED", "FAILED")
COMMAND_STATUS = {m.CommandIssued.TYPE: "ISSUED", m.CommandDispatched.TYPE: "DISPATCHED",
                  m.CommandAccepted.TYPE: "ACCEPTED", m.CommandStarted.TYPE: "STARTED",
                  m.CommandProgress.TYPE: "STARTED", m.CommandCompleted.TYPE: "COMPLETED",
                  m.CommandFailed.TYPE: "FAILED", m.CommandRejected.TYPE: "REJECTED",
                  m.CommandTimedOut.TYPE: "TIMED_OUT"}
assert set(COMMAND_STATUS.values()) == set(COMMAND_RANK)
assert {t for t, s in COMMAND_STATUS.items() if s in COMMAND_FINAL} == set(m.COMMAND_FINAL)


def _ts(micros: int | None) -> datetime | None:
    return None if micros is None else datetime.fromtimestamp(micros / 1e6, UTC)


def _json(text: str | None) -> str | None:
    """A JSON text as jsonb input; text that is not JSON is kept as a JSON string."""
    if text is None:
        return None
    try:
        json.loads(text)
        return text
    except ValueError:
        return json.dumps(text)


# -- device status and heartbeats ---------------------------------------------------------------

_STATUS_CHANGED = """
WITH new AS (
    INSERT INTO device_status_history (event_id, device_id, status, reason, occurred_at, source,
                                       source_partition, source_offset)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id)
INSERT INTO devices (device_id, status, status_reason, status_at, status_event_id, status_offset)
SELECT $2, $3, $4, $5, $1, $8 FROM new
ON CONFLICT (device_id) DO UPDATE SET
    status = EXCLUDED.status, status_reason = EXCLUDED.status_reason,
    status_at = EXCLUDED.status_at, status_event_id = EXCLUDED.status_event_id,
    status_offset = EXCLUDED.status_offset
WHERE devices.status_offset IS NULL OR devices.status_offset < EXCLUDED.status_offset
"""

HEARTBEATS = """
INSERT INTO devices (device_id, last_heartbeat_at)
SELECT h.device_id, 'epoch'::timestamptz + h.at_us * interval '1 microsecond'
FROM unnest($1::text[], $2::bigint[]) AS h(device_id, at_us)
ON CONFLICT (device_id) DO UPDATE SET last_heartbeat_at = EXCLUDED.last_heartbeat_at
WHERE devices.last_heartbeat_at IS NULL OR devices.last_heartbeat_at < EXCLUDED.last_heartbeat_at
"""


def heartbeat_args(beats: dict[str, int]) -> tuple[list[str], list[int]]:
    """HEARTBEATS' arguments from {device id: latest heartbeat time (µs)}, in device order."""
    devices = sorted(beats)
    return devices, [beats[d] for d in devices]


def _status_changed(p: Positioned) -> list[tuple[str, tuple]]:
    r = p.record
    return [(_STATUS_CHANGED, (r["event_id"], r["device_id"], r["status"], r["reason"],
                               _ts(r["occurred_at"]), r["source"], p.tp.partition, p.offset))]


# -- commands -----------------------------------------------------------------------------------

# The columns that follow the winning event (the highest rank; on a tie the earlier event, then
# the smaller event id): a replay or a repeat changes nothing.
_WINNER = ("status", "status_rank", "status_at", "status_event_id", "result", "error",
           "reason_code", "reason")
_WINS = ("(EXCLUDED.status_rank, commands.status_at, commands.status_event_id) > "
         "(commands.status_rank, EXCLUDED.status_at, EXCLUDED.status_event_id)")
# The columns of the latest progress report (progress_at is NULL for an event that reports none).
_REPORT = ("progress", "remaining_s", "intermediate", "progress_at", "progress_event_id")
_LATER = ("EXCLUDED.progress_at IS NOT NULL AND (commands.progress_at IS NULL OR "
          "(EXCLUDED.progress_at, EXCLUDED.progress_event_id) > "
          "(commands.progress_at, commands.progress_event_id))")

_COMMAND_EVENT = f"""
WITH new AS (
    INSERT INTO command_events (event_id, command_id, device_id, status, status_rank,
                                occurred_at, source, detail, event_type)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $20)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id)
INSERT INTO commands (command_id, device_id, idempotency_key, command_type, payload, issued_by,
                      issued_at, expires_at, status, status_rank, status_at, status_event_id,
                      progress, result, error, reason_code, reason, first_at, updated_at,
                      remaining_s, intermediate, progress_at, progress_event_id)
SELECT $2, $3, $9, $10, $11::jsonb, $12, $13, $14, $4, $5, $6, $1, $15, $16::jsonb, $17, $18, $19,
       $6, $6, $21, $22::jsonb, $23, $24
FROM new
ON CONFLICT (command_id) DO UPDATE SET
    idempotency_key = COALESCE(commands.idempotency_key, EXCLUDED.idempotency_key),
    command_type = COALESCE(commands.command_type, EXCLUDED.command_type),
    payload = COALESCE(commands.payload, EXCLUDED.payload),
    issued_by = COALESCE(commands.issued_by, EXCLUDED.issued_by),
    issued_at = COALESCE(commands.issued_at, EXCLUDED.issued_at),
    expires_at = COALESCE(commands.expires_at, EXCLUDED.expires_at),
    first_at = LEAST(commands.first_at, EXCLUDED.first_at),
    updated_at = GREATEST(commands.updated_at, EXCLUDED.updated_at),
    {", ".join(f"{c} = CASE WHEN {_LATER} THEN EXCLUDED.{c} ELSE commands.{c} END"
               for c in _REPORT)},
    {", ".join(f"{c} = CASE WHEN {_WINS} THEN EXCLUDED.{c} ELSE commands.{c} END"
               for c in _WINNER)}
"""


def _command(p: Positioned) -> list[tuple[str, tuple]]:
    r = p.record
    status = COMMAND_STATUS[p.event_type]
    issued = p.event_type == m.CommandIssued.TYPE
    # a CommandDispatched is a copy of the command: it fills the same columns but the issue time
    payload = _json(r["payload_json"]) if "payload_json" in r else None
    result = _json(r.get("result_json"))
    intermediate = _json(r.get("intermediate_json"))
    reason_code, reason = r.get("reason_code"), r.get("reason")
    if p.event_type == m.CommandTimedOut.TYPE:
        reason_code = "timed_out"
        reason = f"no final state by {_ts(r['expires_at']).isoformat()}"
    detail = {k: v for k, v in (
        ("command_type", r.get("command_type")), ("issued_by", r.get("issued_by")),
        ("expires_at", _ts(r["expires_at"]).isoformat() if r.get("expires_at") else None),
        ("progress", r.get("progress")), ("remaining_s", r.get("remaining_s")),
        ("intermediate", json.loads(intermediate) if intermediate else None),
        ("result", json.loads(result) if result else None),
        ("error", r.get("error")), ("reason_code", reason_code), ("reason", reason))
        if v is not None}
    at = _ts(r["occurred_at"])
    # a progress report: every CommandProgress, and a CommandStarted that says how far
    reports = (p.event_type == m.CommandProgress.TYPE
               or (p.event_type == m.CommandStarted.TYPE and r.get("progress") is not None))
    return [(_COMMAND_EVENT, (
        r["event_id"], r["command_id"], r["device_id"], status, COMMAND_RANK[status], at,
        r["source"], json.dumps(detail), r.get("idempotency_key"), r.get("command_type"), payload,
        r.get("issued_by"), at if issued else None, _ts(r.get("expires_at")), r.get("progress"),
        result, r.get("error"), reason_code, reason, p.event_type, r.get("remaining_s"),
        intermediate, at if reports else None, r["event_id"] if reports else None))]


# -- alerts ---------------------------------------------------------------------------------------

_ALERT = """
INSERT INTO alerts (alert_id, device_id, metric, value, unit, measured_at, measurement_id, rule,
                    score, threshold, window_mean, window_stddev, window_count, detected_at,
                    source)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
ON CONFLICT (alert_id) DO NOTHING
"""


def _alert(p: Positioned) -> list[tuple[str, tuple]]:
    r = p.record
    return [(_ALERT, (
        r["event_id"], r["device_id"], r["metric"], r["value"], r["unit"], _ts(r["measured_at"]),
        r["measurement_id"], r["rule"], r["score"], r["threshold"], r["window_mean"],
        r["window_stddev"], r["window_count"], _ts(r["occurred_at"]), r["source"]))]


# event type -> its statements, in log order (heartbeats are gathered per batch instead)
DEVICE_SQL = {m.DeviceStatusChanged.TYPE: _status_changed, m.AnomalyDetected.TYPE: _alert,
              **{event_type: _command for event_type in COMMAND_STATUS}}
