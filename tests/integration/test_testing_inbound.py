"""Issue 11's inbound routes end to end, through the real command gateway over HTTP (`labbus
gateway http`, trusting the stand-in OpenID provider), the real broker, `labbus process
devices`, `labbus process testing`, the simulated PV instruments (`labbus agent pv`), `labbus
project postgres` and the query API:

- a LIMS sample registration (`POST /samples`) shows at `/samples/{id}`; a service request may
  name only registered samples of its customer, module type and area (else it is rejected with
  the reason), and shows each sample's registration;
- an inspection (`POST /service-requests/{id}/inspections`) shows on the request;
- an abort (`POST /executions/{id}/abort`) of a thermal cycling in progress ends it as
  `ExecutionFailed` `aborted` with the operator's reason, the chamber's late answer changes
  nothing, the request completes with the other execution's verdict; aborting an ended
  execution is a 409 saying how it ended.

The module runs in a namespace of its own (the testing processor picks any registered device of
a step's type)."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from labbus.events.model import (
    CommandCompleted,
    CommandDispatched,
    ExecutionAnalysed,
    ExecutionFailed,
    ExecutionPassed,
    QcEvaluated,
)
from labbus.events.topics import (
    COMMANDS,
    TESTING_EXECUTIONS,
    TESTING_INBOX,
    TESTING_SAMPLES,
)
from labbus.producers.pv import models
from tests.conftest import (
    Processes,
    free_port,
    http_server,
    own_namespace,
    wait_for,
)
from tests.integration.test_testing_workflow import events
from tests.unit.test_testing_logic import PROTOCOLS, pick_samples

RUN = uuid.uuid4().hex[:6]
# TC200 (~570 h of chamber time) in ~20 s: long enough to abort it mid-cycle
SPEED = {"LABBUS_TESTING_SPEED": "100000"}
DEVICES = "iv-curve-tracer:1,climate-chamber:1,insulation-tester:1"
CUSTOMER = f"Inbound Solar {RUN}"
OPERATOR, STUDENT = f"op-{RUN}", f"stu-{RUN}"
GOOD = pick_samples(2)[1]  # two samples that pass PVTP-001, PVTP-003 and PVTP-015


@pytest.fixture(scope="module")
def lab(env, tokens, query_api, tmp_path_factory):
    """The processes of a testing lab in a namespace of this module's, the gateway on a free
    port and a query API client; yields (cfg, gateway base URL, API client)."""
    logs = tmp_path_factory.mktemp("inbound")
    with own_namespace(env, f"inb{RUN}") as (cfg, own):
        penv = {**env, **own}
        procs = Processes(penv, logs)
        try:
            procs.start("project", "postgres")
            procs.start("process", "devices")
            procs.start("process", "testing", extra_env=SPEED)
            procs.start("agent", "pv", "--devices", DEVICES, "--prefix", f"pv{RUN}",
                        extra_env=SPEED)
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            genv = {**penv, **tokens.env, "LABBUS_HTTP_GATEWAY_PORT": str(port)}
            with http_server(["gateway", "http"], genv, logs / "gateway-http.log",
                             f"{base}/health/ready"), query_api(cfg) as api:
                yield cfg, base, api
        finally:
            procs.stop_all()


def post(base: str, path: str, headers: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{base}{path}", headers=headers, timeout=15, **kwargs)


def shown(api, path: str, ready=lambda body: True, timeout: float = 60) -> dict:
    """The API's body of `path` once it answers 200 and `ready(body)` holds."""
    def ask():
        r = api.get(path)
        return r.json() if r.status_code == 200 and ready(r.json()) else None
    return wait_for(ask, timeout, f"GET {path}", interval=0.3)


def registration(sample_id: str, **over) -> dict:
    return {"sample_id": sample_id, "lims_ref": f"LIMS-{RUN}-{sample_id}", "customer": CUSTOMER,
            "module_type": models.DEFAULT_MODULE, "module_area_m2": 1.62,
            "serial_number": f"SN-{sample_id}", "received_at": "2026-03-02T08:15:00+01:00",
            **over}


