"""The testing processor's logic (processors/testing_logic.py) with the simulated PV instruments
(producers/pv/agents.py), wired through an in-memory log: every message is encoded with the
real codec and routed to its catalog topic, the processor's handler gets the decoded event and
the record (its forwards are the same bytes, as on the broker), the instruments answer the
dispatched commands. No services: the order of delivery is chosen by the test."""

from __future__ import annotations

import asyncio
import collections
import uuid
from datetime import UTC, datetime

import pytest

from labbus.events.codec import default_codec
from labbus.events.config import load
from labbus.events.faust_runtime import Shared
from labbus.events.model import (
    CommandCompleted,
    CommandDispatched,
    CommandIssued,
    ExecutionAbortRequested,
    ExecutionFailed,
    ExecutionPassed,
    MeasurementRecorded,
    NonConformanceRaised,
    ProtocolAssigned,
    QcEvaluated,
    ServiceRequestCompleted,
    ServiceRequestRejected,
    ServiceRequestSubmitted,
    dispatched_id,
    execution_id_for,
    register_sample,
    request_abort,
)
from labbus.events.protocols import shipped_catalog
from labbus.events.runtime import Outgoing, Record
from labbus.events.topics import topic_for
from labbus.processors import testing_logic as tl
from labbus.producers.pv import agents, models

CFG = load({})
CODEC = default_codec()
S = tl.Settings(catalog=shipped_catalog(), requests="lab.testing.requests",
                executions="lab.testing.executions", commands="lab.commands",
                measurements="lab.measurements.recorded", inbox="lab.testing.inbox",
                speed=1e9, min_timeout_s=30)
TC_LIMIT = 0.05


def pick_samples(n_pass: int) -> tuple[str, list[str]]:
    """A sample that loses > 6 % Pmax in TC200 and n_pass that lose < 2 % and have no
    insulation defect (seed 0): the verdicts are known before the run."""
    bad, good = None, []
    for k in range(1, 2000):
        m = models.make_module(f"PV{k:04d}")
        loss = 1 - (models.true_iv_parameters(models.thermal_cycling(m, 200))["pmax_w"]
                    / models.true_iv_parameters(m)["pmax_w"])
        if bad is None and loss > 0.06 and not m.susceptibility.insulation_defect:
            bad = m.sample_id
        elif loss < 0.02 and not m.susceptibility.insulation_defect and len(good) < n_pass:
            good.append(m.sample_id)
        if bad and len(good) == n_pass:
            return bad, good
    raise AssertionError("no samples found")


def pick_pid_samples(exclude: set[str] = frozenset()) -> tuple[str, str]:
    """(a PID-susceptible sample, losing > 8 % Pmax in PVTP-030's 96 h at -1000 V, 85 degC /
    85 % RH; a resistant one, losing < 2 %), both with wet insulation far above MQT 15's limit
    (PVTP-010 passes for both, before or after the damp heat), none of `exclude` (seed 0)."""
    bad = good = None
    for k in range(1, 2000):
        m = models.make_module(f"PV{k:04d}")
        s = m.susceptibility
        if m.sample_id in exclude or s.insulation_defect or s.insulation_wet_mohm_m2 < 200:
            continue
        loss = 1 - (models.true_iv_parameters(models.pid_stress(m, 96))["pmax_w"]
                    / models.true_iv_parameters(m)["pmax_w"])
        if bad is None and loss > 0.08:
            bad = m.sample_id
        elif good is None and loss < 0.02:
            good = m.sample_id
        if bad and good:
            return bad, good
    raise AssertionError("no samples found")


