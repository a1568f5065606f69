"""The response bodies of the query API, as declared in its OpenAPI (and checked against it by
the schemathesis test). JSON columns whose content the events do not fix are `Any`."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

NEXT_CURSOR = Field(description="Pass as `cursor` for the next page; null on the last page.")


DeviceStatus = Literal["ONLINE", "OFFLINE", "MAINTENANCE", "ERROR"]
CommandStatus = Literal["ISSUED", "DISPATCHED", "ACCEPTED", "STARTED", "COMPLETED", "FAILED",
                        "REJECTED", "TIMED_OUT"]
CommandEventType = Literal[
    "lab.command.CommandIssued", "lab.command.CommandDispatched", "lab.command.CommandAccepted",
    "lab.command.CommandStarted", "lab.command.CommandProgress", "lab.command.CommandCompleted",
    "lab.command.CommandFailed", "lab.command.CommandRejected", "lab.command.CommandTimedOut"]


class MeasurementSpec(BaseModel):
    metric: str
    unit: str
    min: float | None = Field(description="Lowest valid value; null: unbounded.")
    max: float | None = Field(description="Highest valid value; null: unbounded.")
    expected_interval_s: float = Field(description="Seconds between two readings in normal "
                                                   "operation.")


class DeviceState(BaseModel):
    """What the device's status events and heartbeats say (all null until the first)."""

    status: DeviceStatus | None = Field(
        None, description="The latest DeviceStatusChanged, in log order; null before any.")
    status_reason: str | None = None
    status_at: datetime | None = Field(None, description="When the status changed.")
    last_heartbeat_at: datetime | None = Field(
        None, description="The latest heartbeat's time (never moves backwards).")


class Device(DeviceState):
    device_id: str
    device_type: str
    model: str
    location: str
    metrics: list[str]
    attributes: dict[str, Any]
    registered_at: datetime
    specs: list[MeasurementSpec] = Field(description="Measurement specs (DeviceRegistered v2); "
                                                     "empty for a v1 registration.")
    spec_version: int


class DevicePage(BaseModel):
    items: list[Device]
    next_cursor: str | None = NEXT_CURSOR


class Latest(BaseModel):
    value: float
    unit: str
    measured_at: datetime
    measurement_id: str


class StatusChange(BaseModel):
    event_id: uuid.UUID
    status: DeviceStatus
    reason: str
    occurred_at: datetime
    source: str = Field(description="Who said so: the device (through the gateway) or a "
                                    "processor.")


class DeviceDetail(DeviceState):
    """Metadata and status from PostgreSQL (the registration's fields are absent while only
    readings, status or heartbeats are known), latest values and counts from MongoDB."""

    device_id: str
    device_type: str | None = None
    model: str | None = None
    location: str | None = None
    metrics: list[str] | None = None
    attributes: dict[str, Any] | None = None
    registered_at: datetime | None = None
    specs: list[MeasurementSpec] | None = None
    spec_version: int | None = None
    latest: dict[str, Latest] = Field(description="Per metric, its latest reading.")
    counts: dict[str, int] = Field(description="Per metric, its number of readings.")
    total_measurements: int
    status_history: list[StatusChange] = Field(
        description="Its status changes, newest first (at most 100).")


class Measurement(BaseModel):
    measurement_id: uuid.UUID
    metric: str
    value: float
    unit: str
    measured_at: datetime


class MeasurementPage(BaseModel):
    items: list[Measurement]
    next_cursor: str | None = NEXT_CURSOR


class Bucket(BaseModel):
    start: datetime = Field(description="Start of the bucket (inclusive); it lasts `bucket`.")
    count: int = Field(description="Readings in the bucket (within from..to).")
    value: float | None = Field(description="The aggregate of the bucket's readings; null for "
                                            "an empty bucket (0 for agg=count).")


class BucketSeries(BaseModel):
    """A bucketed series: every bucket of from..to in order, empty ones included."""

    metric: str
    bucket: str = Field(description="The bucket width as asked, e.g. 1m.")
    agg: str = Field(description="avg, min, max, count or p95.")
    items: list[Bucket]


class Experiment(BaseModel):
    experiment_id: str
    status: str = Field(description="running, completed, failed, rejected or cancelled.")
    target_hex: str | None
    target_lab: list[float] | None
    dyes: list[str] | None
    budget_wells: int | None
    batch_size: int | None
    tolerance_de: float | None
    requested_by: str | None
    requested_at: datetime | None
    iterations: int
    wells_used: int | None
    best_well: str | None
    best_volumes: dict[str, float] | None
    best_de: float | None
    reason: str | None
    finished_at: datetime | None


