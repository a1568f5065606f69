"""Test protocol executions as plain functions: the testing processor's handler and timer, no
Kafka, no clock (times come from the records' log times and the timer's `now`).

One Table (key = the input record's key) holds two kinds of state, side by side in one value
so ids of either kind may coincide: `"r"`, a service request (key = request id), and `"x"`, an
execution (key = execution id); `"p"` is the input partition (the timer's ownership).

**Requests.** ServiceRequestSubmitted → every requested protocol resolved against the catalog
(`events.protocols.resolve_request`: unknown protocol, inputs out of range) and every sample
against its registration (`sample_problems`: a sample the LIMS has not registered, or registered
for another customer, module type or area) → one ServiceRequestRejected with every reason, or
one ProtocolAssigned per sample × protocol, the
execution id derived from (request, sample, protocol, version, content hash). The request
remembers its executions; each execution's end reaches it (see the inbox) and when all ended
ServiceRequestCompleted (counts and the overall verdict). Executions run in parallel.

**Executions.** ProtocolAssigned → ExecutionStarted and the first step's CommandIssued; a step
is one command to one device; when the command is completed *and* every reading it announced
(`result_json` `{"readings": {metric: count}}`) has arrived, the next step's command is issued;
after the last step the template is evaluated (`processors.qc.evaluate`) → ExecutionAnalysed,
QcEvaluated, ExecutionPassed or ExecutionFailed (`qc_failed`, or `missing_reading` when the
data did not allow judging) and, when criteria failed, NonConformanceRaised. A command failed
or rejected, a reading of the wrong unit or from a device of another type, no registered
device of the step's type, or the step's timeout: ExecutionFailed with the reason, never a
crash.

**Samples.** The samples' registrations (SampleRegistered on lab.testing.samples, keyed by
sample id) are in the same View as the devices', under `sample/<id>` (`registry_reader`); the
driver waits for that View to have read up to an input's log time before handling it, so a
sample registered just before the request naming it is seen.

**Abort.** ExecutionAbortRequested (keyed by execution id, so ordered with the execution's own
events) ends a running execution as ExecutionFailed `aborted` with the operator's reason; its
outstanding step's command is not cancelled on the instrument, but what it answers is ignored
(the execution is no longer running) and the timer no longer watches it. An execution that
already ended (or that this processor does not hold) is left as it is: a no-op.

**Devices.** A step's device is a *registered* device (lab.devices) of the step's
`instrument_type`: of those, sorted by id, the one at (hash of the execution id + step index)
modulo their number, so parallel executions spread over the devices of a type and the choice is
the same when an input is handled again. The device processor still refuses the command when
that device is offline (→ CommandRejected → ExecutionFailed `command_rejected`).

**Correlation.** Commands are issued with correlation id = the execution id (a UUID) and
idempotency key `<execution id>/<step id>`; the device processor's CommandDispatched and the
agent's answers carry that correlation id, and an agent's readings carry it too, with causation
id = the CommandDispatched's event id (`events.model.dispatched_id`). So a reading belongs to the
step whose command it answers, whatever order the topics deliver in.

**Timeouts.** A step may take its template `timeout_s` divided by LABBUS_TESTING_SPEED (the
simulated instruments' time compression), at least LABBUS_TESTING_MIN_TIMEOUT_S, from the log
time of the input that issued its command. The timer emits ExecutionFailed (`timeout`) past that
(its id derives from the execution and step, so two ticks deciding it emit one event); the
handler takes it when it reads it back.

**The inbox.** Command events and readings are keyed by device, the executions' ends by
execution id: records of lab.commands and lab.measurements.recorded that carry a correlation id
are forwarded (same bytes) to lab.testing.inbox keyed by that id, and ExecutionPassed/Failed
keyed by their request id, as processors/quota.py re-keys by user. Records of other flows
(no correlation id) are not forwarded; a forwarded record whose key holds no execution is
dropped there.
"""

from __future__ import annotations