class Bus:
    def __init__(self, devices: dict[str, str]) -> None:
        self.log: list[tuple[str, bytes, bytes]] = []
        self.queue: collections.deque = collections.deque()
        self.states: dict[str, dict] = {}
        self.registry = {d: {"type": t} for d, t in devices.items()}
        self.samples = agents.Samples(seed=0)
        self.devices = {d: agents.Commands(agents.Device(d, t), self.samples, 1e9, 0)
                        for d, t in devices.items()}
        self.now = 1_000_000

    def publish(self, out) -> None:
        if not isinstance(out, Outgoing):
            out = Outgoing(topic_for(CFG, out), out.key, CODEC.encode(out))
        self.log.append((out.topic, out.key, out.value))
        self.queue.append(out)

    def events(self, cls=None, topic=None):
        """Events as published, not the processor's forwarded copies."""
        return [CODEC.decode(v) for t, _, v in self.log
                if (t == topic if topic else t != S.inbox)
                and (cls is None or CODEC.decode(v).TYPE == cls.TYPE)]

    def run(self, limit: int = 100_000) -> None:
        n = 0
        while self.queue and n < limit:
            n += 1
            out = self.queue.popleft()
            self.now += 1
            event = CODEC.decode(out.value)
            rec = Record(out.topic, 0, n, out.key, out.value, self.now)
            if isinstance(event, CommandIssued):  # the device processor's part
                self.publish(CommandDispatched.create(
                    source="devices", subject=event.device_id, sequence=0,
                    event_id=uuid.UUID(dispatched_id(event.event_id)),
                    correlation_id=event.envelope.correlation_id, causation_id=event.event_id,
                    command_id=event.command_id, device_id=event.device_id,
                    idempotency_key=event.idempotency_key, command_type=event.command_type,
                    payload_json=event.payload_json, expires_at=event.expires_at,
                    issued_by=event.issued_by))
                continue
            if isinstance(event, CommandDispatched):
                self.publish_all(self.devices[event.device_id](event, rec))
                continue
            if event.TYPE not in tl.ACCEPTS:
                continue
            key = out.key.decode()
            # the faust driver hands the registry View wrapped in a Shared
            state, outs = tl.handle(self.states.get(key), event, rec, Shared(self.registry), S)
            if state is None:
                self.states.pop(key, None)
            else:
                self.states[key] = state
            for o in outs:
                self.publish(o)

    def publish_all(self, agen) -> None:
        async def collect():
            return [e async for e in agen]

        for e in asyncio.run(collect()):
            self.publish(e)


DEVICES = {"pv-iv-1": "iv-curve-tracer", "pv-iv-2": "iv-curve-tracer",
           "pv-cc-1": "climate-chamber", "pv-it-1": "insulation-tester"}


CUSTOMER, AREA = "ACME Solar", 1.62


def register(bus: Bus, sample: str, customer: str = CUSTOMER,
             module_type: str = models.DEFAULT_MODULE, area: float = AREA) -> None:
    """The sample's registration as the processor's View holds it (read from the bytes)."""
    event = register_sample(sample, f"LIMS-{sample}", customer, module_type, area,
                            f"SN-{sample}", datetime(2026, 3, 1, tzinfo=UTC), "lims")
    found = tl.registry_reader(*CODEC.decode_record(CODEC.encode(event), plain=True))
    assert found is not None
    bus.registry[found[0]] = found[1]


def submit(bus: Bus, samples: list[str], protocols: list[dict], rid: str = "SR-1",
           registered: bool = True) -> None:
    for sample in samples if registered else ():
        register(bus, sample)
    bus.publish(ServiceRequestSubmitted.create(
        source="t", subject=rid, sequence=1, request_id=rid, customer=CUSTOMER,
        module_type=models.DEFAULT_MODULE, module_area_m2=AREA, sample_ids=samples,
        protocols=protocols, submitted_by="t"))


PROTOCOLS = [
    {"protocol_id": "PVTP-001", "version": None,
     "inputs": {"rated_pmax_w": 270.0, "measurement_uncertainty_pct": 3.0}},
    {"protocol_id": "PVTP-015", "version": None, "inputs": {"injection_current_a": 8.5}},
    {"protocol_id": "PVTP-003", "version": None, "inputs": {}},
]


