"""The topic catalog: every topic labbus uses, its partitioning, retention and allowed events."""

from __future__ import annotations

from dataclasses import dataclass

from labbus.events.config import Config

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    key: str
    event_types: tuple[str, ...]
    retention_ms: int | None = 7 * DAY_MS
    compacted: bool = False
    description: str = ""

    def configs(self) -> dict[str, str]:
        cfg = {"min.insync.replicas": "1"}
        if self.compacted:
            cfg["cleanup.policy"] = "compact"
        if self.retention_ms is not None and not self.compacted:
            cfg["retention.ms"] = str(self.retention_ms)
        return cfg


DEVICES = TopicSpec(
    "lab.devices", 3, "device_id", ("lab.device.DeviceRegistered",), compacted=True,
    description="Device registrations; compacted, so the latest registration per device is kept.")
MEASUREMENTS_RECORDED = TopicSpec(
    "lab.measurements.recorded", 6, "device_id", ("lab.measurement.MeasurementRecorded",),
    description="Raw readings as instrument agents publish them.")
MEASUREMENTS_VALIDATED = TopicSpec(
    "lab.measurements.validated", 6, "device_id", ("lab.measurement.MeasurementValidated",),
    retention_ms=30 * DAY_MS, description="Readings that passed validation.")
MEASUREMENTS_REJECTED = TopicSpec(
    "lab.measurements.rejected", 3, "device_id", ("lab.measurement.MeasurementRejected",),
    retention_ms=30 * DAY_MS, description="Readings that failed validation, with the reason.")
DEAD_LETTER = TopicSpec(
    "lab.deadletter", 1, "original key", ("lab.deadletter.DeadLetter",),
    retention_ms=30 * DAY_MS,
    description="Undecodable or unprocessable messages with their original bytes and the error.")

DEVICE_CHANGES = TopicSpec(
    "lab.devices.changes", 3, "device_id", ("lab.device.DeviceSpecChanged",), retention_ms=-1,
    description="Spec versions of devices: a re-registration with different specs is a new "
                "version, never a silent overwrite. Kept forever (lab.devices is compacted).")
DEVICE_STATUS = TopicSpec(
    "lab.devices.status", 6, "device_id",
    ("lab.device.DeviceHeartbeat", "lab.device.DeviceStatusChanged"),
    description="Heartbeats and status changes (ONLINE/OFFLINE/MAINTENANCE/ERROR), one device's "
                "in order.")
DEVICE_REJECTED = TopicSpec(
    "lab.devices.rejected", 3, "device_id", ("lab.device.DeviceRejected",),
    retention_ms=30 * DAY_MS,
    description="Requests the gateway refused: identity, permission, malformed input; the reason.")
COMMANDS = TopicSpec(
    "lab.commands", 6, "device_id",
    ("lab.command.CommandIssued", "lab.command.CommandDispatched", "lab.command.CommandAccepted",
     "lab.command.CommandStarted", "lab.command.CommandProgress", "lab.command.CommandCompleted",
     "lab.command.CommandFailed", "lab.command.CommandRejected", "lab.command.CommandTimedOut"),
    retention_ms=30 * DAY_MS,
    description="Commands to devices and every status they pass through. Keyed by device, so one "
                "device's commands and their statuses stay in order.")
ALERTS = TopicSpec(
    "lab.alerts", 3, "device_id", ("lab.quality.AnomalyDetected",), retention_ms=30 * DAY_MS,
    description="Anomalies flagged in validated readings (flagged, not dropped), with the rule, "
                "its score and the rolling window it was judged against.")

EXPERIMENTS = TopicSpec(
    "lab.experiments", 3, "experiment_id",
    ("lab.experiment.ExperimentRequested", "lab.experiment.ExperimentRejected",
     "lab.experiment.RecipesProposed", "lab.experiment.RecipeRejected", "lab.experiment.WellScored",
     "lab.experiment.ExperimentCompleted", "lab.experiment.ExperimentFailed",
     "lab.experiment.ExperimentCancelRequested", "lab.experiment.ExperimentCancelled",
     "lab.quota.QuotaReserved", "lab.quota.QuotaRefunded"),
    retention_ms=-1,
    description="Colour-mixing campaigns: requests, cancel requests, quota reservations and "
                "refunds, proposals, scores and verdicts. Kept forever: the experiment "
                "processor rebuilds its state from it.")