import json
import math
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from labbus.events.model import (
    CommandAccepted,
    CommandCompleted,
    CommandFailed,
    CommandRejected,
    CommandStarted,
    DeviceRegistered,
    Event,
    ExecutionAbortRequested,
    ExecutionAnalysed,
    ExecutionFailed,
    ExecutionPassed,
    ExecutionStarted,
    MeasurementRecorded,
    NonConformanceRaised,
    ProtocolAssigned,
    QcEvaluated,
    SampleRegistered,
    ServiceRequestCompleted,
    ServiceRequestRejected,
    ServiceRequestSubmitted,
    TestResultRecorded,
    derived_id,
    dispatched_id,
    execution_id_for,
    issue_command,
)
from labbus.events.protocols import (
    Catalog,
    ExpressionError,
    InputError,
    ProtocolTemplate,
    RequestError,
    UnknownProtocol,
    render_payload,
    resolve_request,
)
from labbus.events.runtime import Outgoing, Record
from labbus.processors.qc.criteria import FAIL
from labbus.processors.qc.evaluation import evaluate

SOURCE = "testing"
COMMAND_EVENTS = (CommandAccepted, CommandStarted, CommandCompleted, CommandFailed,
                  CommandRejected)
ENDS = (ExecutionPassed, ExecutionFailed)
ACCEPTS = {cls.TYPE for cls in (ServiceRequestSubmitted, ProtocolAssigned, TestResultRecorded,
                                ExecutionAbortRequested, *ENDS, *COMMAND_EVENTS,
                                MeasurementRecorded)}
SEEN_ID_CHARS = 12  # reading ids remembered per execution (duplicates), as a prefix


@dataclass(frozen=True)
class Settings:
    """What the handler needs besides its inputs: the templates, the topics' names (namespace
    included) and the time compression."""

    catalog: Catalog
    requests: str
    executions: str
    commands: str
    measurements: str
    inbox: str
    speed: float = 1.0
    min_timeout_s: float = 30.0


def handle(state: dict | None, event: Event, record: Record, registry: Any,
           settings: Settings) -> tuple[dict | None, list]:
    """One input record → (new state, outputs). `registry`: device id → {"type": ...} of the
    registered devices (a faust_runtime.View, a dict in tests)."""
    topic = record.topic
    if topic in (settings.commands, settings.measurements):
        cid = event.envelope.correlation_id
        if cid is None:
            return state, []
        return state, [Outgoing(settings.inbox, str(cid).encode(), record.value)]
    if isinstance(event, ENDS) and topic == settings.executions:
        forward = Outgoing(settings.inbox, event.request_id.encode(), record.value)
        x = (state or {}).get("x")
        if x is None or x["status"] != "running":
            return state, [forward]
        x = {**x, "status": "passed" if isinstance(event, ExecutionPassed) else "failed"}
        return {**state, "x": x}, [forward]
    if isinstance(event, ENDS):  # inbox: an execution's end, keyed by its request
        return _request_end(state, event, record)
    if isinstance(event, ServiceRequestSubmitted):
        return _request(state, event, record, settings.catalog, registry)
    if isinstance(event, ProtocolAssigned):
        return _assigned(state, event, record, registry, settings)
    x = (state or {}).get("x")
    if x is None or x["status"] != "running":
        return state, []  # an abort of an ended execution included: a no-op
    run = Run(dict(x), settings, registry, record, event)
    if isinstance(event, ExecutionAbortRequested):
        run.abort(event)
    elif isinstance(event, TestResultRecorded):
        run.x["entered"] = {**x.get("entered", {}), event.name: event.value}
    elif isinstance(event, MeasurementRecorded):
        run.reading(event)
    elif isinstance(event, COMMAND_EVENTS):
        run.command(event)
    if run.x == x:
        return state, run.out
    return {**state, "x": run.x}, run.out


# -- requests -----------------------------------------------------------------------------------