class ExperimentPage(BaseModel):
    items: list[Experiment]
    next_cursor: str | None = NEXT_CURSOR


class RobotRun(BaseModel):
    run_id: str
    iteration: int
    status: str = Field(description="requested, running, succeeded or failed.")
    protocol_hash: str | None
    mode: str | None
    commands: int | None
    wells: int | None
    error: str | None
    requested_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


class WellCounts(BaseModel):
    proposed: int
    dispensed: int
    measured: int
    scored: int


class RunSummary(BaseModel):
    status: str | None
    command_types: dict[str, int]
    command_statuses: dict[str, int]


class ExperimentSummary(BaseModel):
    wells: WellCounts
    best_de: float | None
    runs: dict[str, RunSummary]


class ExperimentDetail(Experiment):
    runs: list[RobotRun]
    summary: ExperimentSummary | None = Field(
        description="From MongoDB; null when MongoDB has no document for it or does not answer.")


class Well(BaseModel):
    well: str
    iteration: int | None
    volumes: dict[str, float] | None = Field(description="Proposed: dye -> µL.")
    water_ul: float | None
    run_id: str | None
    dispensed: dict[str, float] | None = Field(
        description="What the robot's commands put in: source -> µL.")
    rgb: list[int] | None
    lab: list[float] | None
    instrument_id: str | None
    delta_e: float | None
    proposed_at: datetime | None
    dispensed_at: datetime | None
    measured_at: datetime | None
    scored_at: datetime | None


class WellList(BaseModel):
    items: list[Well]


class Command(BaseModel):
    index: int
    command_id: str
    command_key: str | None
    command_type: str
    status: str
    params: Any
    result: Any
    error: Any
    created_at: str | None
    started_at: str | None
    completed_at: str | None


class CommandPage(BaseModel):
    items: list[Command]
    next_cursor: str | None = NEXT_CURSOR


