"""Test protocols end to end on the real broker: `labbus process devices`, `labbus process
testing` and `labbus agent pv` started as a user starts them; a service request of three
protocols on two modules, one of which fails thermal cycling.

Each test uses its own request id and device prefix and ignores everything else in the
session's namespace."""

from __future__ import annotations

import uuid

from labbus.events import kafka
from labbus.events.codec import default_codec
from labbus.events.model import (
    DeviceStatusChanged,
    Event,
    ExecutionFailed,
    ExecutionPassed,
    ExecutionStarted,
    NonConformanceRaised,
    QcEvaluated,
    ServiceRequestCompleted,
    ServiceRequestSubmitted,
)
from labbus.events.topics import DEVICE_STATUS, TESTING_EXECUTIONS, TESTING_REQUESTS, topic_name
from labbus.producers.pv import models
from tests.conftest import read_topic, run, wait_for
from tests.unit.test_testing_logic import PROTOCOLS, pick_samples

SPEED = {"LABBUS_TESTING_SPEED": "1000000"}  # TC200 (~570 h) in ~2 s
DEVICES = "iv-curve-tracer:2,climate-chamber:2,insulation-tester:1"


def events(cfg, spec, keep) -> list[Event]:
    codec = default_codec()
    out = []
    for r in run(read_topic(cfg, topic_name(cfg, spec))):
        try:
            e = codec.decode(r.value)
        except ValueError:
            continue  # another test's junk
        if keep(e):
            out.append(e)
    return out


def start(processes, prefix: str) -> None:
    processes.start("process", "devices")
    processes.start("process", "testing", extra_env=SPEED)
    processes.start("agent", "pv", "--devices", DEVICES, "--prefix", prefix, extra_env=SPEED)


def online(cfg, prefix: str) -> set[str]:
    return {e.device_id for e in events(cfg, DEVICE_STATUS, lambda e: isinstance(
        e, DeviceStatusChanged) and e.device_id.startswith(prefix + "-")
        and e.status == "ONLINE")}


def submit(cfg, rid: str, samples: list[str]) -> None:
    run(kafka.publish(cfg, ServiceRequestSubmitted.create(
        source="test", subject=rid, sequence=1, request_id=rid, customer="ACME Solar",
        module_type=models.DEFAULT_MODULE, module_area_m2=1.62, sample_ids=samples,
        protocols=PROTOCOLS, submitted_by="test")))


def of_request(cfg, rid: str, spec=TESTING_EXECUTIONS) -> list[Event]:
    return events(cfg, spec, lambda e: getattr(e, "request_id", None) == rid)


def check_verdicts(cfg, rid: str, bad: str, good: str) -> None:
    wait_for(lambda: any(isinstance(e, ServiceRequestCompleted)
                         for e in of_request(cfg, rid, TESTING_REQUESTS)), 90,
             "ServiceRequestCompleted")
    out = of_request(cfg, rid)
    ends = [e for e in out if isinstance(e, (ExecutionPassed, ExecutionFailed))]
    # one end per execution (an input handled again re-emits the same event id)
    by_execution = {}
    for e in ends:
        by_execution.setdefault(e.execution_id, set()).add(e.event_id)
    assert len(by_execution) == 6 and all(len(ids) == 1 for ids in by_execution.values())
    verdicts = {(e.sample_id, e.protocol_id): type(e).__name__ for e in ends}
    assert verdicts == {(s, p["protocol_id"]): "ExecutionPassed" for s in (good, bad)
                        for p in PROTOCOLS} | {(bad, "PVTP-015"): "ExecutionFailed"}, verdicts
    failed = next(e for e in ends if isinstance(e, ExecutionFailed))
    assert failed.reason_code == "qc_failed", failed.reason
    assert "Pmax degradation after thermal cycling" in failed.reason
    ncs = {e.event_id: e for e in out if isinstance(e, NonConformanceRaised)}
    assert [(n.sample_id, n.protocol_id, n.criteria) for n in ncs.values()] == [
        (bad, "PVTP-015", ["pmax_degradation"])]
    qc = {(e.sample_id, e.protocol_id): {c["id"]: c for c in e.criteria}
          for e in out if isinstance(e, QcEvaluated)}
    assert qc[(bad, "PVTP-015")]["pmax_degradation"]["value"] > 5
    assert qc[(good, "PVTP-015")]["pmax_degradation"]["value"] < 3
    assert qc[(bad, "PVTP-015")]["cycles_completed"]["value"] == 200
    done = [e for e in of_request(cfg, rid, TESTING_REQUESTS)
            if isinstance(e, ServiceRequestCompleted)]
    assert len({e.event_id for e in done}) == 1
    assert (done[0].executions, done[0].passed, done[0].failed, done[0].verdict) == (
        6, 5, 1, "fail")


def test_a_service_request_of_three_protocols_one_module_failing_thermal_cycling(
        cfg, processes):
    prefix = f"pv{uuid.uuid4().hex[:6]}"
    start(processes, prefix)
    wait_for(lambda: len(online(cfg, prefix)) == 5, 60, "the five PV instruments ONLINE")
    bad, (good,) = pick_samples(1)
    rid = f"SR-{uuid.uuid4().hex[:8]}"
    submit(cfg, rid, [good, bad])
    check_verdicts(cfg, rid, bad, good)


def test_kill_9_of_the_testing_processor_mid_execution_changes_no_verdict(cfg, processes):
    prefix = f"pv{uuid.uuid4().hex[:6]}"
    start(processes, prefix)
    wait_for(lambda: len(online(cfg, prefix)) == 5, 60, "the five PV instruments ONLINE")
    bad, (good,) = pick_samples(1)
    rid = f"SR-{uuid.uuid4().hex[:8]}"
    submit(cfg, rid, [good, bad])
    wait_for(lambda: any(isinstance(e, ExecutionStarted) and e.protocol_id == "PVTP-015"
                         for e in of_request(cfg, rid)), 60, "a thermal cycling started",
             interval=0.05)
    testing = next(p for p in processes.running if "testing" in p.args)
    testing.kill()  # SIGKILL
    testing.wait(10)
    ended = sum(isinstance(e, (ExecutionPassed, ExecutionFailed)) for e in of_request(cfg, rid))
    processes.start("process", "testing", extra_env=SPEED)
    check_verdicts(cfg, rid, bad, good)
    print(f"\n{ended} of 6 executions had ended at the kill -9")