def _request(state: dict | None, req: ServiceRequestSubmitted, record: Record,
             catalog: Catalog, registry: Any) -> tuple[dict | None, list]:
    if (state or {}).get("r") is not None:
        return state, []  # the first submission of a request id counts
    rid = req.request_id
    common = dict(source=SOURCE, subject=rid, correlation_id=req.event_id,
                  causation_id=req.event_id)
    problems = sample_problems(registry, req)
    try:
        plan = resolve_request(catalog, req.sample_ids, req.protocols, req.module_area_m2)
    except RequestError as e:
        problems = [*e.problems, *problems]
    if problems:
        rejected = ServiceRequestRejected.create(
            sequence=1, event_id=uuid.UUID(derived_id(req.event_id, "rejected")), **common,
            request_id=rid, reasons=problems)
        r = {"id": rid, "ex": {}, "rejected": True, "seq": 1}
        return {**(state or {}), "p": record.partition, "r": r}, [rejected]
    out: list = []
    executions: dict[str, None] = {}
    for sample in req.sample_ids:
        for template, inputs in plan:
            eid = execution_id_for(rid, sample, template.id, template.version, template.sha256)
            executions[eid] = None
            out.append(ProtocolAssigned.create(
                source=SOURCE, subject=eid, sequence=len(out) + 1,
                event_id=uuid.UUID(derived_id(eid, "assigned")),
                correlation_id=uuid.UUID(eid), causation_id=req.event_id,
                execution_id=eid, request_id=rid, sample_id=sample, protocol_id=template.id,
                template_version=template.version, template_sha256=template.sha256,
                inputs=inputs, module_type=req.module_type,
                module_area_m2=float(req.module_area_m2)))
    r = {"id": rid, "ex": executions, "corr": str(req.event_id), "seq": len(out)}
    return {**(state or {}), "p": record.partition, "r": r}, out


SAMPLE_KEY = "sample/"  # a sample's registration in the View, beside the devices'
AREA_REL_TOL = 1e-3  # a request's module area agrees with the registration's within 0.1 %


def registry_reader(kind: str, record: dict) -> tuple[str, Any] | None:
    """The testing processor's View reader: a device's registration (lifecycle.registration)
    under its device id, a sample's (SampleRegistered) under `sample/<id>` (the latest
    registration of a sample stands)."""
    if kind == DeviceRegistered.TYPE:
        from labbus.processors.lifecycle import registration

        return registration(kind, record)
    if kind != SampleRegistered.TYPE:
        return None
    return SAMPLE_KEY + record["sample_id"], {
        "sample": record["sample_id"], "customer": record["customer"],
        "module_type": record["module_type"], "area": record["module_area_m2"],
        "lims_ref": record["lims_ref"]}


def sample_problems(registry: Any, req: ServiceRequestSubmitted) -> list[str]:
    """Why the request's samples cannot be tested under it: each sample must have been
    registered (received by the lab, SampleRegistered) for the request's customer, with its
    module type and area (within 0.1 %). Empty when all agree."""
    problems = []
    for sid in dict.fromkeys(req.sample_ids):
        reg = registry.get(SAMPLE_KEY + sid)
        if reg is None:
            problems.append(f"sample {sid} is not registered: the lab's LIMS registers a "
                            "sample when it is received (POST /samples) before a request may "
                            "name it")
            continue
        if reg["customer"] != req.customer:
            problems.append(f"sample {sid} ({reg['lims_ref']}) was registered for customer "
                            f"{reg['customer']!r}, not {req.customer!r}")
        if reg["module_type"] != req.module_type:
            problems.append(f"sample {sid} ({reg['lims_ref']}) was registered as a "
                            f"{reg['module_type']!r} module, the request says "
                            f"{req.module_type!r}")
        if not math.isclose(reg["area"], req.module_area_m2, rel_tol=AREA_REL_TOL):
            problems.append(f"sample {sid} ({reg['lims_ref']}) was registered with an area "
                            f"of {reg['area']:g} m², the request says "
                            f"{req.module_area_m2:g} m²")
    return problems


def _request_end(state: dict | None, end: Event, record: Record) -> tuple[dict | None, list]:
    r = (state or {}).get("r")
    eid = end.execution_id
    if r is None or eid not in r["ex"] or r["ex"][eid] is not None or r.get("done"):
        return state, []  # another request's, or an execution whose first end counted
    verdict = "pass" if isinstance(end, ExecutionPassed) else "fail"
    r = {**r, "ex": {**r["ex"], eid: verdict}}
    out = []
    if all(v is not None for v in r["ex"].values()):
        passed = sum(v == "pass" for v in r["ex"].values())
        r["done"] = True
        r["seq"] += 1
        out.append(ServiceRequestCompleted.create(
            source=SOURCE, subject=r["id"], sequence=r["seq"],
            event_id=uuid.UUID(derived_id(f"service-request/{r['id']}", "completed")),
            correlation_id=uuid.UUID(r["corr"]), causation_id=end.event_id,
            request_id=r["id"], executions=len(r["ex"]), passed=passed,
            failed=len(r["ex"]) - passed,
            verdict="pass" if passed == len(r["ex"]) else "fail"))
    return {**state, "r": r}, out


