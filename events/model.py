"""Events as small frozen dataclasses: an Envelope plus the payload fields of one .avsc."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

E = TypeVar("E", bound="Event")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asked for an event: the verified caller of an entry point (the command gateway
    fills it from the token and the request; the audit log is built from it)."""

    user_id: str
    roles: tuple[str, ...]
    client_ip: str | None = None
    user_agent: str | None = None
    token_id: str | None = None

    def to_record(self) -> dict:
        return {"user_id": self.user_id, "roles": list(self.roles), "client_ip": self.client_ip,
                "user_agent": self.user_agent, "token_id": self.token_id}

    @classmethod
    def from_record(cls, record: dict | None) -> Actor | None:
        if record is None:
            return None
        return cls(record["user_id"], tuple(record["roles"]), record.get("client_ip"),
                   record.get("user_agent"), record.get("token_id"))


@dataclass(frozen=True, slots=True)
class Envelope:
    event_id: uuid.UUID
    event_type: str
    schema_version: int
    occurred_at: datetime
    recorded_at: datetime
    source: str
    subject: str
    correlation_id: uuid.UUID | None
    causation_id: uuid.UUID | None
    sequence: int
    actor: Actor | None = None  # schema v2 of every event; data written before decodes as None


def current_version(event_type: str) -> int:
    """The version of `event_type`'s current schema in schemas/ (what the codec writes with), so
    an event made here equals the same event decoded."""
    from labbus.events.codec import default_codec  # the codec imports this module

    entry = default_codec().current.get(event_type)
    return entry.version if entry is not None else 1