def test_a_request_of_three_protocols_with_one_module_failing_thermal_cycling():
    bad, good = pick_samples(1)
    bus = Bus(DEVICES)
    submit(bus, [good[0], bad], PROTOCOLS)
    bus.run()
    ends = {(e.sample_id, e.protocol_id): e for e in bus.events()
            if isinstance(e, (ExecutionPassed, ExecutionFailed))}
    assert len(ends) == 6
    failed = {k: e.reason for k, e in ends.items() if isinstance(e, ExecutionFailed)}
    assert list(failed) == [(bad, "PVTP-015")], failed
    assert ends[(bad, "PVTP-015")].reason_code == "qc_failed"
    assert "Pmax degradation" in failed[(bad, "PVTP-015")]
    ncs = bus.events(NonConformanceRaised)
    assert [(n.sample_id, n.protocol_id, n.criteria) for n in ncs] == [
        (bad, "PVTP-015", ["pmax_degradation"])]
    qc = {(e.sample_id, e.protocol_id): e for e in bus.events(QcEvaluated)}
    tc = {c["id"]: c for c in qc[(bad, "PVTP-015")].criteria}
    assert tc["pmax_degradation"]["verdict"] == "fail" and tc["pmax_degradation"]["value"] > 5
    assert tc["cycles_completed"]["verdict"] == "pass" and tc["cycles_completed"]["value"] == 200
    assert {tc[c]["verdict"] for c in ("low_extreme", "high_extreme")} == {"pass"}
    good_tc = {c["id"]: c for c in qc[(good[0], "PVTP-015")].criteria}
    assert good_tc["pmax_degradation"]["value"] < 3
    (done,) = bus.events(ServiceRequestCompleted)
    assert (done.executions, done.passed, done.failed, done.verdict) == (6, 5, 1, "fail")
    # ids derived from the inputs: the same request again assigns the same executions
    assigned = {e.execution_id for e in bus.events(ProtocolAssigned)}
    t = shipped_catalog().get("PVTP-015")
    assert execution_id_for("SR-1", bad, "PVTP-015", 1, t.sha256) in assigned


def test_readings_before_the_completion_and_duplicates_change_nothing():
    """Readings forwarded after the command's completion, and every inbox record twice."""
    _, good = pick_samples(1)
    bus = Bus(DEVICES)
    original = bus.publish

    def shuffled(out) -> None:
        original(out)
        if isinstance(out, Outgoing) and out.topic == S.inbox:
            bus.queue.append(out)  # a duplicate (a forward sent twice)
            event = CODEC.decode(out.value)
            if isinstance(event, MeasurementRecorded):  # behind what follows it
                bus.queue.remove(out)
                bus.queue.append(out)

    bus.publish = shuffled
    submit(bus, good, PROTOCOLS[:1])
    bus.run()
    (end,) = bus.events(ExecutionPassed)
    assert end.protocol_id == "PVTP-001"
    assert len(bus.events(ServiceRequestCompleted)) == 1


def test_bad_requests_are_rejected_with_every_reason():
    bus = Bus(DEVICES)
    submit(bus, ["S1"], [{"protocol_id": "PVTP-999", "version": None, "inputs": {}},
                         {"protocol_id": "PVTP-001", "version": None,
                          "inputs": {"rated_pmax_w": 9999.0}}])
    bus.run()
    (rej,) = bus.events(ServiceRequestRejected)
    assert rej.reasons[0].startswith("unknown protocol: no protocol PVTP-999")
    assert any("rated_pmax_w = 9999 W is out of its range [0.1, 2000]" in r for r in rej.reasons)
    assert any("measurement_uncertainty_pct (%) is required" in r for r in rej.reasons)
    assert not bus.events(ProtocolAssigned)


def test_no_device_of_the_type_fails_the_execution_with_the_reason():
    bus = Bus({"pv-iv-1": "iv-curve-tracer"})
    submit(bus, ["S1"], PROTOCOLS[2:])
    bus.run()
    (failed,) = bus.events(ExecutionFailed)
    assert failed.reason_code == "no_device"
    assert "no registered device of instrument type 'insulation-tester'" in failed.reason
    (done,) = bus.events(ServiceRequestCompleted)
    assert done.verdict == "fail"