# -- executions ---------------------------------------------------------------------------------

def _assigned(state: dict | None, a: ProtocolAssigned, record: Record, registry: Any,
              settings: Settings) -> tuple[dict | None, list]:
    if (state or {}).get("x") is not None:
        return state, []
    x = {"id": a.execution_id, "request": a.request_id, "sample": a.sample_id,
         "protocol": a.protocol_id, "version": a.template_version, "inputs": dict(a.inputs),
         "module": a.module_type, "area": a.module_area_m2, "status": "running", "step": 0,
         "cmd": None, "readings": {}, "seen": [], "entered": {}, "seq": 0}
    run = Run(x, settings, registry, record, a)
    try:
        template = settings.catalog.get(a.protocol_id, a.template_version)
    except UnknownProtocol as e:
        run.fail("bad_input", str(e))
        return {**(state or {}), "p": record.partition, "x": run.x}, run.out
    if template.sha256 != a.template_sha256:
        run.fail("bad_input", f"{a.protocol_id} version {a.template_version} here has content "
                              f"{template.sha256[:12]}…, the assignment names "
                              f"{a.template_sha256[:12]}…")
    else:
        run.emit(ExecutionStarted, "started", steps=[s.id for s in template.steps])
        run.issue(template, 0)
    return {**(state or {}), "p": record.partition, "x": run.x}, run.out


