"""A service request's events as the testing processor writes them (processors/testing_logic.py),
for the read-side tests and the API's seeds: one request, two samples x PVTP-003 (insulation),
evaluated by the real QC (processors/qc) from simulated readings; sample `<id>-S1` passes (600
MOhm), `<id>-S2` fails (10 MOhm on a 1.6 m2 module: 16 MOhm m2 < 40) with a non-conformance;
the request completes with verdict fail. Plus `lab.testing.ReportGenerated` records (the report
processor's event, built as the codec decodes it while its class is not in events/model.py).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from aiokafka import TopicPartition

from labbus.events.codec import default_codec
from labbus.events.model import (
    Event,
    ExecutionAnalysed,
    ExecutionFailed,
    ExecutionPassed,
    ExecutionStarted,
    InspectionRecorded,
    NonConformanceRaised,
    ProtocolAssigned,
    QcEvaluated,
    ServiceRequestCompleted,
    ServiceRequestRejected,
    ServiceRequestSubmitted,
    TestResultRecorded,
    derived_id,
    execution_id_for,
)
from labbus.events.protocols import resolve_request, shipped_catalog
from labbus.events.runtime import Positioned
from labbus.processors.qc.evaluation import evaluate
from labbus.processors.testing_logic import criterion_record
from labbus.projections.postgres_testing import REPORT_GENERATED

PROTOCOL = "PVTP-003"
AREA_M2 = 1.6
RESISTANCE_MOHM = {"S1": 600.0, "S2": 10.0}  # S2 fails resistance_times_area


def service_request_events(request_id: str, t0: datetime, *, customer: str = "Acme Solar",
                           submitted_by: str = "eng@lab.example") -> dict[str, list[Event]]:
    """{"requests": [...], "executions": [...]}: each topic's events in log order."""
    samples = [f"{request_id}-{s}" for s in RESISTANCE_MOHM]
    src = dict(source="testing")
    submitted = ServiceRequestSubmitted.create(
        source="gateway-http", subject=request_id, sequence=0, occurred_at=t0,
        request_id=request_id, customer=customer, module_type="Canadian_Solar_CS6K_280M",
        module_area_m2=AREA_M2, sample_ids=samples,
        protocols=[{"protocol_id": PROTOCOL, "version": None, "inputs": {}}],
        submitted_by=submitted_by)
    [(template, inputs)] = resolve_request(shipped_catalog(), samples, submitted.protocols,
                                           AREA_M2)
    requests: list[Event] = [submitted] + [InspectionRecorded.create(
        **src, subject=request_id, sequence=1 + i, occurred_at=t0 + timedelta(minutes=1 + i),
        request_id=request_id, sample_id=sample, inspector="ins@lab.example",
        findings=["frame intact"], defects=[] if i == 0 else ["scratched back sheet"],
        photo_refs=[f"photo-{i}.jpg"]) for i, sample in enumerate(samples)]
    executions: list[Event] = []
    ends = []
    for n, (key, resistance) in enumerate(RESISTANCE_MOHM.items()):
        sample = f"{request_id}-{key}"
        eid = execution_id_for(request_id, sample, template.id, template.version,
                               template.sha256)
        at = t0 + timedelta(minutes=10 * (n + 1))
        ident = dict(execution_id=eid, request_id=request_id, sample_id=sample,
                     protocol_id=template.id, template_version=template.version)

        def make(cls, purpose, minutes, seq, eid=eid, at=at, ident=ident, **payload):
            return cls.create(**src, subject=eid, sequence=seq,
                              occurred_at=at + timedelta(minutes=minutes),
                              event_id=uuid.UUID(derived_id(eid, purpose)),
                              correlation_id=uuid.UUID(eid), **ident, **payload)

        executions.append(ProtocolAssigned.create(
            **src, subject=eid, sequence=1, occurred_at=at,
            event_id=uuid.UUID(derived_id(eid, "assigned")), correlation_id=uuid.UUID(eid),
            causation_id=submitted.event_id, **ident, template_sha256=template.sha256,
            inputs=inputs, module_type=submitted.module_type, module_area_m2=AREA_M2))
        executions.append(make(ExecutionStarted, "started", 1, 2,
                               steps=[s.id for s in template.steps]))
        if n == 1:  # an operator enters the breakdown count by hand
            executions.append(TestResultRecorded.create(
                **src, subject=eid, sequence=3, occurred_at=at + timedelta(minutes=2),
                execution_id=eid, name="breakdowns", value=0.0, unit="1",
                entered_by="op@lab.example"))
        readings = {"dielectric_withstand": {"breakdown": [0.0]},
                    "insulation_resistance": {"insulation_resistance": [resistance]}}
        ev = evaluate(template, inputs, readings)
        executions.append(make(ExecutionAnalysed, "analysed", 5, 4, results=dict(ev.results),
                               units={k: ev.units[k] for k in ev.results}, problems=[]))
        executions.append(make(QcEvaluated, "qc", 5, 5, verdict=ev.verdict,
                               criteria=[criterion_record(c) for c in ev.criteria]))
        if ev.passed:
            end = make(ExecutionPassed, "passed", 5, 6)
            executions.append(end)
        else:
            end = make(ExecutionFailed, "failed", 5, 6, reason_code="qc_failed",
                       reason="; ".join(ev.reasons))
            failed = [c.id for c in ev.criteria if c.verdict == "fail"]
            executions += [end, make(NonConformanceRaised, "nc", 5, 7,
                                     nc_id=derived_id(eid, "nc-id"), criteria=failed,
                                     description=f"sample {sample} failed {template.id}")]
        ends.append(end)
    passed = sum(isinstance(e, ExecutionPassed) for e in ends)
    requests.append(ServiceRequestCompleted.create(
        **src, subject=request_id, sequence=9, occurred_at=t0 + timedelta(minutes=40),
        event_id=uuid.UUID(derived_id(f"service-request/{request_id}", "completed")),
        correlation_id=submitted.event_id, causation_id=ends[-1].event_id,
        request_id=request_id, executions=len(ends), passed=passed, failed=len(ends) - passed,
        verdict="pass" if passed == len(ends) else "fail"))
    return {"requests": requests, "executions": executions}