ENVELOPE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Envelope))


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event; subclasses set TYPE to the full Avro name of their schema."""

    TYPE: ClassVar[str] = ""
    envelope: Envelope

    @classmethod
    def create(
        cls: type[E],
        *,
        source: str,
        subject: str,
        sequence: int,
        occurred_at: datetime | None = None,
        event_id: uuid.UUID | None = None,
        correlation_id: uuid.UUID | None = None,
        causation_id: uuid.UUID | None = None,
        schema_version: int | None = None,
        actor: Actor | None = None,
        **payload: Any,
    ) -> E:
        now = utcnow()
        envelope = Envelope(
            event_id=event_id or uuid.uuid4(),
            event_type=cls.TYPE,
            schema_version=schema_version or current_version(cls.TYPE),
            occurred_at=occurred_at or now,
            recorded_at=now,
            source=source,
            subject=subject,
            correlation_id=correlation_id,
            causation_id=causation_id,
            sequence=sequence,
            actor=actor,
        )
        return cls(envelope, **payload)

    @property
    def event_id(self) -> uuid.UUID:
        return self.envelope.event_id

    @property
    def key(self) -> bytes:
        return self.envelope.subject.encode()

    def with_envelope(self: E, **changes: Any) -> E:
        return replace(self, envelope=replace(self.envelope, **changes))


@dataclass(frozen=True, slots=True)
class DeviceRegistered(Event):
    TYPE: ClassVar[str] = "lab.device.DeviceRegistered"
    device_id: str
    device_type: str
    model: str
    location: str
    metrics: list[str]
    attributes: dict[str, str] = field(default_factory=dict)
    # v2: [{"metric", "unit", "min", "max", "expected_interval_s"}]; v1 data decodes as []
    specs: list[dict] = field(default_factory=list)
    spec_version: int = 1


@dataclass(frozen=True, slots=True)
class DeviceSpecChanged(Event):
    TYPE: ClassVar[str] = "lab.device.DeviceSpecChanged"
    device_id: str
    spec_version: int
    previous_specs: list[dict]
    specs: list[dict]


@dataclass(frozen=True, slots=True)
class DeviceHeartbeat(Event):
    TYPE: ClassVar[str] = "lab.device.DeviceHeartbeat"
    device_id: str
    gateway: str


DEVICE_STATUSES = ("ONLINE", "OFFLINE", "MAINTENANCE", "ERROR")


@dataclass(frozen=True, slots=True)
class DeviceStatusChanged(Event):
    TYPE: ClassVar[str] = "lab.device.DeviceStatusChanged"
    device_id: str
    status: str  # one of DEVICE_STATUSES
    reason: str


@dataclass(frozen=True, slots=True)
class DeviceRejected(Event):
    TYPE: ClassVar[str] = "lab.device.DeviceRejected"
    device_id: str
    identity: str | None
    rpc: str
    reason_code: str
    reason: str
    peer: str


# -- commands to devices (keyed by device id, so one device's commands stay in order) ----------

@dataclass(frozen=True, slots=True)
class CommandIssued(Event):
    TYPE: ClassVar[str] = "lab.command.CommandIssued"
    command_id: str
    device_id: str
    idempotency_key: str
    command_type: str
    payload_json: str
    expires_at: datetime
    issued_by: str


@dataclass(frozen=True, slots=True)
class CommandDispatched(Event):
    """The device-lifecycle processor found a CommandIssued acceptable; relays deliver only
    these to devices, so a rejected command never reaches one. A copy of the command."""

    TYPE: ClassVar[str] = "lab.command.CommandDispatched"
    command_id: str
    device_id: str
    idempotency_key: str
    command_type: str
    payload_json: str
    expires_at: datetime
    issued_by: str


@dataclass(frozen=True, slots=True)
class CommandAccepted(Event):
    TYPE: ClassVar[str] = "lab.command.CommandAccepted"
    command_id: str
    device_id: str


@dataclass(frozen=True, slots=True)
class CommandStarted(Event):
    TYPE: ClassVar[str] = "lab.command.CommandStarted"
    command_id: str
    device_id: str
    progress: float | None = None


@dataclass(frozen=True, slots=True)
class CommandProgress(Event):
    """How far a running command has come (SiLA 2 execution info and intermediate responses)."""

    TYPE: ClassVar[str] = "lab.command.CommandProgress"
    command_id: str
    device_id: str
    progress: float | None = None
    remaining_s: float | None = None
    intermediate_json: str | None = None


@dataclass(frozen=True, slots=True)
class CommandCompleted(Event):
    TYPE: ClassVar[str] = "lab.command.CommandCompleted"
    command_id: str
    device_id: str
    result_json: str


@dataclass(frozen=True, slots=True)
class CommandFailed(Event):
    TYPE: ClassVar[str] = "lab.command.CommandFailed"
    command_id: str
    device_id: str
    error: str


@dataclass(frozen=True, slots=True)
class CommandRejected(Event):
    TYPE: ClassVar[str] = "lab.command.CommandRejected"
    command_id: str
    device_id: str
    reason_code: str
    reason: str


@dataclass(frozen=True, slots=True)
class CommandTimedOut(Event):
    TYPE: ClassVar[str] = "lab.command.CommandTimedOut"
    command_id: str
    device_id: str
    expires_at: datetime


def command_id_for(device_id: str, idempotency_key: str) -> str:
    """A repeated idempotency key for a device is the same command."""
    return derived_id(f"device/{device_id}", f"command/{idempotency_key}")


def command_digest(command_type: str, payload_json: str) -> str:
    """What a command asks for, independent of JSON formatting: an idempotency key used again
    with another digest is a conflict, with the same digest the same command."""
    try:
        payload = json.loads(payload_json or "{}")
    except ValueError:
        payload = payload_json
    canon = json.dumps([command_type, payload], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


def submit_service_request(request_id: str, customer: str, module_type: str,
                           module_area_m2: float, sample_ids: list[str], protocols: list[dict],
                           submitted_by: str, source: str = "cli",
                           actor: Actor | None = None) -> ServiceRequestSubmitted:
    """The ServiceRequestSubmitted every entry point makes (the command gateway, `labbus testing
    submit`): its event id derives from the request id, so a retry is the same event."""
    return ServiceRequestSubmitted.create(
        source=source, subject=request_id, sequence=1, actor=actor,
        event_id=uuid.UUID(derived_id(request_id, "submitted")), request_id=request_id,
        customer=customer, module_type=module_type, module_area_m2=module_area_m2,
        sample_ids=list(sample_ids), protocols=[dict(p) for p in protocols],
        submitted_by=submitted_by)


def register_sample(sample_id: str, lims_ref: str, customer: str, module_type: str,
                    module_area_m2: float, serial_number: str, received_at: datetime,
                    registered_by: str, source: str = "cli",
                    actor: Actor | None = None) -> SampleRegistered:
    """The SampleRegistered every entry point makes (the command gateway, `labbus samples
    register`): its event id derives from the sample and what is registered, so a retry is the
    same event and a corrected registration another."""
    asked = json.dumps([lims_ref, customer, module_type, module_area_m2, serial_number,
                        received_at.isoformat()], separators=(",", ":"))
    digest = hashlib.sha256(asked.encode()).hexdigest()[:32]
    return SampleRegistered.create(
        source=source, subject=sample_id, sequence=1, actor=actor,
        event_id=uuid.UUID(derived_id(f"sample/{sample_id}", f"registered/{digest}")),
        sample_id=sample_id, lims_ref=lims_ref, customer=customer, module_type=module_type,
        module_area_m2=float(module_area_m2), serial_number=serial_number,
        received_at=received_at, registered_by=registered_by)


def request_abort(execution_id: str, reason: str, requested_by: str, source: str = "cli",
                  actor: Actor | None = None) -> ExecutionAbortRequested:
    """The ExecutionAbortRequested every entry point makes (the command gateway, `labbus
    testing abort`). Only the first abort of a running execution counts."""
    return ExecutionAbortRequested.create(
        source=source, subject=execution_id, sequence=0, actor=actor,
        execution_id=execution_id, reason=reason, requested_by=requested_by)


def issue_command(device: str, command_type: str, payload: dict, timeout_s: float,
                  idempotency_key: str | None, issued_by: str, source: str = "cli",
                  actor: Actor | None = None) -> CommandIssued:
    """A CommandIssued as every entry point makes it (`labbus command send`, the command
    gateway): the command id from (device, key) — a random key when none is given — and an event
    id that names what is asked (the same key with another payload is another event, which the
    device processor refuses; with the same payload the same event, dropped downstream)."""
    from datetime import timedelta

    key = idempotency_key or str(uuid.uuid4())
    command_id = command_id_for(device, key)
    payload_json = json.dumps(payload, separators=(",", ":"))
    event_id = derived_id(command_id, f"issued/{command_digest(command_type, payload_json)}")
    return CommandIssued.create(
        source=source, subject=device, sequence=0, event_id=uuid.UUID(event_id), actor=actor,
        command_id=command_id, device_id=device, idempotency_key=key,
        command_type=command_type, payload_json=payload_json,
        expires_at=utcnow() + timedelta(seconds=timeout_s), issued_by=issued_by)


# The final states of a command: after one of these nothing more happens to it.
COMMAND_FINAL = ("lab.command.CommandCompleted", "lab.command.CommandFailed",
                 "lab.command.CommandRejected", "lab.command.CommandTimedOut")


@dataclass(frozen=True, slots=True)
class MeasurementRecorded(Event):
    TYPE: ClassVar[str] = "lab.measurement.MeasurementRecorded"
    device_id: str
    metric: str
    value: float
    unit: str


@dataclass(frozen=True, slots=True)
class MeasurementValidated(Event):
    TYPE: ClassVar[str] = "lab.measurement.MeasurementValidated"
    measurement_id: uuid.UUID
    device_id: str
    metric: str
    value: float
    unit: str
    measured_at: datetime
    # v2 (README "Quality and anomalies"): good / suspect / bad against the device's registered
    # specs, and the rule that set suspect or bad; None in data written before v2
    quality: str | None = None
    quality_rule: str | None = None


@dataclass(frozen=True, slots=True)
class MeasurementRejected(Event):
    TYPE: ClassVar[str] = "lab.measurement.MeasurementRejected"
    measurement_id: uuid.UUID
    device_id: str
    metric: str
    value: float
    unit: str
    measured_at: datetime
    reason_code: str
    reason: str


# -- quality (issue 9): anomalies flagged by rolling statistics, keyed by device id ------------

@dataclass(frozen=True, slots=True)
class AnomalyDetected(Event):
    TYPE: ClassVar[str] = "lab.quality.AnomalyDetected"
    device_id: str
    metric: str
    value: float
    unit: str
    measured_at: datetime
    measurement_id: uuid.UUID
    rule: str  # e.g. "zscore"
    score: float
    threshold: float
    window_mean: float
    window_stddev: float
    window_count: int


@dataclass(frozen=True, slots=True)
class DeadLetter(Event):
    TYPE: ClassVar[str] = "lab.deadletter.DeadLetter"
    source_topic: str
    source_partition: int
    source_offset: int
    original_key: bytes | None
    original_value: bytes | None
    error_type: str
    error: str
    failed_by: str


# -- closed-loop colour mixing (issue 3) ------------------------------------------------------
# A recipe record is a plain dict {"well": str, "volumes": {dye: µL}, "water_ul": float}.


@dataclass(frozen=True, slots=True)
class ExperimentRequested(Event):
    TYPE: ClassVar[str] = "lab.experiment.ExperimentRequested"
    experiment_id: str
    target_hex: str | None
    target_lab: list[float]
    dyes: list[str]
    budget_wells: int
    batch_size: int
    tolerance_de: float
    requested_by: str


@dataclass(frozen=True, slots=True)
class ExperimentRejected(Event):
    TYPE: ClassVar[str] = "lab.experiment.ExperimentRejected"
    experiment_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class RecipesProposed(Event):
    TYPE: ClassVar[str] = "lab.experiment.RecipesProposed"
    experiment_id: str
    iteration: int
    recipes: list[dict]
    predicted_de: float | None
    note: str


@dataclass(frozen=True, slots=True)
class RecipeRejected(Event):
    TYPE: ClassVar[str] = "lab.experiment.RecipeRejected"
    experiment_id: str
    iteration: int
    reasons: list[str]


@dataclass(frozen=True, slots=True)
class RobotRunRequested(Event):
    TYPE: ClassVar[str] = "lab.robot.RobotRunRequested"
    run_id: str
    experiment_id: str
    iteration: int
    protocol_hash: str
    protocol_text: str
    recipes: list[dict]


@dataclass(frozen=True, slots=True)
class RobotRunStarted(Event):
    TYPE: ClassVar[str] = "lab.robot.RobotRunStarted"
    run_id: str
    experiment_id: str
    iteration: int
    mode: str


@dataclass(frozen=True, slots=True)
class RobotCommandExecuted(Event):
    TYPE: ClassVar[str] = "lab.robot.RobotCommandExecuted"
    run_id: str
    experiment_id: str
    iteration: int
    command_id: str
    command_key: str | None
    command_type: str
    params_json: str
    result_json: str | None
    status: str
    created_at: str | None
    started_at: str | None
    completed_at: str | None
    error_json: str | None
    index: int


@dataclass(frozen=True, slots=True)
class WellDispensed(Event):
    TYPE: ClassVar[str] = "lab.robot.WellDispensed"
    run_id: str
    experiment_id: str
    iteration: int
    well: str
    volumes: dict[str, float]


@dataclass(frozen=True, slots=True)
class RobotRunFinished(Event):
    TYPE: ClassVar[str] = "lab.robot.RobotRunFinished"
    run_id: str
    experiment_id: str
    iteration: int
    commands: int
    wells: int


@dataclass(frozen=True, slots=True)
class RobotRunFailed(Event):
    TYPE: ClassVar[str] = "lab.robot.RobotRunFailed"
    run_id: str
    experiment_id: str
    iteration: int
    error: str


@dataclass(frozen=True, slots=True)
class WellColourMeasured(Event):
    TYPE: ClassVar[str] = "lab.colour.WellColourMeasured"
    experiment_id: str
    run_id: str
    iteration: int
    well: str
    rgb: list[int]
    lab: list[float]
    instrument_id: str


@dataclass(frozen=True, slots=True)
class WellScored(Event):
    TYPE: ClassVar[str] = "lab.experiment.WellScored"
    experiment_id: str
    iteration: int
    well: str
    delta_e: float
    volumes: dict[str, float]
    rgb: list[int]


@dataclass(frozen=True, slots=True)
class ExperimentCompleted(Event):
    TYPE: ClassVar[str] = "lab.experiment.ExperimentCompleted"
    experiment_id: str
    best_well: str
    best_volumes: dict[str, float]
    best_de: float
    wells_used: int
    reason: str


@dataclass(frozen=True, slots=True)
class ExperimentFailed(Event):
    TYPE: ClassVar[str] = "lab.experiment.ExperimentFailed"
    experiment_id: str
    reason: str
    wells_used: int
    best_de: float | None


@dataclass(frozen=True, slots=True)
class ExperimentCancelRequested(Event):
    """A command: stop a campaign (no new batches; a robot run in flight may finish)."""

    TYPE: ClassVar[str] = "lab.experiment.ExperimentCancelRequested"
    experiment_id: str
    reason: str
    requested_by: str


@dataclass(frozen=True, slots=True)
class ExperimentCancelled(Event):
    """A campaign stopped on request. `wells_used`: wells sent to the robot, a run in flight
    included (it may still finish and be scored)."""

    TYPE: ClassVar[str] = "lab.experiment.ExperimentCancelled"
    experiment_id: str
    reason: str
    cancelled_by: str
    wells_used: int
    best_de: float | None


# -- quotas (issue 10): the quota processor's decisions, keyed by experiment id ---------------

@dataclass(frozen=True, slots=True)
class QuotaReserved(Event):
    """A campaign's budget set aside from its user's balance; the campaign may start.
    `charged`: whether the user's balance paid for it (False: a user without a quota);
    `remaining`: the balance after it (None when not charged)."""

    TYPE: ClassVar[str] = "lab.quota.QuotaReserved"
    experiment_id: str
    user_id: str
    wells: int
    charged: bool
    remaining: int | None


@dataclass(frozen=True, slots=True)
class QuotaRefunded(Event):
    """A campaign ended: the wells of its reservation it did not use go back to the balance
    (`wells`, possibly 0; given back only when the reservation was `charged`)."""

    TYPE: ClassVar[str] = "lab.quota.QuotaRefunded"
    experiment_id: str
    user_id: str
    wells: int
    wells_used: int
    charged: bool
    remaining: int | None


# -- users of the built-in issuer (issue 10), keyed by user id. Credentials never go here. -----

@dataclass(frozen=True, slots=True)
class UserRegistered(Event):
    TYPE: ClassVar[str] = "lab.user.UserRegistered"
    user_id: str
    email: str
    roles: list[str]
    registered_by: str


@dataclass(frozen=True, slots=True)
class RoleGranted(Event):
    TYPE: ClassVar[str] = "lab.user.RoleGranted"
    user_id: str
    role: str
    granted_by: str


@dataclass(frozen=True, slots=True)
class RoleRevoked(Event):
    TYPE: ClassVar[str] = "lab.user.RoleRevoked"
    user_id: str
    role: str
    revoked_by: str


@dataclass(frozen=True, slots=True)
class UserDisabled(Event):
    TYPE: ClassVar[str] = "lab.user.UserDisabled"
    user_id: str
    reason: str
    disabled_by: str


@dataclass(frozen=True, slots=True)
class QuotaGranted(Event):
    TYPE: ClassVar[str] = "lab.user.QuotaGranted"
    user_id: str
    wells: int
    granted_by: str
    note: str = ""


@dataclass(frozen=True, slots=True)
class AccessDenied(Event):
    """An entry point refused a caller with a valid token whose roles lack the permission (its
    actor says who and from where); the audit log shows it as `denied`."""

    TYPE: ClassVar[str] = "lab.user.AccessDenied"
    user_id: str
    permission: str
    request: str  # method and path, e.g. "POST /commands"
    reason: str


# -- test protocols (issue 11): service requests keyed by request id, executions by execution id

@dataclass(frozen=True, slots=True)
class ServiceRequestSubmitted(Event):
    """A customer's samples and the protocols to run on each: one execution per sample x
    protocol. `protocols`: [{"protocol_id", "version" (None: the latest), "inputs": {name:
    value}}]."""

    TYPE: ClassVar[str] = "lab.testing.ServiceRequestSubmitted"
    request_id: str
    customer: str
    module_type: str
    module_area_m2: float
    sample_ids: list[str]
    protocols: list[dict]
    submitted_by: str


@dataclass(frozen=True, slots=True)
class ServiceRequestRejected(Event):
    TYPE: ClassVar[str] = "lab.testing.ServiceRequestRejected"
    request_id: str
    reasons: list[str]


@dataclass(frozen=True, slots=True)
class InspectionRecorded(Event):
    TYPE: ClassVar[str] = "lab.testing.InspectionRecorded"
    request_id: str
    sample_id: str
    inspector: str
    findings: list[str]
    defects: list[str]
    photo_refs: list[str]


@dataclass(frozen=True, slots=True)
class SampleRegistered(Event):
    """A sample the lab received, as its LIMS registered it (on lab.testing.samples, keyed by
    sample id). A service request may name only registered samples of its own customer, module
    type and area (processors/testing_logic.py `sample_problems`); a sample registered again
    (a LIMS correcting its record) replaces the registration for requests submitted after."""

    TYPE: ClassVar[str] = "lab.testing.SampleRegistered"
    sample_id: str
    lims_ref: str
    customer: str
    module_type: str
    module_area_m2: float
    serial_number: str
    received_at: datetime
    registered_by: str


@dataclass(frozen=True, slots=True)
class ExecutionAbortRequested(Event):
    """Abort a running execution: the testing processor ends it as ExecutionFailed (`aborted`,
    with this reason); an execution already ended is left as it ended (a no-op)."""

    TYPE: ClassVar[str] = "lab.testing.ExecutionAbortRequested"
    execution_id: str
    reason: str
    requested_by: str


@dataclass(frozen=True, slots=True)
class ProtocolAssigned(Event):
    """Sample x protocol x template version (and its content hash) -> the execution, whose id
    derives from them (`execution_id_for`)."""

    TYPE: ClassVar[str] = "lab.testing.ProtocolAssigned"
    execution_id: str
    request_id: str
    sample_id: str
    protocol_id: str
    template_version: int
    template_sha256: str
    inputs: dict[str, float]
    module_type: str
    module_area_m2: float


@dataclass(frozen=True, slots=True)
class ExecutionStarted(Event):
    TYPE: ClassVar[str] = "lab.testing.ExecutionStarted"
    execution_id: str
    request_id: str
    sample_id: str
    protocol_id: str
    template_version: int
    steps: list[str]


@dataclass(frozen=True, slots=True)
class TestResultRecorded(Event):
    """An analysis result entered by hand (the analysis that gives it is then not computed)."""

    __test__: ClassVar[bool] = False  # not a pytest test class
    TYPE: ClassVar[str] = "lab.testing.TestResultRecorded"
    execution_id: str
    name: str
    value: float
    unit: str
    entered_by: str


@dataclass(frozen=True, slots=True)
class ExecutionAnalysed(Event):
    TYPE: ClassVar[str] = "lab.testing.ExecutionAnalysed"
    execution_id: str
    request_id: str
    sample_id: str
    protocol_id: str
    template_version: int
    results: dict[str, float]
    units: dict[str, str]
    problems: list[str]
    # v2: what the analysis read, for the reports (`labbus process reports`): step id -> metric
    # -> values, and per step that ran [{"step_id", "device_id", "started_ms", "finished_ms"}]
    # (log times, ms); v1 data decodes as empty
    readings: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class QcEvaluated(Event):
    """`criteria`: [{"id", "description", "clause", "operator", "unit", "value" (None: not
    computed), "limit" ([x] or [low, high]; [] when not computed), "verdict", "message"}]."""

    TYPE: ClassVar[str] = "lab.testing.QcEvaluated"
    execution_id: str
    request_id: str
    sample_id: str
    protocol_id: str
    template_version: int
    criteria: list[dict]
    verdict: str


@dataclass(frozen=True, slots=True)
class ExecutionPassed(Event):
    TYPE: ClassVar[str] = "lab.testing.ExecutionPassed"
    execution_id: str
    request_id: str
    sample_id: str
    protocol_id: str
    template_version: int


@dataclass(frozen=True, slots=True)
class ExecutionFailed(Event):
    TYPE: ClassVar[str] = "lab.testing.ExecutionFailed"
    execution_id: str
    request_id: str
    sample_id: str
    protocol_id: str
    template_version: int
    reason_code: str
    reason: str


@dataclass(frozen=True, slots=True)
class NonConformanceRaised(Event):
    TYPE: ClassVar[str] = "lab.testing.NonConformanceRaised"
    execution_id: str
    request_id: str
    sample_id: str
    protocol_id: str
    template_version: int
    nc_id: str
    criteria: list[str]
    description: str


@dataclass(frozen=True, slots=True)
class ServiceRequestCompleted(Event):
    TYPE: ClassVar[str] = "lab.testing.ServiceRequestCompleted"
    request_id: str
    executions: int
    passed: int
    failed: int
    verdict: str


@dataclass(frozen=True, slots=True)
class ReportGenerated(Event):
    """One report of a completed service request stored in the artifact store (`labbus process
    reports`): one per format, its id derived from request, format and sha256, so a report
    generated again (same events, same bytes) is the same event."""

    TYPE: ClassVar[str] = "lab.testing.ReportGenerated"
    request_id: str
    format: str  # pdf, xlsx or csv
    name: str  # the file name
    content_type: str
    sha256: str  # hex, the artifact's address
    size: int
    location: str  # where the store keeps it (gridfs://<db>/<bucket>/<sha256>, file:///...)
    certificate: bool  # the PDF holds a certificate page; false for xlsx and csv


TESTING_EVENTS: tuple[type[Event], ...] = (
    SampleRegistered, ServiceRequestSubmitted, ServiceRequestRejected, InspectionRecorded,
    ProtocolAssigned, ExecutionStarted, TestResultRecorded, ExecutionAbortRequested,
    ExecutionAnalysed, QcEvaluated, ExecutionPassed, ExecutionFailed, NonConformanceRaised,
    ServiceRequestCompleted, ReportGenerated)


def report_event_id(request_id: str, fmt: str, sha256: str) -> str:
    """The id of the ReportGenerated of a request's report in a format with these bytes."""
    return derived_id(f"service-request/{request_id}", f"report/{fmt}/{sha256}")