class Run:
    """One event's work on one execution's state `x` (a copy, changed in place)."""

    def __init__(self, x: dict, settings: Settings, registry: Any, record: Record,
                 cause: Event) -> None:
        self.x = x
        self.s = settings
        self.registry = registry
        self.record = record
        self.cause = cause
        self.out: list = []

    def template(self) -> ProtocolTemplate:
        return self.s.catalog.get(self.x["protocol"], self.x["version"])

    def emit(self, cls: type[Event], purpose: str, **payload: Any) -> None:
        x = self.x
        x["seq"] += 1
        self.out.append(cls.create(
            source=SOURCE, subject=x["id"], sequence=x["seq"],
            event_id=uuid.UUID(derived_id(x["id"], purpose)), correlation_id=uuid.UUID(x["id"]),
            causation_id=self.cause.event_id, execution_id=x["id"], request_id=x["request"],
            sample_id=x["sample"], protocol_id=x["protocol"], template_version=x["version"],
            **payload))

    def fail(self, code: str, reason: str, purpose: str = "failed") -> None:
        self.emit(ExecutionFailed, purpose, reason_code=code, reason=reason)
        self.x["status"] = "failed"

    def abort(self, asked: ExecutionAbortRequested) -> None:
        """End the running execution as asked; its step's command (if one is out) may still
        finish on the instrument, and what it answers is then ignored."""
        cmd = self.x.get("cmd")
        during = (f" during step {cmd['step']} on {cmd['device']} (its command is not "
                  "cancelled on the instrument; what it answers is ignored)" if cmd else "")
        self.fail("aborted", f"aborted by {asked.requested_by}: {asked.reason}{during}",
                  purpose="aborted")

    # -- steps --
    def issue(self, template: ProtocolTemplate, index: int) -> None:
        x = self.x
        step = template.steps[index]
        x["step"] = index
        device = choose_device(self.registry, step.instrument_type, x["id"], index)
        if device is None:
            self.fail("no_device", f"step {step.id}: no registered device of instrument type "
                                   f"{step.instrument_type!r}")
            return
        try:
            payload = render_payload(step, x["inputs"])
            timeout_s = step.timeout_s.evaluate(x["inputs"])
        except ExpressionError as e:
            self.fail("bad_input", f"step {step.id}: {e}")
            return
        payload.update(sample_id=x["sample"], module_type=x["module"])
        wall_s = step_timeout_s(timeout_s, self.s.speed, self.s.min_timeout_s)
        issued = issue_command(device, step.command, payload, wall_s, f"{x['id']}/{step.id}",
                               issued_by=SOURCE, source=SOURCE)
        issued = issued.with_envelope(correlation_id=uuid.UUID(x["id"]),
                                      causation_id=self.cause.event_id)
        self.out.append(issued)
        x["cmd"] = {"id": issued.command_id, "device": device, "step": step.id,
                    "disp": dispatched_id(issued.event_id), "type": step.instrument_type,
                    "deadline": self.record.timestamp + round(wall_s * 1000), "wall_s": wall_s,
                    "timeout_s": timeout_s, "speed": self.s.speed, "done": False,
                    "counts": None, "at": self.record.timestamp}

    def command(self, event: Event) -> None:
        cmd = self.x["cmd"]
        if cmd is None or event.command_id != cmd["id"]:
            return  # an earlier step's, repeated
        where = f"step {cmd['step']} on {cmd['device']}"
        if isinstance(event, CommandFailed):
            self.fail("instrument_failed", f"{where}: the instrument failed: {event.error}")
        elif isinstance(event, CommandRejected):
            self.fail("command_rejected", f"{where}: command rejected ({event.reason_code}): "
                                          f"{event.reason}")
        elif isinstance(event, CommandCompleted) and not cmd["done"]:
            self.x["cmd"] = {**cmd, "done": True, "counts": announced(event.result_json)}
            self.advance()

    def reading(self, m: MeasurementRecorded) -> None:
        x = self.x
        cmd = x["cmd"]
        if cmd is None or str(m.envelope.causation_id) != cmd["disp"]:
            return  # not this step's (an earlier step's, repeated)
        rid = str(m.event_id)[:SEEN_ID_CHARS]
        if rid in x["seen"]:
            return
        template = self.template()
        step = template.step(cmd["step"])
        registered = (self.registry.get(m.device_id) or {}).get("type")
        if registered is not None and registered != step.instrument_type:
            self.fail("wrong_instrument", f"step {step.id}: reading {m.metric} from device "
                      f"{m.device_id}, a {registered}; the step needs a {step.instrument_type}")
            return
        spec = step.reading(m.metric)
        if spec is None:
            return  # a metric the step does not use
        if m.unit != spec.unit:
            self.fail("bad_reading", f"step {step.id}: reading {m.metric} in {m.unit!r}, the "
                                     f"template declares {spec.unit!r}")
            return
        x["seen"] = [*x["seen"], rid]
        readings = {k: dict(v) for k, v in x["readings"].items()}
        values = readings.setdefault(step.id, {}).setdefault(m.metric, [])
        readings[step.id][m.metric] = [*values, float(m.value)]
        x["readings"] = readings
        if cmd["done"]:
            self.advance()

    def advance(self) -> None:
        """The step's command completed: once its announced readings are all here, the next
        step, or the evaluation after the last."""
        x = self.x
        cmd = x["cmd"]
        got = x["readings"].get(cmd["step"], {})
        if any(len(got.get(metric, [])) < n for metric, n in (cmd["counts"] or {}).items()):
            return
        # the step as the reports show it: which device, from when to when (log times)
        x["runs"] = [*x.get("runs", []), {
            "step_id": cmd["step"], "device_id": cmd["device"],
            "started_ms": cmd.get("at", self.record.timestamp),
            "finished_ms": self.record.timestamp}]
        template = self.template()
        if x["step"] + 1 < len(template.steps):
            self.issue(template, x["step"] + 1)
        else:
            x["cmd"] = None
            self.finish(template)

    def finish(self, template: ProtocolTemplate) -> None:
        x = self.x
        try:
            ev = evaluate(template, x["inputs"], x["readings"], entered=x.get("entered"))
        except InputError as e:
            self.fail("bad_input", str(e))
            return
        failed = [c for c in ev.criteria if raises_nc(c.verdict, c.value)]
        problems = [r for r in ev.reasons if r not in {c.message for c in ev.criteria}]
        self.emit(ExecutionAnalysed, "analysed", results=dict(ev.results),
                  units={n: ev.units[n] for n in ev.results}, problems=problems,
                  readings=x["readings"], steps=x.get("runs", []))
        self.emit(QcEvaluated, "qc", verdict=ev.verdict, criteria=[criterion_record(c)
                                                                   for c in ev.criteria])
        if ev.passed:
            self.emit(ExecutionPassed, "passed")
            x["status"] = "passed"
            return
        code = "qc_failed" if failed and not problems else "missing_reading"
        self.fail(code, "; ".join(ev.reasons))
        if failed:
            self.emit(NonConformanceRaised, "nc", nc_id=derived_id(x["id"], "nc-id"),
                      criteria=[c.id for c in failed],
                      description=f"sample {x['sample']} failed {x['protocol']} v{x['version']}: "
                                  + "; ".join(c.message for c in failed))