class Live(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str = Field(description="ok, or unavailable.")
    checks: dict[str, str] = Field(description="postgres and mongo: ok, or why not.")


class DeviceCommand(BaseModel):
    """A command to a device. `status` is the highest-ranked status its events gave it, whatever
    order they were projected in, so it never goes back: ISSUED < DISPATCHED (the device
    processor let it through to the device) < ACCEPTED < STARTED < TIMED_OUT < REJECTED <
    COMPLETED < FAILED (the last four are final). Fields of CommandIssued are null while only
    later events are known. `progress`, `remaining_s` and `intermediate` are those of its latest
    progress report (a CommandStarted with a progress, or a CommandProgress), at `progress_at`."""

    command_id: str
    device_id: str
    idempotency_key: str | None
    command_type: str | None
    payload: Any = Field(description="The command's JSON payload.")
    issued_by: str | None
    issued_at: datetime | None
    expires_at: datetime | None
    status: CommandStatus
    status_at: datetime = Field(description="When the event that set `status` happened.")
    progress: float | None = Field(description="How far it has come, 0 to 1, by its latest "
                                               "progress report.")
    remaining_s: float | None = Field(description="The seconds left its latest progress report "
                                                  "estimated.")
    intermediate: Any = Field(description="The intermediate response (JSON) of its latest "
                                          "progress report.")
    progress_at: datetime | None = Field(description="When its latest progress report happened.")
    result: Any = Field(description="CommandCompleted's JSON result, when completed.")
    error: str | None = Field(description="CommandFailed's error, when failed.")
    reason_code: str | None = Field(description="Why rejected (the processor's code) or "
                                                "timed_out.")
    reason: str | None
    updated_at: datetime = Field(description="The time of its latest event.")


class DeviceCommandPage(BaseModel):
    items: list[DeviceCommand]
    next_cursor: str | None = NEXT_CURSOR


class CommandEvent(BaseModel):
    event_id: uuid.UUID
    event_type: CommandEventType = Field(description="The event: a CommandProgress is an entry of "
                                                     "status STARTED.")
    status: CommandStatus = Field(description="The status the event gives the command.")
    occurred_at: datetime
    source: str
    detail: dict[str, Any] = Field(description="What the event added: command_type, issued_by, "
                                               "expires_at, progress, remaining_s, "
                                               "intermediate, result, error, reason_code, "
                                               "reason.")


class DeviceCommandDetail(DeviceCommand):
    history: list[CommandEvent] = Field(
        description="Every event of the command, by time (ties by status rank, a "
                    "CommandProgress after the CommandStarted).")


class Alert(BaseModel):
    alert_id: uuid.UUID = Field(description="The AnomalyDetected event's id.")
    device_id: str
    metric: str
    value: float
    unit: str
    measured_at: datetime
    measurement_id: uuid.UUID
    rule: str = Field(description="The rule that flagged the reading, e.g. zscore.")
    score: float
    threshold: float
    window_mean: float
    window_stddev: float
    window_count: int
    detected_at: datetime


class AlertPage(BaseModel):
    items: list[Alert]
    next_cursor: str | None = NEXT_CURSOR


class AuditEntry(BaseModel):
    event_id: uuid.UUID = Field(description="The command event (or the refusal) this row is.")
    at: datetime = Field(description="When it was asked.")
    user_id: str = Field(description="Who asked (the token's subject).")
    roles: list[str] = Field(description="The labbus roles the token carried.")
    client_ip: str | None = Field(description="From where, as the entry point saw it.")
    user_agent: str | None
    token_id: str | None = Field(description="The token's jti.")
    action: str = Field(description="The permission exercised, e.g. experiment:start.")
    event_type: str
    subject: str = Field(description="What it was about: an experiment, a device, or for a "
                                     "refusal the request (method and path).")
    outcome: str = Field(description="requested (not decided yet), accepted, rejected or "
                                     "denied (refused at the entry point).")
    reason: str | None = Field(description="Why it was rejected or denied.")
    outcome_at: datetime | None


class AuditPage(BaseModel):
    items: list[AuditEntry]
    next_cursor: str | None = NEXT_CURSOR


# -- test protocols (issue 11) ------------------------------------------------------------------

ServiceRequestStatus = Literal["submitted", "running", "rejected", "completed"]
ReportFormat = Literal["pdf", "xlsx", "csv"]


class ExecutionCounts(BaseModel):
    """From the request's executions as projected now (before its completion too)."""

    total: int = Field(description="Executions assigned (samples x protocols).")
    running: int = Field(description="Assigned or started, not ended.")
    passed: int
    failed: int


class ServiceRequest(BaseModel):
    request_id: str
    status: ServiceRequestStatus = Field(
        description="submitted; running once an execution is assigned; rejected (see "
                    "`rejection_reasons`) or completed (see `verdict`). Never moves back.")
    customer: str
    module_type: str
    module_area_m2: float
    sample_ids: list[str]
    protocols: list[dict[str, Any]] = Field(
        description="As requested: [{protocol_id, version (null: the latest), inputs}].")
    submitted_by: str
    submitted_at: datetime
    rejection_reasons: list[str] | None = Field(description="Why it was rejected, each reason.")
    verdict: Literal["pass", "fail"] | None = Field(
        description="Once completed: pass when every execution passed.")
    counts: ExecutionCounts
    finished_at: datetime | None = Field(description="When it was rejected or completed.")
    updated_at: datetime = Field(description="The time of its latest event projected.")


class ServiceRequestPage(BaseModel):
    items: list[ServiceRequest]
    next_cursor: str | None = NEXT_CURSOR


class CriterionResult(BaseModel):
    """One criterion as the QC judged it (QcEvaluated)."""

    id: str
    description: str
    clause: str
    operator: str
    unit: str
    value: float | None = Field(description="null: not computed.")
    limit: list[float] = Field(description="[x] or [low, high]; empty when not computed.")
    verdict: str = Field(description="pass, fail or not_applicable.")
    message: str


class EnteredResult(BaseModel):
    value: float | None
    unit: str
    entered_by: str
    at: datetime


class Execution(BaseModel):
    execution_id: str
    sample_id: str
    protocol_id: str
    template_version: int
    template_sha256: str | None = Field(description="The content hash of the version it ran.")
    inputs: dict[str, float | None] | None
    status: Literal["assigned", "running", "passed", "failed"] = Field(
        description="assigned < running < passed | failed; the first end stands.")
    verdict: Literal["pass", "fail"] | None
    qc_verdict: str | None = Field(description="QcEvaluated's verdict, once evaluated.")
    reason_code: str | None = Field(description="Why it failed: qc_failed, missing_reading, "
                                                "timeout, command_rejected, ...")
    reason: str | None
    steps: list[str] | None
    results: dict[str, float | None] | None = Field(
        description="Analysis results, name -> value (null: not computable).")
    units: dict[str, str] | None
    problems: list[str] | None
    criteria: list[CriterionResult] | None = Field(description="Per criterion, once judged.")
    entered: dict[str, EnteredResult] = Field(description="Values entered by hand, by name.")
    assigned_at: datetime | None
    started_at: datetime | None
    analysed_at: datetime | None
    finished_at: datetime | None
    abort_requested_by: str | None = Field(
        description="Who asked to abort it (the first abort request); the end says whether it "
                    "was aborted (reason_code `aborted`) or had ended already.")
    abort_reason: str | None
    abort_requested_at: datetime | None


class Sample(BaseModel):
    """A sample the lab received, as its LIMS registered it (the latest registration)."""

    sample_id: str
    lims_ref: str = Field(description="The LIMS's own reference.")
    customer: str
    module_type: str
    module_area_m2: float
    serial_number: str
    received_at: datetime = Field(description="When the lab received it (the LIMS's time).")
    registered_by: str
    registered_at: datetime = Field(description="When the (latest) registration was made.")
    registrations: int = Field(description="Registrations of this id seen (a LIMS correcting "
                                           "its record registers it again).")


class SamplePage(BaseModel):
    items: list[Sample]
    next_cursor: str | None = NEXT_CURSOR


class SampleServiceRequest(BaseModel):
    """A service request that names the sample."""

    request_id: str
    status: ServiceRequestStatus
    customer: str
    verdict: Literal["pass", "fail"] | None
    rejection_reasons: list[str] | None
    submitted_at: datetime


class SampleExecution(BaseModel):
    """An execution on the sample."""

    execution_id: str
    request_id: str
    protocol_id: str
    template_version: int
    status: Literal["assigned", "running", "passed", "failed"]
    verdict: Literal["pass", "fail"] | None
    reason_code: str | None
    finished_at: datetime | None


class SampleDetail(Sample):
    service_requests: list[SampleServiceRequest] = Field(
        description="The requests naming it, by submission time.")
    executions: list[SampleExecution] = Field(description="By request, protocol, version.")


class RequestSample(BaseModel):
    sample_id: str
    registration: Sample | None = Field(
        description="Its registration as the LIMS made it; null: not registered (the testing "
                    "processor then rejects the request, or it was submitted before the rule).")


class Inspection(BaseModel):
    sample_id: str
    inspector: str
    findings: list[str]
    defects: list[str]
    photo_refs: list[str]
    at: datetime


class NonConformance(BaseModel):
    nc_id: str
    request_id: str
    execution_id: str
    sample_id: str
    protocol_id: str
    template_version: int
    criteria: list[str] = Field(description="The criteria that failed.")
    description: str
    raised_at: datetime


class NonConformancePage(BaseModel):
    items: list[NonConformance]
    next_cursor: str | None = NEXT_CURSOR


class Report(BaseModel):
    format: ReportFormat
    name: str = Field(description="The file name.")
    content_type: str
    sha256: str = Field(description="Of the file's bytes (its address in the artifact store).")
    size: int
    certificate: bool = Field(description="The PDF holds a certificate page.")
    generated_at: datetime
    url: str = Field(description="Where to download it (this API).")


class ServiceRequestDetail(ServiceRequest):
    samples: list[RequestSample] = Field(description="Each of `sample_ids` with its "
                                                     "registration.")
    inspections: list[Inspection] = Field(description="In time order.")
    executions: list[Execution] = Field(description="By sample, protocol, version.")
    non_conformances: list[NonConformance]
    reports: list[Report] = Field(description="The latest report of each format generated.")


class ProtocolVersion(BaseModel):
    version: int
    title: str
    sha256: str = Field(description="The content hash (sha256 of the canonical JSON), which "
                                    "executions record.")


class Protocol(BaseModel):
    protocol_id: str
    title: str = Field(description="The latest version's title.")
    latest_version: int
    standard: dict[str, Any] = Field(description="The standard the latest version follows.")
    versions: list[ProtocolVersion]


class ProtocolList(BaseModel):
    items: list[Protocol]


class ProtocolTemplateVersion(ProtocolVersion):
    template: dict[str, Any] = Field(description="The template as written "
                                                 "(schemas/protocols/protocol-template.schema"
                                                 ".json).")


class ProtocolDetail(BaseModel):
    protocol_id: str
    latest_version: int
    versions: list[ProtocolTemplateVersion] = Field(description="Every version, oldest first.")