def rejected_request_events(request_id: str, t0: datetime) -> list[Event]:
    submitted = ServiceRequestSubmitted.create(
        source="gateway-http", subject=request_id, sequence=0, occurred_at=t0,
        request_id=request_id, customer="Rejected Ltd", module_type="m", module_area_m2=1.0,
        sample_ids=[f"{request_id}-S1"],
        protocols=[{"protocol_id": "PVTP-999", "version": None, "inputs": {}}],
        submitted_by="eng@lab.example")
    return [submitted, ServiceRequestRejected.create(
        source="testing", subject=request_id, sequence=1, occurred_at=t0 + timedelta(seconds=1),
        causation_id=submitted.event_id, request_id=request_id,
        reasons=["unknown protocol: no protocol PVTP-999"])]


def report_generated(request_id: str, fmt: str, artifact, at: datetime,
                     certificate: bool = False) -> dict:
    """A `lab.testing.ReportGenerated` as the codec decodes it (plain: uuids str, times µs)."""
    micros = round(at.timestamp() * 1e6)
    return {"event_id": str(uuid.uuid4()), "event_type": REPORT_GENERATED, "schema_version": 1,
            "occurred_at": micros, "recorded_at": micros, "source": "reports",
            "subject": request_id, "correlation_id": None, "causation_id": None, "sequence": 1,
            "actor": None, "request_id": request_id, "format": fmt, "name": artifact.name,
            "content_type": artifact.content_type, "sha256": artifact.sha256,
            "size": artifact.size, "location": artifact.location, "certificate": certificate}


def as_positioned(topic: str, events: list[Event | dict], first_offset: int = 0
               ) -> list[Positioned]:
    """The events as the projector's runner hands them over (a dict: already decoded)."""
    codec = default_codec()
    tp = TopicPartition(topic, 0)
    out = []
    for offset, e in enumerate(events, start=first_offset):
        if isinstance(e, dict):
            out.append(Positioned(tp, offset, e["event_type"], e))
        else:
            out.append(Positioned(tp, offset, *codec.decode_record(codec.encode(e), plain=True)))
    return out