def raises_nc(verdict: str, value: float | None) -> bool:
    """Whether a criterion so judged makes its execution raise a NonConformanceRaised (after
    its ExecutionFailed): it failed on a value that could be computed."""
    return verdict == FAIL and value is not None


def criterion_record(c: Any) -> dict:
    limit = [] if c.limit is None else list(c.limit) if isinstance(c.limit, tuple) \
        else [c.limit]
    return {"id": c.id, "description": c.description, "clause": c.clause,
            "operator": c.operator, "unit": c.unit, "value": c.value,
            "limit": [float(v) for v in limit], "verdict": c.verdict, "message": c.message}


def announced(result_json: str) -> dict[str, int]:
    """The readings a completed command says it published: `{"readings": {metric: count}}`
    (nothing announced: none awaited; the evaluation then says what is missing)."""
    try:
        counts = json.loads(result_json or "{}").get("readings") or {}
        return {str(k): int(v) for k, v in counts.items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def choose_device(registry: Any, instrument_type: str, execution_id: str, step: int
                  ) -> str | None:
    """A registered device of the type: sorted by id, the one at crc32(execution, step) modulo
    their number (spread over the devices, stable for an execution's step)."""
    table = getattr(registry, "table", registry)  # the driver hands the View in a Shared
    values = getattr(table, "values", None)
    registered = values if isinstance(values, Mapping) else table  # a View's, or a dict
    devices = sorted(d for d, reg in registered.items()
                     if not d.startswith(SAMPLE_KEY) and (reg or {}).get("type") ==
                     instrument_type)
    if not devices:
        return None
    return devices[zlib.crc32(f"{execution_id}/{step}".encode()) % len(devices)]


def step_timeout_s(timeout_s: float, speed: float, min_timeout_s: float) -> float:
    """The wall time a step may take: its template timeout compressed by the speed factor,
    never less than the minimum."""
    return max(timeout_s / speed, min_timeout_s)


# -- the timer ----------------------------------------------------------------------------------

def tick(states: Mapping[str, dict], now_ms: int, behind: Mapping[int, int] | None = None
         ) -> list[Event]:
    """ExecutionFailed (timeout) for running executions whose step is past its deadline. Where
    the worker is behind on its inputs, "now" is the log time it has read to (a completion may
    be waiting unread) — on the input partition read least far, whichever it is: a step's
    readings and completion come from lab.measurements.recorded and lab.commands keyed by
    device, through the inbox, so any partition behind may hold them. (Under a flood of
    readings the worker fell 2 minutes behind on lab.measurements.recorded while its own
    partition was read to the end: half of 600 executions timed out waiting for readings
    already published.)"""
    out = []
    now = min(behind.values()) if behind else now_ms
    for s in states.values():
        x = s.get("x")
        if not x or x["status"] != "running" or not x.get("cmd"):
            continue
        cmd = x["cmd"]
        if now <= cmd["deadline"]:
            continue
        what = "its readings" if cmd["done"] else "completion"
        out.append(ExecutionFailed.create(
            source=SOURCE, subject=x["id"], sequence=x["seq"] + 1,
            event_id=uuid.UUID(derived_id(x["id"], f"timeout/{cmd['step']}")),
            correlation_id=uuid.UUID(x["id"]), execution_id=x["id"], request_id=x["request"],
            sample_id=x["sample"], protocol_id=x["protocol"], template_version=x["version"],
            reason_code="timeout",
            reason=f"step {cmd['step']} on {cmd['device']}: no {what} within "
                   f"{cmd['wall_s']:g} s (template timeout {cmd['timeout_s']:g} s at speed "
                   f"{cmd['speed']:g})"))
    return out


class Ticker:
    """`tick` with a short memory of what it emitted (not sent again until read back)."""

    def __init__(self, remember_s: float = 10.0) -> None:
        self.remember_ms = remember_s * 1000
        self.sent: dict[Any, int] = {}
        self.__name__ = "testing"

    def __call__(self, states: Mapping[str, dict], now_ms: int,
                 behind: Mapping[int, int] | None = None) -> list[Event]:
        self.sent = {k: t for k, t in self.sent.items() if now_ms - t < self.remember_ms}
        out = [e for e in tick(states, now_ms, behind) if e.event_id not in self.sent]
        for e in out:
            self.sent[e.event_id] = now_ms
        return out
