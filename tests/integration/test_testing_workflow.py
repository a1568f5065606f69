"""Test protocols end to end on the real broker: `labbus process devices`, `labbus process
testing`, `labbus process reports` and `labbus agent pv` started as a user starts them; a
service request of three protocols on two modules, one of which fails thermal cycling, ends
with its three reports in the artifact store (GridFS on the Mongo-compatible server).

Each test runs in a namespace (and Mongo database) of its own: the testing processor picks any
registered device of a step's type, and an earlier test's instruments, stopped with their test,
stay registered (README "Known limits")."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from labbus.events import kafka
from labbus.events.artifacts import GridFSStore, open_store
from labbus.events.codec import default_codec
from labbus.events.model import (
    DeviceStatusChanged,
    Event,
    ExecutionAnalysed,
    ExecutionFailed,
    ExecutionPassed,
    ExecutionStarted,
    NonConformanceRaised,
    QcEvaluated,
    ReportGenerated,
    ServiceRequestCompleted,
    ServiceRequestSubmitted,
    WebhookDelivered,
    WebhookDeliveryAttempted,
    register_sample,
)
from labbus.events.topics import (
    DEVICE_STATUS,
    TESTING_EXECUTIONS,
    TESTING_REQUESTS,
    WEBHOOKS,
    topic_name,
)
from labbus.processors.webhooks import new_secret
from labbus.producers.pv import models
from tests.conftest import read_topic, run, wait_for
from tests.support.webhook_receiver import Receiver, failing_first
from tests.unit.test_report_gen import check_pdf, check_workbook, expected_verdicts
from tests.unit.test_testing_logic import PID_PROTOCOLS, PROTOCOLS, pick_pid_samples, pick_samples

SPEED = {"LABBUS_TESTING_SPEED": "1000000"}  # TC200 (~570 h) in ~2 s


@pytest.fixture
def cfg(own_cfg):
    return own_cfg
DEVICES = "iv-curve-tracer:2,climate-chamber:2,insulation-tester:1"
# the whole-pipeline test also runs PVTP-010 (wet leakage)
ALL_DEVICES = DEVICES + ",wet-leakage-tester:1"


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


def start(processes, prefix: str, reports: bool = False, devices: str = DEVICES) -> None:
    processes.start("process", "devices")
    processes.start("process", "testing", extra_env=SPEED)
    processes.start("agent", "pv", "--devices", devices, "--prefix", prefix, extra_env=SPEED)
    if reports:
        start_reports(processes)


def start_reports(processes):
    # INFO: the test waits for its "generating the reports of ..." line
    return processes.start("process", "reports", extra_env={"LABBUS_LOG_LEVEL": "INFO"})


def online(cfg, prefix: str) -> set[str]:
    return {e.device_id for e in events(cfg, DEVICE_STATUS, lambda e: isinstance(
        e, DeviceStatusChanged) and e.device_id.startswith(prefix + "-")
        and e.status == "ONLINE")}


def submit(cfg, rid: str, samples: list[str], protocols=PROTOCOLS) -> None:
    """The samples' registrations (a request may name only registered samples), then the
    request."""
    registered = [register_sample(s, f"LIMS-{s}", "ACME Solar", models.DEFAULT_MODULE, 1.62,
                                  f"SN-{s}", datetime.now(UTC), "test") for s in samples]
    run(kafka.publish(cfg, *registered, ServiceRequestSubmitted.create(
        source="test", subject=rid, sequence=1, request_id=rid, customer="ACME Solar",
        module_type=models.DEFAULT_MODULE, module_area_m2=1.62, sample_ids=samples,
        protocols=protocols, submitted_by="test")))


def of_request(cfg, rid: str, spec=TESTING_EXECUTIONS) -> list[Event]:
    return events(cfg, spec, lambda e: getattr(e, "request_id", None) == rid)


def check_verdicts(cfg, rid: str, bad: str, good: str, protocols=PROTOCOLS) -> None:
    wait_for(lambda: any(isinstance(e, ServiceRequestCompleted)
                         for e in of_request(cfg, rid, TESTING_REQUESTS)), 90,
             "ServiceRequestCompleted")
    out = of_request(cfg, rid)
    ends = [e for e in out if isinstance(e, (ExecutionPassed, ExecutionFailed))]
    # one end per execution (an input handled again re-emits the same event id)
    by_execution = {}
    for e in ends:
        by_execution.setdefault(e.execution_id, set()).add(e.event_id)
    assert len(by_execution) == 2 * len(protocols)
    assert all(len(ids) == 1 for ids in by_execution.values())
    verdicts = {(e.sample_id, e.protocol_id): type(e).__name__ for e in ends}
    assert verdicts == {(s, p["protocol_id"]): "ExecutionPassed" for s in (good, bad)
                        for p in protocols} | {(bad, "PVTP-015"): "ExecutionFailed"}, verdicts
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
    n = 2 * len(protocols)
    assert (done[0].executions, done[0].passed, done[0].failed, done[0].verdict) == (
        n, n - 1, 1, "fail")


def check_pid_verdicts(cfg, rid: str, bad: str, good: str) -> None:
    """PVTP-010 and PVTP-030 on two modules: the PID-susceptible one fails PVTP-030 (one NC),
    the rest pass."""
    wait_for(lambda: any(isinstance(e, ServiceRequestCompleted)
                         for e in of_request(cfg, rid, TESTING_REQUESTS)), 90,
             "ServiceRequestCompleted (PVTP-010/030)")
    out = of_request(cfg, rid)
    ends = [e for e in out if isinstance(e, (ExecutionPassed, ExecutionFailed))]
    verdicts = {(e.sample_id, e.protocol_id): type(e).__name__ for e in ends}
    assert verdicts == {(s, p["protocol_id"]): "ExecutionPassed" for s in (good, bad)
                        for p in PID_PROTOCOLS} | {(bad, "PVTP-030"): "ExecutionFailed"}
    failed = next(e for e in ends if isinstance(e, ExecutionFailed))
    assert failed.reason_code == "qc_failed"
    assert "Pmax degradation after the PID stress" in failed.reason
    ncs = {e.event_id: e for e in out if isinstance(e, NonConformanceRaised)}
    assert [(n.sample_id, n.protocol_id, n.criteria) for n in ncs.values()] == [
        (bad, "PVTP-030", ["pmax_degradation"])]
    qc = {(e.sample_id, e.protocol_id): {c["id"]: c for c in e.criteria}
          for e in out if isinstance(e, QcEvaluated)}
    assert qc[(bad, "PVTP-030")]["pmax_degradation"]["value"] > 8
    assert qc[(good, "PVTP-030")]["pmax_degradation"]["value"] < 2
    assert qc[(bad, "PVTP-030")]["stress_duration"]["value"] == 96
    for sample in (good, bad):
        wet = qc[(sample, "PVTP-010")]
        assert wet["resistance_for_area"]["verdict"] == "pass"
        assert wet["resistance_small_module"]["verdict"] == "not_applicable"
        assert wet["solution_resistivity"]["value"] <= 3500


SECRET = new_secret()


def start_webhooks(processes, tmp_path, qms: str, lims: str, tracker: str):
    """`labbus webhooks` with the lab's three systems: non-conformances to the QMS, execution
    results to the LIMS, request status to the tracker."""
    def target(name, url, *types):
        return {"name": name, "url": url, "secret": SECRET,
                "event_types": [t.TYPE for t in types]}

    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps({
        "backoff_initial_s": 0.2, "backoff_max_s": 1.0,
        "targets": [target("qms", qms, NonConformanceRaised),
                    target("lims", lims, ExecutionPassed, ExecutionFailed),
                    target("tracker", tracker, ServiceRequestCompleted)]}))
    return processes.start("webhooks", extra_env={"LABBUS_WEBHOOKS_CONFIG": str(path)})


def accepted_ids(receiver) -> set[str]:
    with receiver.lock:
        return {r.event_id for r in receiver.requests if r.status is not None
                and 200 <= r.status < 300}


def webhook_events(cfg) -> list[Event]:
    return events(cfg, WEBHOOKS, lambda e: True)


def check_qms(cfg, qms, ncs: list[NonConformanceRaised]) -> None:
    """The QMS got exactly the raised NCs, each refused twice then accepted, signed; every
    attempt is an event on lab.webhooks."""
    mine = {str(n.event_id) for n in ncs}
    wait_for(lambda: accepted_ids(qms) >= mine, 60, "the QMS to accept each NC")
    wait_for(lambda: sum(isinstance(e, WebhookDelivered) and e.target == "qms"
                         for e in webhook_events(cfg)) >= len(ncs), 30,
             "WebhookDelivered of each NC")
    assert accepted_ids(qms) == mine  # nothing but the NCs
    by_id = {str(n.event_id): n for n in ncs}
    hooks = webhook_events(cfg)
    for eid, nc in by_id.items():
        got = qms.of(eid)
        assert [r.status for r in got[:3]] == [503, 503, 200], [r.status for r in got]
        for r in got:  # the reference library verifies each signature
            doc = Webhook(SECRET).verify(r.body, r.headers)
            assert r.headers["labbus-event-type"] == NonConformanceRaised.TYPE
        assert doc["payload"]["nc_id"] == nc.nc_id
        assert (doc["payload"]["sample_id"], doc["payload"]["protocol_id"]) == (
            nc.sample_id, nc.protocol_id)
        attempts = [(e.attempt, e.status_code) for e in hooks
                    if isinstance(e, WebhookDeliveryAttempted) and e.target == "qms"
                    and str(e.forwarded_event_id) == eid]
        assert attempts[:3] == [(1, 503), (2, 503), (3, 200)], attempts
        delivered = [e for e in hooks if isinstance(e, WebhookDelivered)
                     and str(e.forwarded_event_id) == eid]
        assert delivered and delivered[0].attempts == 3 and delivered[0].target == "qms"


def check_read_side(cfg, query_api, rid: str, expected: dict) -> None:
    """GET /service-requests/{id} (the PostgreSQL projector's tables) shows the verdicts, the
    criteria, the NC and the three reports."""
    def detail():
        with query_api(cfg) as api:
            r = api.get(f"/service-requests/{rid}")
        body = r.json() if r.status_code == 200 else {}
        done = body.get("status") == "completed" and len(body.get("reports", [])) == 3
        return body if done else None

    body = wait_for(detail, 60, f"the read side of {rid} completed with its reports")
    got = {(x["sample_id"], x["protocol_id"]): x["verdict"] for x in body["executions"]}
    assert got == expected
    assert body["verdict"] == "fail"
    assert body["counts"] == {"total": 4, "running": 0, "passed": 3, "failed": 1}
    (bad,) = [k for k, v in expected.items() if v == "fail"]
    x = next(x for x in body["executions"] if (x["sample_id"], x["protocol_id"]) == bad)
    criteria = {c["id"]: c for c in x["criteria"]}
    assert x["reason_code"] == "qc_failed" and criteria["pmax_degradation"]["verdict"] == "fail"
    assert [(n["sample_id"], n["protocol_id"]) for n in body["non_conformances"]] == [bad]
    assert {r["format"] for r in body["reports"]} == {"pdf", "xlsx", "csv"}


def test_a_service_request_of_three_protocols_one_module_failing_thermal_cycling(
        cfg, processes, tmp_path, query_api):
    """The whole pipeline on the real broker: two requests at once, the issue's (PVTP-001,
    PVTP-015, PVTP-003 on two modules, one failing TC200) and one of PVTP-010 and PVTP-030 on
    two other modules, one PID-susceptible; reports, the PostgreSQL read side and `labbus
    webhooks` with a QMS (that refuses each delivery twice), a LIMS and a tracker."""
    prefix = f"pv{uuid.uuid4().hex[:6]}"
    bad, (good,) = pick_samples(1)
    pid_bad, pid_good = pick_pid_samples({bad, good})
    qms = Receiver(failing_first(2, lambda r: True, status=503))
    lims, tracker = Receiver(), Receiver()
    try:
        start(processes, prefix, reports=True, devices=ALL_DEVICES)
        processes.start("project", "postgres")
        start_webhooks(processes, tmp_path, qms.url, lims.url, tracker.url)
        wait_for(lambda: len(online(cfg, prefix)) == 6, 60, "the six PV instruments ONLINE")
        rid, pid_rid = f"SR-{uuid.uuid4().hex[:8]}", f"SR-{uuid.uuid4().hex[:8]}"
        submit(cfg, rid, [good, bad])
        submit(cfg, pid_rid, [pid_good, pid_bad], PID_PROTOCOLS)
        check_verdicts(cfg, rid, bad, good)
        check_pid_verdicts(cfg, pid_rid, pid_bad, pid_good)
        pid_expected = {(s, p["protocol_id"]): "pass" for s in (pid_good, pid_bad)
                        for p in PID_PROTOCOLS} | {(pid_bad, "PVTP-030"): "fail"}
        check_reports(cfg, rid, expected_verdicts(bad, good))
        check_reports(cfg, pid_rid, pid_expected)
        check_read_side(cfg, query_api, pid_rid, pid_expected)
        ncs = [e for r in (rid, pid_rid) for e in of_request(cfg, r)
               if isinstance(e, NonConformanceRaised)]
        ncs = list({e.event_id: e for e in ncs}.values())
        assert len(ncs) == 2
        check_qms(cfg, qms, ncs)
        ends = {str(e.event_id) for r in (rid, pid_rid) for e in of_request(cfg, r)
                if isinstance(e, (ExecutionPassed, ExecutionFailed))}
        done = {str(e.event_id) for r in (rid, pid_rid)
                for e in of_request(cfg, r, TESTING_REQUESTS)
                if isinstance(e, ServiceRequestCompleted)}
        assert len(ends) == 10 and len(done) == 2
        wait_for(lambda: accepted_ids(lims) == ends, 60, "the LIMS to get every result")
        wait_for(lambda: accepted_ids(tracker) == done, 60, "the tracker to get each completion")
    finally:
        for receiver in (qms, lims, tracker):
            receiver.close()


def test_kill_9_of_the_testing_processor_mid_execution_changes_no_verdict(cfg, processes):
    prefix = f"pv{uuid.uuid4().hex[:6]}"
    start(processes, prefix)
    wait_for(lambda: len(online(cfg, prefix)) == 5, 60, "the five PV instruments ONLINE")
    bad, (good,) = pick_samples(1)
    rid = f"SR-{uuid.uuid4().hex[:8]}"
    # without PVTP-001: executions on one sample are not sequenced (README "Known limits"), and
    # when the kill delays it, its sweep can measure the module after thermal cycling
    protocols = [p for p in PROTOCOLS if p["protocol_id"] != "PVTP-001"]
    submit(cfg, rid, [good, bad], protocols)
    wait_for(lambda: any(isinstance(e, ExecutionStarted) and e.protocol_id == "PVTP-015"
                         for e in of_request(cfg, rid)), 60, "a thermal cycling started",
             interval=0.05)
    testing = next(p for p in processes.running if "testing" in p.args)
    testing.kill()  # SIGKILL
    testing.wait(10)
    ended = sum(isinstance(e, (ExecutionPassed, ExecutionFailed)) for e in of_request(cfg, rid))
    processes.start("process", "testing", extra_env=SPEED)
    check_verdicts(cfg, rid, bad, good, protocols)
    print(f"\n{ended} of {2 * len(protocols)} executions had ended at the kill -9")


def reports_of(cfg, rid: str) -> list[ReportGenerated]:
    return [e for e in of_request(cfg, rid, TESTING_REQUESTS) if isinstance(e, ReportGenerated)]


def check_reports(cfg, rid: str, expected: dict | None = None, timeout: float = 90) -> dict:
    """Exactly one ReportGenerated per format (by event id), each artifact stored once, the
    PDF holding each verdict (those of the request's events, and `expected` when given) and
    the workbook the readings. Returns format -> event."""
    wait_for(lambda: {e.format for e in reports_of(cfg, rid)} == {"pdf", "xlsx", "csv"},
             timeout, "a ReportGenerated per format", interval=0.1)
    got = reports_of(cfg, rid)
    ids: dict[str, set] = {}
    for e in got:
        ids.setdefault(e.format, set()).add(e.event_id)
    assert {f: len(v) for f, v in ids.items()} == {"pdf": 1, "xlsx": 1, "csv": 1}, ids
    by_format = {e.format: e for e in got}
    store = open_store(cfg)
    assert isinstance(store, GridFSStore)
    for e in by_format.values():
        assert store.files.count_documents({"_id": e.sha256}) == 1
        assert store.info(e.sha256).size == e.size and e.location.endswith(e.sha256)
    verdicts = {(e.sample_id, e.protocol_id): "pass" if isinstance(e, ExecutionPassed)
                else "fail" for e in of_request(cfg, rid)
                if isinstance(e, (ExecutionPassed, ExecutionFailed))}
    if expected is not None:
        assert verdicts == expected
    check_pdf(store.get(by_format["pdf"].sha256), verdicts)
    analysed = {e.execution_id: e for e in of_request(cfg, rid)
                if isinstance(e, ExecutionAnalysed)}
    assert len(analysed) == len(verdicts)
    check_workbook(store.get(by_format["xlsx"].sha256), list(analysed.values()))
    assert by_format["pdf"].certificate == all(v == "pass" for v in verdicts.values())
    assert not by_format["xlsx"].certificate and not by_format["csv"].certificate
    return by_format


def completion_to_report_s(cfg, rid: str) -> float:
    done = next(e for e in of_request(cfg, rid, TESTING_REQUESTS)
                if isinstance(e, ServiceRequestCompleted))
    pdf = min((e for e in reports_of(cfg, rid) if e.format == "pdf"),
              key=lambda e: e.envelope.recorded_at)
    return (pdf.envelope.recorded_at - done.envelope.recorded_at).total_seconds()


def test_a_completed_request_gets_its_three_reports_and_a_kill_9_mid_generation_duplicates_none(
        cfg, processes):
    prefix = f"pv{uuid.uuid4().hex[:6]}"
    start(processes, prefix, reports=True)
    wait_for(lambda: len(online(cfg, prefix)) == 5, 60, "the five PV instruments ONLINE")
    bad, (good,) = pick_samples(1)
    first = f"SR-{uuid.uuid4().hex[:8]}"
    submit(cfg, first, [good, bad])
    check_verdicts(cfg, first, bad, good)
    check_reports(cfg, first, expected_verdicts(bad, good))
    latency = completion_to_report_s(cfg, first)
    # the second request: kill -9 the report processor while it generates
    reports = next(p for p in processes.running if "reports" in p.args)
    second = f"SR-{uuid.uuid4().hex[:8]}"
    submit(cfg, second, [good, bad])  # modules cycled once already: verdicts as they come
    log = Path(reports.log_path)
    wait_for(lambda: f"generating the reports of {second}" in log.read_text(), 120,
             "the report processor generating", interval=0.02)
    reports.kill()  # SIGKILL
    reports.wait(10)
    killed_at = time.monotonic()
    before = len(reports_of(cfg, second))
    start_reports(processes)
    by_format = check_reports(cfg, second, timeout=120)
    print(f"\ncompletion -> ReportGenerated(pdf): {latency * 1000:.0f} ms; kill -9 mid-"
          f"generation with {before} of 3 ReportGenerated out, all 3 "
          f"{time.monotonic() - killed_at:.1f} s after the kill")
    first_shas = {e.sha256 for e in reports_of(cfg, first)}
    assert first_shas.isdisjoint(e.sha256 for e in by_format.values())  # its own reports
