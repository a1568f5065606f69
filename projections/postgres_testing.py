"""The test-protocol read models (migrations 0009, 0010) from lab.testing.requests,
lab.testing.executions and lab.testing.samples: the SQL each event becomes, written by the
PostgreSQL view (projections/postgres.py) in its transaction, positions included.

- `samples`: one row per sample id, its latest registration (SampleRegistered; later by the
  time it was registered, then by event id, replaces it: a LIMS correcting its record), with
  the number of registrations seen.

- `service_requests`: one row per request. ServiceRequestSubmitted fills it (the first
  submission of an id counts, as in the testing processor); its status only moves up a rank:
  submitted (0) < running (1: a ProtocolAssigned of it was projected) < rejected | completed
  (2, with the reasons, or the verdict and counts). An execution's events lie on another topic
  than its request's and may be projected first: they make the row (`running`, no submission
  yet), the submission then fills in its columns. InspectionRecorded adds itself to
  `inspections` under its event id.
- `executions`: one row per execution, made by whichever of its events comes first; its
  events share a partition (keyed by execution id), but each upsert sets only what its event
  knows, so the order does not matter either: status assigned (0) < running (1) < passed |
  failed (2), and the first end stands (with its verdict, reason and time; a repeated or later
  end changes nothing), as the processor counts the first end. ExecutionAnalysed sets the
  results, QcEvaluated the criteria, TestResultRecorded adds its value to `entered` (it names
  only the execution: a value for an execution not projected yet is not kept — the processor
  drops those too).
  ExecutionAbortRequested sets who asked to abort, why and when (the first request stands); the
  execution's end says whether it was aborted (reason code `aborted`) or had ended already.
- `non_conformances`: one row per nc id, once.
- `reports`: `lab.testing.ReportGenerated` (the report processor's, by type name: the class
  lives with it), one row per (request, format); a regenerated report replaces it when it is
  later (by time, then event id), so a replay of an older one changes nothing.

Every statement is keyed by ids: a replay writes what is already there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from labbus.events import model as m
from labbus.events.runtime import Positioned
from labbus.projections.postgres_devices import _ts

REPORT_GENERATED = "lab.testing.ReportGenerated"  # the report processor's event (by name)
REPORT_FORMATS = ("pdf", "xlsx", "csv")

REQUEST_RANK = {"submitted": 0, "running": 1, "rejected": 2, "completed": 2}
EXECUTION_RANK = {"assigned": 0, "running": 1, "passed": 2, "failed": 2}

_SUBMITTED = """
INSERT INTO service_requests (request_id, status, status_rank, customer, module_type,
                              module_area_m2, sample_ids, protocols, submitted_by, submitted_at,
                              submit_event_id, updated_at)
VALUES ($1, 'submitted', 0, $2, $3, $4, $5, $6, $7, $8, $9, $8)
ON CONFLICT (request_id) DO UPDATE SET
    customer = EXCLUDED.customer, module_type = EXCLUDED.module_type,
    module_area_m2 = EXCLUDED.module_area_m2, sample_ids = EXCLUDED.sample_ids,
    protocols = EXCLUDED.protocols, submitted_by = EXCLUDED.submitted_by,
    submitted_at = EXCLUDED.submitted_at, submit_event_id = EXCLUDED.submit_event_id,
    updated_at = GREATEST(service_requests.updated_at, EXCLUDED.updated_at)
WHERE service_requests.submit_event_id IS NULL
   OR service_requests.submit_event_id = EXCLUDED.submit_event_id
"""

# $1 request, $2 status, $3 rank, $4 time, then the columns the status brings
_REQUEST_STATUS = """
INSERT INTO service_requests (request_id, status, status_rank, updated_at{columns})
VALUES ($1, $2, $3, $4{values})
ON CONFLICT (request_id) DO UPDATE SET
    status = EXCLUDED.status, status_rank = EXCLUDED.status_rank,
    updated_at = GREATEST(service_requests.updated_at, EXCLUDED.updated_at){updates}
WHERE service_requests.status_rank < EXCLUDED.status_rank
"""


def _request_status_sql(*columns: str) -> str:
    return _REQUEST_STATUS.format(
        columns="".join(f", {c}" for c in columns),
        values="".join(f", ${i}" for i in range(5, 5 + len(columns))),
        updates="".join(f", {c} = EXCLUDED.{c}" for c in columns))


_RUNNING = _request_status_sql()
_REJECTED = _request_status_sql("rejection_reasons", "finished_at")
_COMPLETED = _request_status_sql("verdict", "executions", "passed", "failed", "finished_at")

_INSPECTED = """
INSERT INTO service_requests (request_id, status, status_rank, inspections, updated_at)
VALUES ($1, 'submitted', 0, jsonb_build_object($2::text, $3::jsonb), $4)
ON CONFLICT (request_id) DO UPDATE SET
    inspections = service_requests.inspections || EXCLUDED.inspections,
    updated_at = GREATEST(service_requests.updated_at, EXCLUDED.updated_at)