def test_a_step_past_its_deadline_times_out_once():
    bus = Bus(DEVICES)
    submit(bus, ["S1"], PROTOCOLS[:1])
    # stop before the instrument answers: deliver up to the dispatch only
    while bus.queue and not isinstance(CODEC.decode(bus.queue[0].value), CommandDispatched):
        bus.run(limit=1)
    (key,) = [k for k, s in bus.states.items() if "x" in s]
    deadline = bus.states[key]["x"]["cmd"]["deadline"]
    ticker = tl.Ticker()
    assert ticker(bus.states, deadline) == []
    # the worker behind on another input partition (readings of this step's device may wait
    # there): not yet
    other = bus.states[key]["p"] + 1
    assert ticker(bus.states, deadline + 60_000, {other: deadline - 5_000}) == []
    (timeout,) = ticker(bus.states, deadline + 1)
    assert ticker(bus.states, deadline + 2) == []  # remembered until read back
    assert timeout.reason_code == "timeout" and "no completion within 30 s" in timeout.reason
    bus.queue.clear()
    bus.publish(timeout)
    bus.run()
    assert bus.states[key]["x"]["status"] == "failed"
    assert tl.tick(bus.states, deadline + 10_000) == []
    (done,) = bus.events(ServiceRequestCompleted)
    assert done.failed == 1


@pytest.mark.parametrize("wall, speed, minimum, expected", [
    (600, 1e6, 30, 30), (4_406_400, 1e5, 30, 44.064), (600, 1, 30, 600)])
def test_step_timeouts_are_compressed_but_never_below_the_minimum(wall, speed, minimum,
                                                                  expected):
    assert tl.step_timeout_s(wall, speed, minimum) == pytest.approx(expected)


def test_a_request_naming_a_sample_not_registered_or_registered_otherwise_is_rejected():
    """The rule: a sample must have been registered (received, SampleRegistered) for the
    request's customer, module type and area; every reason is listed with the catalog's."""
    bus = Bus(DEVICES)
    register(bus, "S-OTHER", customer="Other Co")
    register(bus, "S-TYPE", module_type="another module", area=1.0)
    register(bus, "S-OK")
    submit(bus, ["S-NEW", "S-OTHER", "S-TYPE", "S-OK"],
           [{"protocol_id": "PVTP-999", "version": None, "inputs": {}}], registered=False)
    bus.run()
    (rej,) = bus.events(ServiceRequestRejected)
    assert rej.reasons[0].startswith("unknown protocol: no protocol PVTP-999")
    assert rej.reasons[1:] == [
        "sample S-NEW is not registered: the lab's LIMS registers a sample when it is received "
        "(POST /samples) before a request may name it",
        "sample S-OTHER (LIMS-S-OTHER) was registered for customer 'Other Co', not 'ACME Solar'",
        f"sample S-TYPE (LIMS-S-TYPE) was registered as a 'another module' module, the request "
        f"says {models.DEFAULT_MODULE!r}",
        "sample S-TYPE (LIMS-S-TYPE) was registered with an area of 1 m², the request says "
        "1.62 m²"]
    assert not bus.events(ProtocolAssigned)
    # registered again, corrected (the latest registration stands): a new request runs
    register(bus, "S-TYPE")
    register(bus, "S-OTHER")
    submit(bus, ["S-OTHER", "S-TYPE"], PROTOCOLS[2:], rid="SR-2", registered=False)
    bus.run()
    assert len(bus.events(ProtocolAssigned)) == 2
    (done,) = bus.events(ServiceRequestCompleted)
    assert done.request_id == "SR-2" and done.executions == 2


def test_the_devices_choice_ignores_the_samples_in_the_view():
    bus = Bus({"pv-it-1": "insulation-tester"})
    register(bus, "insulation-tester")  # a sample id that names a device type
    assert tl.choose_device(bus.registry, "insulation-tester", "x", 0) == "pv-it-1"


def _until(bus: Bus, predicate) -> None:
    while not predicate():
        assert bus.queue, "the log ran dry first"
        bus.run(limit=1)