def request_body(samples: list[str], protocols: list[dict], **over) -> dict:
    return {"customer": CUSTOMER, "module_type": models.DEFAULT_MODULE, "module_area_m2": 1.62,
            "sample_ids": samples, "protocols": protocols, **over}


def test_lims_registrations_and_the_requests_and_inspections_that_name_them(lab, tokens):
    cfg, base, api = lab
    op = tokens.headers(OPERATOR, ("operator",))
    sample = GOOD[0]

    # POST /samples: the permission, the body's shape, Idempotency-Key
    body = registration(sample)
    assert post(base, "/samples", tokens.headers(STUDENT, ("student",)),
                json=body).status_code == 403
    for bad in ({"module_area_m2": 0}, {"received_at": "2026-03-02T08:15:00"},
                {"sample_id": "a/b"}, {"lims_ref": ""}):
        r = post(base, "/samples", op, json={**body, **bad})
        assert r.status_code == 422, (bad, r.text)
    keyed = {**op, "Idempotency-Key": f"reg-{RUN}"}
    sent = post(base, "/samples", keyed, json=body)
    assert sent.status_code == 202, sent.text
    assert sent.headers["location"] == f"{cfg.query_api_url}/samples/{sample}"
    assert post(base, "/samples", keyed, json=body).json() == sent.json()
    assert post(base, "/samples", keyed, json={**body, "serial_number": "x"}).status_code == 409
    (registered,) = events(cfg, TESTING_SAMPLES, lambda e: e.sample_id == sample)
    assert str(registered.event_id) == sent.json()["event_id"]
    assert registered.envelope.actor.user_id == OPERATOR
    assert registered.envelope.actor.roles == ("operator",)
    assert registered.received_at.isoformat() == "2026-03-02T07:15:00+00:00"

    got = shown(api, f"/samples/{sample}")
    assert {k: got[k] for k in ("lims_ref", "customer", "module_type", "module_area_m2",
                                "serial_number", "registered_by", "registrations")} == {
        "lims_ref": body["lims_ref"], "customer": CUSTOMER, "module_type": models.DEFAULT_MODULE,
        "module_area_m2": 1.62, "serial_number": f"SN-{sample}", "registered_by": OPERATOR,
        "registrations": 1}
    assert got["received_at"] == "2026-03-02T07:15:00Z"
    listed = api.get("/samples", params={"customer": CUSTOMER}).json()["items"]
    assert [s["sample_id"] for s in listed] == [sample]
    assert api.get("/samples", params={"lims_ref": body["lims_ref"]}).json()["items"] == listed
    assert api.get(f"/samples/nope-{RUN}").status_code == 404

    # the rule: a request naming a sample not registered, or registered otherwise, is rejected
    # with the reason; one naming registered samples as registered runs
    unknown = f"UNREG-{RUN}"
    answers = {}
    for name, req in (
            ("unregistered", request_body([sample, unknown], PROTOCOLS[2:])),
            ("other area", request_body([sample], PROTOCOLS[2:], module_area_m2=1.0)),
            ("ok", request_body([sample], PROTOCOLS[2:]))):
        r = post(base, "/service-requests", op, json=req)
        assert r.status_code == 202, r.text
        answers[name] = r.json()["request_id"]
    rejected = shown(api, f"/service-requests/{answers['unregistered']}",
                     lambda b: b["status"] == "rejected")
    assert rejected["rejection_reasons"] == [
        f"sample {unknown} is not registered: the lab's LIMS registers a sample when it is "
        "received (POST /samples) before a request may name it"]
    assert [(s["sample_id"], (s["registration"] or {}).get("lims_ref"))
            for s in rejected["samples"]] == [(sample, body["lims_ref"]), (unknown, None)]
    other = shown(api, f"/service-requests/{answers['other area']}",
                  lambda b: b["status"] == "rejected")
    assert other["rejection_reasons"] == [
        f"sample {sample} ({body['lims_ref']}) was registered with an area of 1.62 m², the "
        "request says 1 m²"]
    ok = shown(api, f"/service-requests/{answers['ok']}", lambda b: b["status"] == "completed",
               timeout=120)
    assert ok["verdict"] == "pass", ok
    (s,) = ok["samples"]
    assert s["sample_id"] == sample and s["registration"]["serial_number"] == f"SN-{sample}"

    # the sample's history: the three requests naming it, its execution
    history = shown(api, f"/samples/{sample}", lambda b: len(b["service_requests"]) == 3)
    assert {r["request_id"]: r["status"] for r in history["service_requests"]} == {
        answers["unregistered"]: "rejected", answers["other area"]: "rejected",
        answers["ok"]: "completed"}
    assert [(x["request_id"], x["protocol_id"], x["verdict"])
            for x in history["executions"]] == [(answers["ok"], "PVTP-003", "pass")]

    # inspections: recorded on the request, shown there; refused for what cannot be inspected
    rid = answers["ok"]
    inspection = {"sample_id": sample, "findings": ["frame intact", "label legible"],
                  "defects": ["scratched back sheet"],
                  "photo_refs": [f"https://photos.lab.example/{sample}/front.jpg"]}
    path = f"/service-requests/{rid}/inspections"
    assert post(base, path, tokens.headers(STUDENT, ("student",)),
                json=inspection).status_code == 403
    assert post(base, path, op, json={**inspection, "photo_refs": ["front.jpg"]}
                ).status_code == 422  # not a URI
    r = post(base, f"/service-requests/nope-{RUN}/inspections", op, json=inspection)
    assert r.status_code == 404 and "no service request" in r.json()["detail"]
    r = post(base, path, op, json={**inspection, "sample_id": unknown})
    assert r.status_code == 400
    assert r.json()["detail"] == (f"sample {unknown} is not one of service request {rid}'s "
                                  f"samples: {sample}")
    r = post(base, f"/service-requests/{answers['unregistered']}/inspections", op,
             json=inspection)
    assert r.status_code == 409 and "was rejected" in r.json()["detail"]
    sent = post(base, path, {**op, "Idempotency-Key": f"insp-{RUN}"}, json=inspection)
    assert sent.status_code == 202, sent.text
    assert sent.headers["location"] == f"{cfg.query_api_url}/service-requests/{rid}"
    got = shown(api, f"/service-requests/{rid}", lambda b: b["inspections"])
    (seen,) = got["inspections"]
    assert {k: seen[k] for k in ("sample_id", "inspector", "findings", "defects",
                                 "photo_refs")} == {**inspection, "inspector": OPERATOR}

    # the activity log: who registered, inspected (admin: audit:read)
    admin = tokens.headers(f"adm-{RUN}", ("admin",))

    def audited():
        items = api.get("/audit", params={"user": OPERATOR, "limit": 1000},
                        headers=admin).json()["items"]
        actions = sorted(i["action"] for i in items)
        return actions if "result:record" in actions else None
    actions = wait_for(audited, 30, "the operator's actions in the audit log")
    assert actions.count("service-request:submit") == 4  # one registration, three requests
    assert actions.count("result:record") == 1