ROBOT_RUNS = TopicSpec(
    "lab.robot.runs", 3, "experiment_id",
    ("lab.robot.RobotRunRequested", "lab.robot.RobotRunStarted", "lab.robot.RobotCommandExecuted",
     "lab.robot.WellDispensed", "lab.robot.RobotRunFinished", "lab.robot.RobotRunFailed"),
    retention_ms=-1,
    description="OT-2 runs: protocol, every engine command, dispensed wells, outcome. Keyed by "
                "experiment so one experiment's runs stay in order.")
COLOUR_READINGS = TopicSpec(
    "lab.colour.readings", 3, "experiment_id", ("lab.colour.WellColourMeasured",),
    retention_ms=-1, description="Plate reader colour readings of dispensed wells.")

USERS = TopicSpec(
    "lab.users", 3, "user_id",
    ("lab.user.UserRegistered", "lab.user.RoleGranted", "lab.user.RoleRevoked",
     "lab.user.UserDisabled", "lab.user.QuotaGranted", "lab.user.AccessDenied"),
    retention_ms=-1,
    description="Users of the built-in token issuer: registrations, roles granted and revoked, "
                "disabling, quotas; and every request an entry point refused for lack of a "
                "permission. Never credentials. Kept forever: the users read model is "
                "rebuilt from it.")

WEBHOOKS = TopicSpec(
    "lab.webhooks", 3, "target",
    ("lab.webhook.WebhookDeliveryAttempted", "lab.webhook.WebhookDelivered",
     "lab.webhook.WebhookDeadLettered"),
    retention_ms=30 * DAY_MS,
    description="Outbound webhooks (`labbus webhooks`): every delivery attempt (target, event, "
                "attempt, status or error, duration) and each delivery's outcome, delivered or "
                "dead-lettered. Keyed by target, so one target's deliveries stay in order.")

# The quota processor's repartition topic: copies (the same bytes) of the lab.users events and of
# the experiment requests and ends, keyed by user id, so that everything about one user is one
# partition of one topic, in one order (processors/quota.py). Only that processor writes it.
QUOTA_INBOX = TopicSpec(
    "lab.quota.inbox", 3, "user_id",
    ("lab.user.UserRegistered", "lab.user.RoleGranted", "lab.user.RoleRevoked",
     "lab.user.QuotaGranted", "lab.experiment.ExperimentRequested",
     "lab.experiment.ExperimentRejected", "lab.experiment.ExperimentCompleted",
     "lab.experiment.ExperimentFailed", "lab.experiment.ExperimentCancelled"),
    retention_ms=-1,
    description="The quota processor's repartition topic: lab.users events and experiment "
                "requests and ends re-keyed by user id (copies; the originals' topics route "
                "these types). Kept forever: the quota decisions are a function of it.")

# Test protocols (issue 11). Six partitions each, like lab.commands and lab.measurements.recorded:
# the testing processor reads all five topics below plus those two, and a faust processor's
# inputs must be co-partitioned.
TESTING_REQUESTS = TopicSpec(
    "lab.testing.requests", 6, "request_id",
    ("lab.testing.ServiceRequestSubmitted", "lab.testing.ServiceRequestRejected",
     "lab.testing.InspectionRecorded", "lab.testing.ServiceRequestCompleted",
     "lab.testing.ReportGenerated"),
    retention_ms=-1,
    description="Service requests (customer, module type and area, samples, protocols), their "
                "rejection with the reasons, inspections, completion and reports (one "
                "ReportGenerated per format). Kept forever.")
