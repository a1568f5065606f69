"""The testing processor's logic (processors/testing_logic.py) with the simulated PV instruments
(producers/pv/agents.py), wired through an in-memory log: every message is encoded with the
real codec and routed to its catalog topic, the processor's handler gets the decoded event and
the record (its forwards are the same bytes, as on the broker), the instruments answer the
dispatched commands. No services: the order of delivery is chosen by the test."""

from __future__ import annotations

import asyncio
import collections
import uuid

import pytest

from labbus.events.codec import default_codec
from labbus.events.config import load
from labbus.events.faust_runtime import Shared
from labbus.events.model import (
    CommandDispatched,
    CommandIssued,
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


def submit(bus: Bus, samples: list[str], protocols: list[dict], rid: str = "SR-1") -> None:
    bus.publish(ServiceRequestSubmitted.create(
        source="t", subject=rid, sequence=1, request_id=rid, customer="ACME Solar",
        module_type=models.DEFAULT_MODULE, module_area_m2=1.62, sample_ids=samples,
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