def execution_id_for(request_id: str, sample_id: str, protocol_id: str, version: int,
                     sha256: str) -> str:
    """The execution of a protocol version (by content) on a sample of a request: the same
    request handled twice assigns the same executions."""
    return derived_id(f"service-request/{request_id}",
                      f"execution/{sample_id}/{protocol_id}/v{version}/{sha256}")


def dispatched_id(issued_event_id: uuid.UUID | str) -> str:
    """The event id of the CommandDispatched the device processor makes of a CommandIssued:
    agents put it as the causation id of the readings a command produced."""
    return derived_id(issued_event_id, "dispatched")


# -- outbound webhooks (issue 11): every delivery attempt and its outcome, keyed by target ------

@dataclass(frozen=True, slots=True)
class WebhookDeliveryAttempted(Event):
    """One HTTP POST of an event to a webhook target (`labbus webhooks`) and how it ended."""

    TYPE: ClassVar[str] = "lab.webhook.WebhookDeliveryAttempted"
    target: str
    endpoint: str  # the URL without user info, query or fragment
    forwarded_event_id: uuid.UUID
    forwarded_event_type: str
    attempt: int
    max_attempts: int
    status_code: int | None
    error: str | None
    duration_ms: float
    retry_in_ms: float | None  # None: no further attempt (delivered, or attempts exhausted)