TESTING_EXECUTIONS = TopicSpec(
    "lab.testing.executions", 6, "execution_id",
    ("lab.testing.ProtocolAssigned", "lab.testing.ExecutionStarted",
     "lab.testing.TestResultRecorded", "lab.testing.ExecutionAbortRequested",
     "lab.testing.ExecutionAnalysed",
     "lab.testing.QcEvaluated", "lab.testing.ExecutionPassed", "lab.testing.ExecutionFailed",
     "lab.testing.NonConformanceRaised"),
    retention_ms=-1,
    description="Executions (sample x protocol x template version): assignment, start, values "
                "entered by hand, abort requests, analysis, criteria, verdict, "
                "non-conformances. Kept forever.")
# Samples as the lab's LIMS registers them (inbound, POST /samples). Not an input of a faust
# processor (the testing processor reads it in full as a View, as lab.devices), so not
# co-partitioned with the testing topics.
TESTING_SAMPLES = TopicSpec(
    "lab.testing.samples", 3, "sample_id", ("lab.testing.SampleRegistered",),
    retention_ms=-1,
    description="Samples received, as the LIMS registered them (LIMS reference, customer, "
                "module type and area, serial number, time received). Kept forever: a service "
                "request is judged against them.")
# The testing processor's repartition topic: copies (the same bytes) of the command events and
# readings of its executions (correlation id = execution id), keyed by execution id, and of the
# executions' ends, keyed by request id (processors/testing.py). Only that processor writes it.
TESTING_INBOX = TopicSpec(
    "lab.testing.inbox", 6, "execution_id or request_id",
    ("lab.command.CommandAccepted", "lab.command.CommandStarted",
     "lab.command.CommandCompleted", "lab.command.CommandFailed",
     "lab.command.CommandRejected", "lab.measurement.MeasurementRecorded",
     "lab.testing.ExecutionPassed", "lab.testing.ExecutionFailed"),
    retention_ms=7 * DAY_MS,
    description="The testing processor's repartition topic: command events and readings of "
                "its executions re-keyed by execution id, execution ends re-keyed by request "
                "id (copies; the originals' topics route these types).")

# The report processor's repartition topic: copies (the same bytes) of the execution events a
# report shows, keyed by request id, so that everything about one request is one partition of
# its inputs (processors/report_gen.py). Only that processor writes it.
REPORTS_INBOX = TopicSpec(
    "lab.reports.inbox", 6, "request_id",
    ("lab.testing.ProtocolAssigned", "lab.testing.ExecutionStarted",
     "lab.testing.ExecutionAnalysed", "lab.testing.QcEvaluated", "lab.testing.ExecutionPassed",
     "lab.testing.ExecutionFailed", "lab.testing.NonConformanceRaised"),
    retention_ms=30 * DAY_MS,
    description="The report processor's repartition topic: the execution events a report "
                "shows (assignment, start, analysis with the readings, criteria, verdict, "
                "non-conformances) re-keyed by request id (copies; lab.testing.executions "
                "routes these types).")

CATALOG: tuple[TopicSpec, ...] = (
    DEVICES, MEASUREMENTS_RECORDED, MEASUREMENTS_VALIDATED, MEASUREMENTS_REJECTED, DEAD_LETTER,
    DEVICE_CHANGES, DEVICE_STATUS, DEVICE_REJECTED, COMMANDS, ALERTS,
    EXPERIMENTS, ROBOT_RUNS, COLOUR_READINGS, USERS, TESTING_REQUESTS, TESTING_EXECUTIONS,
    TESTING_SAMPLES, WEBHOOKS,
    # last: topic_for routes their (copied) event types to their own topics
    QUOTA_INBOX, TESTING_INBOX, REPORTS_INBOX,
)


def topic_name(cfg: Config, spec: TopicSpec) -> str:
    return f"{cfg.namespace}.{spec.name}" if cfg.namespace else spec.name


def topic_for(cfg: Config, event) -> str:
    """The topic that carries this event's type."""
    for spec in CATALOG:
        if event.TYPE in spec.event_types:
            return topic_name(cfg, spec)
    raise KeyError(f"no topic carries {event.TYPE}")


def group_id(cfg: Config, process: str) -> str:
    return f"{cfg.namespace}.labbus.{process}" if cfg.namespace else f"labbus.{process}"

# The validator writes each validated reading to the partition its raw reading came from.
assert MEASUREMENTS_RECORDED.partitions == MEASUREMENTS_VALIDATED.partitions