def test_an_abort_ends_a_thermal_cycling_in_progress_and_the_request_completes(lab, tokens):
    cfg, base, api = lab
    op = tokens.headers(OPERATOR, ("operator",))
    sample = GOOD[1]
    assert post(base, "/samples", op, json=registration(sample)).status_code == 202
    shown(api, f"/samples/{sample}")
    r = post(base, "/service-requests", op, json=request_body([sample], PROTOCOLS[:2]))
    assert r.status_code == 202, r.text
    rid = r.json()["request_id"]
    detail = shown(api, f"/service-requests/{rid}", lambda b: len(b["executions"]) == 2)
    eid = {x["protocol_id"]: x["execution_id"] for x in detail["executions"]}
    tc, stc = eid["PVTP-015"], eid["PVTP-001"]

    def cycling():
        return [e for e in events(cfg, COMMANDS, lambda e: isinstance(e, CommandDispatched)
                                  and str(e.envelope.correlation_id) == tc
                                  and e.command_type == "thermal_cycle")]
    (dispatched,) = wait_for(cycling, 90, "the thermal cycling dispatched to the chamber",
                             interval=0.2)

    # refusals first: no permission, no such execution
    assert post(base, f"/executions/{tc}/abort", tokens.headers(STUDENT, ("student",)),
                json={"reason": "x"}).status_code == 403
    assert post(base, f"/executions/nope-{RUN}/abort", op,
                json={"reason": "x"}).status_code == 404
    assert post(base, f"/executions/{tc}/abort", op, json={}).status_code == 422
    reason = "chamber door found open"
    r = post(base, f"/executions/{tc}/abort", op, json={"reason": reason})
    assert r.status_code == 202, r.text
    assert r.json()["request_id"] == rid
    assert r.headers["location"] == f"{cfg.query_api_url}/service-requests/{rid}"

    done = shown(api, f"/service-requests/{rid}", lambda b: b["status"] == "completed",
                 timeout=120)
    ex = {x["protocol_id"]: x for x in done["executions"]}
    assert (ex["PVTP-015"]["status"], ex["PVTP-015"]["reason_code"]) == ("failed", "aborted")
    assert ex["PVTP-015"]["reason"].startswith(
        f"aborted by {OPERATOR}: {reason} during step thermal_cycling on "
        f"{dispatched.device_id}")
    assert (ex["PVTP-015"]["abort_requested_by"], ex["PVTP-015"]["abort_reason"]) == (
        OPERATOR, reason)
    assert (ex["PVTP-001"]["status"], ex["PVTP-001"]["verdict"]) == ("passed", "pass")
    assert (done["verdict"], done["counts"]["passed"], done["counts"]["failed"]) == (
        "fail", 1, 1)
    assert done["non_conformances"] == []  # an abort is no criterion failed

    # an ended execution: 409 saying how it ended, nothing published
    again = post(base, f"/executions/{tc}/abort", op, json={"reason": reason})
    assert again.status_code == 409
    assert f"execution {tc} already ended: failed (aborted)" in again.json()["detail"]
    passed = post(base, f"/executions/{stc}/abort", op, json={"reason": reason})
    assert passed.status_code == 409 and "already ended: passed" in passed.json()["detail"]

    # the chamber finishes the command it had (not cancelled on the instrument): its answer
    # reaches the processor (forwarded to its inbox) and changes nothing: no next step (the
    # final sweep) is issued, nothing is analysed, the execution ended once
    def forwarded():
        return events(cfg, TESTING_INBOX, lambda e: isinstance(e, CommandCompleted)
                      and e.command_id == dispatched.command_id)
    wait_for(forwarded, 90, "the chamber's completion of the aborted cycling, forwarded")
    time.sleep(3)  # the processor's handling of the forwarded completion (it emits nothing)
    sweeps = events(cfg, COMMANDS, lambda e: isinstance(e, CommandDispatched)
                    and str(e.envelope.correlation_id) == tc and e.command_type == "sweep")
    assert len(sweeps) == 1  # the initial sweep only
    mine = events(cfg, TESTING_EXECUTIONS, lambda e: getattr(e, "execution_id", None) == tc)
    ends = {e.event_id for e in mine if isinstance(e, (ExecutionPassed, ExecutionFailed))}
    assert len(ends) == 1
    assert not [e for e in mine if isinstance(e, (ExecutionAnalysed, QcEvaluated))]