def test_an_abort_ends_the_running_execution_and_the_request_completes_with_the_others():
    _, good = pick_samples(1)
    bus = Bus(DEVICES)
    submit(bus, [good[0]], PROTOCOLS[:2])
    t = shipped_catalog().get("PVTP-015")
    eid = execution_id_for("SR-1", good[0], "PVTP-015", t.version, t.sha256)
    # up to the dispatch of its thermal cycling: the chamber has the command, not answered yet
    _until(bus, lambda: any(isinstance(e, CommandDispatched) and e.command_type ==
                            "thermal_cycle" for e in bus.events()))
    assert bus.states[eid]["x"]["cmd"]["step"] == "thermal_cycling"
    bus.publish(request_abort(eid, "chamber door found open", "op-1"))
    bus.run()
    ends = {e.protocol_id: e for e in bus.events() if isinstance(e, (ExecutionPassed,
                                                                       ExecutionFailed))}
    aborted = ends["PVTP-015"]
    assert isinstance(aborted, ExecutionFailed) and aborted.reason_code == "aborted"
    assert aborted.reason.startswith("aborted by op-1: chamber door found open during step "
                                     "thermal_cycling on pv-cc-1")
    assert isinstance(ends["PVTP-001"], ExecutionPassed)
    # the chamber finished its command; its answer changed nothing
    assert any(isinstance(e, CommandCompleted) and e.device_id == "pv-cc-1"
               for e in bus.events())
    assert not [e for e in bus.events() if getattr(e, "execution_id", None) == eid
                and isinstance(e, (QcEvaluated, ExecutionPassed, NonConformanceRaised))]
    assert len([e for e in bus.events(ExecutionFailed) if e.execution_id == eid]) == 1
    (done,) = bus.events(ServiceRequestCompleted)
    assert (done.executions, done.passed, done.failed, done.verdict) == (2, 1, 1, "fail")
    assert tl.tick(bus.states, bus.now + 10**12) == []


def test_an_abort_of_an_ended_or_unknown_execution_is_a_no_op():
    _, good = pick_samples(1)
    bus = Bus(DEVICES)
    submit(bus, good, PROTOCOLS[:1])
    bus.run()
    (passed,) = bus.events(ExecutionPassed)
    before = dict(bus.states)
    for eid in (passed.execution_id, "00000000-0000-5000-8000-000000000000"):
        bus.publish(request_abort(eid, "too late", "op-1"))
    bus.run()
    assert bus.states == before
    assert not bus.events(ExecutionFailed)
    assert len(bus.events(ExecutionAbortRequested)) == 2


PID_PROTOCOLS = [{"protocol_id": "PVTP-010", "version": None, "inputs": {}},
                 {"protocol_id": "PVTP-030", "version": None, "inputs": {}}]


def test_wet_leakage_and_pid_with_a_pid_susceptible_module():
    bad, good = pick_pid_samples()
    bus = Bus({**DEVICES, "pv-wl-1": "wet-leakage-tester"})
    submit(bus, [good, bad], PID_PROTOCOLS)
    bus.run()
    ends = {(e.sample_id, e.protocol_id): e for e in bus.events()
            if isinstance(e, (ExecutionPassed, ExecutionFailed))}
    assert {k: type(e).__name__ for k, e in ends.items()} == {
        (s, p["protocol_id"]): "ExecutionPassed" for s in (good, bad)
        for p in PID_PROTOCOLS} | {(bad, "PVTP-030"): "ExecutionFailed"}
    assert ends[(bad, "PVTP-030")].reason_code == "qc_failed"
    ncs = bus.events(NonConformanceRaised)
    assert [(n.sample_id, n.protocol_id, n.criteria) for n in ncs] == [
        (bad, "PVTP-030", ["pmax_degradation"])]
    qc = {(e.sample_id, e.protocol_id): {c["id"]: c for c in e.criteria}
          for e in bus.events(QcEvaluated)}
    assert qc[(bad, "PVTP-030")]["pmax_degradation"]["value"] > 8
    assert qc[(good, "PVTP-030")]["pmax_degradation"]["value"] < 2
    assert qc[(bad, "PVTP-030")]["stress_duration"]["value"] == 96
    wet = qc[(good, "PVTP-010")]
    assert wet["resistance_for_area"]["verdict"] == "pass"
    assert wet["resistance_small_module"]["verdict"] == "not_applicable"
    assert wet["resistance_for_area"]["limit"] == [pytest.approx(40 / 1.62)]
    (done,) = bus.events(ServiceRequestCompleted)
    assert (done.executions, done.passed, done.failed, done.verdict) == (4, 3, 1, "fail")