@dataclass(frozen=True, slots=True)
class WebhookDelivered(Event):
    """A webhook target accepted an event (a 2xx answer)."""

    TYPE: ClassVar[str] = "lab.webhook.WebhookDelivered"
    target: str
    endpoint: str
    forwarded_event_id: uuid.UUID
    forwarded_event_type: str
    attempts: int
    status_code: int
    elapsed_ms: float


@dataclass(frozen=True, slots=True)
class WebhookDeadLettered(Event):
    """A webhook target did not accept an event within its attempts; `body` is what was sent."""

    TYPE: ClassVar[str] = "lab.webhook.WebhookDeadLettered"
    target: str
    endpoint: str
    forwarded_event_id: uuid.UUID
    forwarded_event_type: str
    source_topic: str
    source_partition: int
    source_offset: int
    attempts: int
    last_status_code: int | None
    reason: str
    body: str


EVENT_TYPES: dict[str, type[Event]] = {
    cls.TYPE: cls
    for cls in (DeviceRegistered, DeviceSpecChanged, DeviceHeartbeat, DeviceStatusChanged,
                DeviceRejected, CommandIssued, CommandDispatched, CommandAccepted, CommandStarted,
                CommandProgress, CommandCompleted,
                CommandFailed, CommandRejected, CommandTimedOut, MeasurementRecorded,
                MeasurementValidated, MeasurementRejected, AnomalyDetected, DeadLetter,
                ExperimentRequested, ExperimentRejected, RecipesProposed, RecipeRejected,
                RobotRunRequested, RobotRunStarted, RobotCommandExecuted, WellDispensed,
                RobotRunFinished, RobotRunFailed, WellColourMeasured, WellScored,
                ExperimentCompleted, ExperimentFailed, ExperimentCancelRequested,
                ExperimentCancelled, QuotaReserved, QuotaRefunded, UserRegistered, RoleGranted,
                RoleRevoked, UserDisabled, QuotaGranted, AccessDenied, *TESTING_EVENTS,
                WebhookDeliveryAttempted, WebhookDelivered, WebhookDeadLettered)
}


def register(cls: type[E]) -> type[E]:
    """Class decorator for event types defined in other packages."""
    EVENT_TYPES[cls.TYPE] = cls
    return cls


DERIVED_NAMESPACE = uuid.UUID("0d3c6a1e-5b7f-4c59-8f1e-2a9d4b6c7e10")
_NS = DERIVED_NAMESPACE.bytes


def derived_id(parent: uuid.UUID | str, purpose: str) -> str:
    """A deterministic id for an event derived from another, so reprocessing re-emits the same id
    and idempotent consumers drop the repeat. Equals str(uuid5(DERIVED_NAMESPACE, f"{parent}/
    {purpose}")), computed without the uuid module's slow paths (it is on the hot path)."""
    h = bytearray(hashlib.sha1(_NS + f"{parent}/{purpose}".encode()).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50
    h[8] = (h[8] & 0x3F) | 0x80
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"