"""

_SAMPLE = """
INSERT INTO samples (sample_id, lims_ref, customer, module_type, module_area_m2, serial_number,
                     received_at, registered_by, registered_at, event_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (sample_id) DO UPDATE SET
    lims_ref = EXCLUDED.lims_ref, customer = EXCLUDED.customer,
    module_type = EXCLUDED.module_type, module_area_m2 = EXCLUDED.module_area_m2,
    serial_number = EXCLUDED.serial_number, received_at = EXCLUDED.received_at,
    registered_by = EXCLUDED.registered_by, registered_at = EXCLUDED.registered_at,
    event_id = EXCLUDED.event_id, registrations = samples.registrations + 1
WHERE (samples.registered_at, samples.event_id) < (EXCLUDED.registered_at, EXCLUDED.event_id)
"""

# only the execution's row as it is (an abort of an execution the read model does not hold is
# not kept: the processor drops it too)
_ABORT = """
UPDATE executions SET abort_requested_by = $2, abort_reason = $3, abort_requested_at = $4,
                      updated_at = GREATEST(updated_at, $4)
WHERE execution_id = $1 AND abort_requested_at IS NULL
"""

_IDENTITY = ("execution_id", "request_id", "sample_id", "protocol_id", "template_version")


def _execution_sql(columns: tuple[str, ...], final: bool = False) -> str:
    """The upsert of an execution event: its identity, its status (moving up only) and its
    `columns`. A final event's columns are written only when it is the first end."""
    names = (*_IDENTITY, "status", "status_rank", "updated_at", *columns)
    if final:
        updates = [f"{c} = CASE WHEN executions.status_rank < EXCLUDED.status_rank "
                   f"THEN EXCLUDED.{c} ELSE executions.{c} END" for c in columns]
    else:
        updates = [f"{c} = EXCLUDED.{c}" for c in columns]
    return f"""
INSERT INTO executions ({", ".join(names)})
VALUES ({", ".join(f"${i}" for i in range(1, len(names) + 1))})
ON CONFLICT (execution_id) DO UPDATE SET
    {"".join(u + ", " for u in updates)}
    status = CASE WHEN executions.status_rank < EXCLUDED.status_rank THEN EXCLUDED.status
                  ELSE executions.status END,
    status_rank = GREATEST(executions.status_rank, EXCLUDED.status_rank),
    updated_at = GREATEST(executions.updated_at, EXCLUDED.updated_at)
"""


_ENTERED = """
UPDATE executions SET entered = entered || jsonb_build_object($2::text, $3::jsonb),
                      updated_at = GREATEST(updated_at, $4)
WHERE execution_id = $1
"""

_NC = """
INSERT INTO non_conformances (nc_id, execution_id, request_id, sample_id, protocol_id,
                              template_version, criteria, description, raised_at, event_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (nc_id) DO NOTHING
"""

_REPORT = """
INSERT INTO reports (request_id, format, name, content_type, sha256, size, location, certificate,
                     generated_at, event_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (request_id, format) DO UPDATE SET
    name = EXCLUDED.name, content_type = EXCLUDED.content_type, sha256 = EXCLUDED.sha256,
    size = EXCLUDED.size, location = EXCLUDED.location, certificate = EXCLUDED.certificate,
    generated_at = EXCLUDED.generated_at, event_id = EXCLUDED.event_id
WHERE (reports.generated_at, reports.event_id) < (EXCLUDED.generated_at, EXCLUDED.event_id)
"""

Statements = list[tuple[str, tuple]]


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinity as None: jsonb holds neither (a float of an analysis
    or criterion that could not be computed is unknown, as null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _jsonb(value: Any) -> str:
    return json.dumps(_finite(value), allow_nan=False)


def _submitted(p: Positioned) -> Statements:
    r = p.record
    return [(_SUBMITTED, (r["request_id"], r["customer"], r["module_type"],
                          r["module_area_m2"], r["sample_ids"], _jsonb(r["protocols"]),
                          r["submitted_by"], _ts(r["occurred_at"]), r["event_id"]))]


def _rejected(p: Positioned) -> Statements:
    r = p.record
    at = _ts(r["occurred_at"])
    return [(_REJECTED, (r["request_id"], "rejected", 2, at, r["reasons"], at))]


def _completed(p: Positioned) -> Statements:
    r = p.record
    at = _ts(r["occurred_at"])
    return [(_COMPLETED, (r["request_id"], "completed", 2, at, r["verdict"], r["executions"],
                          r["passed"], r["failed"], at))]


def _inspected(p: Positioned) -> Statements:
    r = p.record
    inspection = {"sample_id": r["sample_id"], "inspector": r["inspector"],
                  "findings": r["findings"], "defects": r["defects"],
                  "photo_refs": r["photo_refs"], "at": _ts(r["occurred_at"]).isoformat()}
    return [(_INSPECTED, (r["request_id"], r["event_id"], _jsonb(inspection),
                          _ts(r["occurred_at"])))]


def _execution(status: str, fields: dict[str, Callable[[dict], object]], final: bool = False):
    """An execution event's statements: `fields` maps a column to how the event gives it."""
    sql = _execution_sql(tuple(fields), final)

    def statements(p: Positioned) -> Statements:
        r = p.record
        args = (*(r[c] for c in _IDENTITY), status, EXECUTION_RANK[status],
                _ts(r["occurred_at"]), *(get(r) for get in fields.values()))
        out = [(sql, args)]
        if p.event_type == m.ProtocolAssigned.TYPE:  # the request has an execution: it runs
            out.append((_RUNNING, (r["request_id"], "running", 1, _ts(r["occurred_at"]))))
        return out
    return statements


def _at(r: dict):
    return _ts(r["occurred_at"])


def _entered(p: Positioned) -> Statements:
    r = p.record
    value = {"value": r["value"], "unit": r["unit"], "entered_by": r["entered_by"],
             "at": _ts(r["occurred_at"]).isoformat()}
    return [(_ENTERED, (r["execution_id"], r["name"], _jsonb(value),
                        _ts(r["occurred_at"])))]


def _nc(p: Positioned) -> Statements:
    r = p.record
    return [(_NC, (r["nc_id"], r["execution_id"], r["request_id"], r["sample_id"],
                   r["protocol_id"], r["template_version"], r["criteria"], r["description"],
                   _ts(r["occurred_at"]), r["event_id"]))]


def _sample(p: Positioned) -> Statements:
    r = p.record
    return [(_SAMPLE, (r["sample_id"], r["lims_ref"], r["customer"], r["module_type"],
                       r["module_area_m2"], r["serial_number"], _ts(r["received_at"]),
                       r["registered_by"], _ts(r["occurred_at"]), r["event_id"]))]


def _abort(p: Positioned) -> Statements:
    r = p.record
    return [(_ABORT, (r["execution_id"], r["requested_by"], r["reason"],
                      _ts(r["occurred_at"])))]


def _report(p: Positioned) -> Statements:
    r = p.record
    return [(_REPORT, (r["request_id"], r["format"], r["name"], r["content_type"], r["sha256"],
                       r["size"], r["location"], r["certificate"], _ts(r["occurred_at"]),
                       r["event_id"]))]


# event type -> its statements, in log order
TESTING_SQL: dict[str, Callable[[Positioned], Statements]] = {
    m.SampleRegistered.TYPE: _sample,
    m.ServiceRequestSubmitted.TYPE: _submitted,
    m.ServiceRequestRejected.TYPE: _rejected,
    m.ServiceRequestCompleted.TYPE: _completed,
    m.InspectionRecorded.TYPE: _inspected,
    m.ProtocolAssigned.TYPE: _execution("assigned", {
        "template_sha256": lambda r: r["template_sha256"],
        "inputs": lambda r: _jsonb(r["inputs"]), "assigned_at": _at}),
    m.ExecutionStarted.TYPE: _execution("running", {"steps": lambda r: r["steps"],
                                                    "started_at": _at}),
    m.ExecutionAnalysed.TYPE: _execution("running", {
        "results": lambda r: _jsonb(r["results"]), "units": lambda r: _jsonb(r["units"]),
        "problems": lambda r: r["problems"], "analysed_at": _at}),
    m.QcEvaluated.TYPE: _execution("running", {
        "criteria": lambda r: _jsonb(r["criteria"]), "qc_verdict": lambda r: r["verdict"]}),
    m.ExecutionPassed.TYPE: _execution("passed", {
        "verdict": lambda r: "pass", "finished_at": _at}, final=True),
    m.ExecutionFailed.TYPE: _execution("failed", {
        "verdict": lambda r: "fail", "reason_code": lambda r: r["reason_code"],
        "reason": lambda r: r["reason"], "finished_at": _at}, final=True),
    m.TestResultRecorded.TYPE: _entered,
    m.ExecutionAbortRequested.TYPE: _abort,
    m.NonConformanceRaised.TYPE: _nc,
    REPORT_GENERATED: _report,
}
