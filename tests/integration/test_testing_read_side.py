"""The test-protocol read side against the real PostgreSQL and SecantusDB: the events of a
service request (tests/support/testing_events.py: two executions of PVTP-003, one failing with a
non-conformance, reports) through `PostgresProjection.apply`, then the query API's routes
(`query_api`: a viewer's token of the stand-in issuer), reports read from GridFS.

- The projection: the rows each table gets; a replay of everything changes nothing; an
  execution's events projected before its request's submission (another topic) give the same
  rows in the end, and meanwhile no listed request; a regenerated report replaces the older,
  whatever order the two are projected in.
- The API: 200s with the rows' content, 404 for unknown ids and reports not generated, 4xx for
  bad parameters, 403 for researchers and students (read:own), pages by cursor.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from pymongo import MongoClient

from labbus.events.artifacts import GridFSStore
from labbus.events.protocols import shipped_catalog
from labbus.projections.postgres import PostgresProjection
from tests.conftest import run, walk_pages
from tests.support.testing_events import (
    as_positioned,
    rejected_request_events,
    report_generated,
    service_request_events,
)

RUN = uuid.uuid4().hex[:8]
CUSTOMER = f"Acme Solar {RUN}"
A, C, B = f"sr-{RUN}-a", f"sr-{RUN}-c", f"sr-{RUN}-b"  # C: executions projected first
T0 = datetime(2026, 3, 1, 9, tzinfo=UTC)
REQUESTS, EXECUTIONS = f"test-{RUN}.requests", f"test-{RUN}.executions"
PDF_OLD = b"%PDF-1.7 old " + RUN.encode()
PDF_NEW = b"%PDF-1.7 new " + RUN.encode()
CSV = f"execution_id,criterion,verdict\r\nx,{RUN},fail\r\n".encode()


JSONB = {"protocols", "inspections", "inputs", "results", "units", "criteria", "entered"}


def _snapshot(rows) -> list[dict]:
    """Rows as dicts, jsonb columns decoded (the projector's pool leaves them text)."""
    return [{k: json.loads(v) if k in JSONB and isinstance(v, str) else v for k, v in r.items()}
            for r in rows]


async def _tables(pool, ids: list[str]) -> dict[str, list[dict]]:
    q = {"service_requests": "SELECT * FROM service_requests WHERE request_id = ANY($1) "
                             "ORDER BY request_id",
         "executions": "SELECT * FROM executions WHERE request_id = ANY($1) "
                       "ORDER BY execution_id",
         "non_conformances": "SELECT * FROM non_conformances WHERE request_id = ANY($1) "
                             "ORDER BY nc_id",
         "reports": "SELECT * FROM reports WHERE request_id = ANY($1) "
                    "ORDER BY request_id, format"}
    return {name: _snapshot(await pool.fetch(sql, ids)) for name, sql in q.items()}


@pytest.fixture(scope="module")
def seeded(cfg, query_api):
    """The three requests projected step by step; the tables after each step of interest."""
    client = MongoClient(cfg.mongo_url)
    store = GridFSStore(client[cfg.mongo_db])
    pdf_old = store.put(f"{A}.pdf", "application/pdf", PDF_OLD)
    pdf_new = store.put(f"{A}.pdf", "application/pdf", PDF_NEW)
    csv = store.put(f"{A}.csv", "text/csv", CSV)
    client.close()
    a, c = service_request_events(A, T0, customer=CUSTOMER), \
        service_request_events(C, T0, customer=CUSTOMER)
    reports = [report_generated(A, "pdf", pdf_new, T0 + timedelta(hours=2), certificate=False),
               report_generated(A, "csv", csv, T0 + timedelta(hours=1)),
               # an older generation, projected after the newer one
               report_generated(A, "pdf", pdf_old, T0 + timedelta(hours=1))]
    requests = as_positioned(REQUESTS, [*a["requests"], *rejected_request_events(B, T0),
                                     *reports, *c["requests"]])
    executions = as_positioned(EXECUTIONS, [*a["executions"], *c["executions"]])
    c_executions = executions[len(a["executions"]):]
    ids = [A, B, C]
    out = {}

    async def go():
        pg = PostgresProjection(cfg)
        await pg.start()
        try:
            # C's executions first (their topic's batch came first), then everything in order
            await pg.apply(c_executions, {})
            out["c_early"] = await _tables(pg.pool, [C])
            with query_api(cfg) as api:
                out["c_early_api"] = (api.get(f"/service-requests/{C}").status_code,
                                      api.get("/service-requests",
                                              params={"customer": CUSTOMER}).json())
            await pg.apply(requests, {})
            await pg.apply(executions, {})
            out["first"] = await _tables(pg.pool, ids)
            await pg.apply(requests + executions, {})  # a replay of everything
            await pg.apply(list(reversed(requests)), {})  # and one in another order
            out["again"] = await _tables(pg.pool, ids)
        finally:
            await pg.stop()

    run(go())
    out["artifacts"] = {"pdf": pdf_new, "csv": csv}
    return out


def test_the_events_of_a_request_become_its_rows(seeded):
    t = seeded["first"]
    requests = {r["request_id"]: r for r in t["service_requests"]}
    a = requests[A]
    assert (a["status"], a["verdict"], a["executions"], a["passed"], a["failed"]) == (
        "completed", "fail", 2, 1, 1)
    assert (a["customer"], a["submitted_by"], a["sample_ids"]) == (
        CUSTOMER, "eng@lab.example", [f"{A}-S1", f"{A}-S2"])
    assert a["protocols"] == [{"protocol_id": "PVTP-003", "version": None, "inputs": {}}]
    assert sorted(i["sample_id"] for i in a["inspections"].values()) == a["sample_ids"]
    assert a["submitted_at"] == T0 and a["finished_at"] == T0 + timedelta(minutes=40)
    b = requests[B]
    assert (b["status"], b["rejection_reasons"]) == (
        "rejected", ["unknown protocol: no protocol PVTP-999"])
    xs = {x["sample_id"]: x for x in t["executions"] if x["request_id"] == A}
    ok, bad = xs[f"{A}-S1"], xs[f"{A}-S2"]
    template = shipped_catalog().get("PVTP-003")
    assert (ok["status"], ok["verdict"], ok["qc_verdict"], ok["reason_code"]) == (
        "passed", "pass", "pass", None)
    assert (bad["status"], bad["verdict"], bad["reason_code"]) == ("failed", "fail", "qc_failed")
    assert "16 MOhm" in bad["reason"]
    assert ok["template_sha256"] == template.sha256 and ok["inputs"]["module_area_m2"] == 1.6
    assert ok["results"]["insulation_resistance_mohm"] == 600.0
    assert ok["steps"] == ["dielectric_withstand", "insulation_resistance"]
    verdicts = {c["id"]: c["verdict"] for c in bad["criteria"]}
    assert verdicts["resistance_times_area"] == "fail" and verdicts["no_breakdown"] == "pass"
    assert [c["id"] for c in bad["criteria"]] == [c.id for c in template.criteria]
    assert bad["entered"]["breakdowns"]["value"] == 0.0 and ok["entered"] == {}
    assert all(x["started_at"] and x["analysed_at"] and x["finished_at"] for x in xs.values())
    [nc] = [n for n in t["non_conformances"] if n["request_id"] == A]
    assert (nc["execution_id"], nc["sample_id"], nc["criteria"]) == (
        bad["execution_id"], f"{A}-S2", ["resistance_times_area"])
    reports = {r["format"]: r for r in t["reports"]}
    assert set(reports) == {"pdf", "csv"}
    assert reports["pdf"]["sha256"] == seeded["artifacts"]["pdf"].sha256  # the newer one
    assert reports["pdf"]["generated_at"] == T0 + timedelta(hours=2)
    assert reports["csv"]["size"] == len(CSV)


def test_a_replay_changes_nothing_and_the_order_does_not_matter(seeded):
    assert seeded["again"] == seeded["first"]
    # C's executions were projected before its submission: the same rows as A's in the end
    by_id = {r["request_id"]: r for r in seeded["first"]["service_requests"]}
    keep = ("status", "status_rank", "verdict", "executions", "passed", "failed", "customer",
            "submitted_at", "finished_at", "updated_at")
    assert {k: by_id[C][k] for k in keep} == {k: by_id[A][k] for k in keep}
    status = sorted((x["status"], x["verdict"]) for x in seeded["first"]["executions"]
                    if x["request_id"] == C)
    assert status == [("failed", "fail"), ("passed", "pass")]
    # meanwhile the request had a row (running, not submitted yet) and the API showed nothing
    [early] = seeded["c_early"]["service_requests"]
    assert (early["status"], early["submitted_at"], early["customer"]) == ("running", None, None)
    code, listing = seeded["c_early_api"]
    assert code == 404 and listing["items"] == []


def test_service_requests_through_the_api(seeded, cfg, query_api):
    with query_api(cfg, roles=("engineer",)) as api:
        items, pages = walk_pages(api, "/service-requests", customer=CUSTOMER, limit=1)
        assert [i["request_id"] for i in items] == [A, C] and pages == 2
        a = items[0]
        assert (a["status"], a["verdict"], a["counts"]) == (
            "completed", "fail", {"total": 2, "running": 0, "passed": 1, "failed": 1})
        r = api.get("/service-requests", params={"status": "rejected", "limit": 1000})
        assert B in [i["request_id"] for i in r.json()["items"]]
        assert all(i["status"] == "rejected" for i in r.json()["items"])
        assert api.get("/service-requests", params={"customer": "nobody " + RUN}).json() == {
            "items": [], "next_cursor": None}
        body = api.get(f"/service-requests/{A}").json()
        assert [x["status"] for x in body["executions"]] == ["passed", "failed"]
        failed = body["executions"][1]
        assert failed["reason_code"] == "qc_failed"
        assert {c["id"]: c["verdict"] for c in failed["criteria"]}["resistance_times_area"] \
            == "fail"
        crit = next(c for c in failed["criteria"] if c["id"] == "resistance_times_area")
        assert crit["value"] == pytest.approx(16.0) and crit["limit"] == [40.0]
        assert failed["entered"]["breakdowns"]["entered_by"] == "op@lab.example"
        assert [n["criteria"] for n in body["non_conformances"]] == [["resistance_times_area"]]
        assert [i["sample_id"] for i in body["inspections"]] == [f"{A}-S1", f"{A}-S2"]
        assert [(r["format"], r["url"]) for r in body["reports"]] == [
            ("pdf", f"/service-requests/{A}/report.pdf"),
            ("csv", f"/service-requests/{A}/report.csv")]
        rejected = api.get(f"/service-requests/{B}").json()
        assert rejected["status"] == "rejected" and rejected["executions"] == []
        assert rejected["rejection_reasons"] == ["unknown protocol: no protocol PVTP-999"]
        # reports: the stored bytes, 404 for a format not generated and an unknown request
        pdf = api.get(f"/service-requests/{A}/report.pdf")
        assert pdf.status_code == 200 and pdf.content == PDF_NEW
        assert pdf.headers["content-type"] == "application/pdf"
        assert f'filename="{A}.pdf"' in pdf.headers["content-disposition"]
        csv = api.get(f"/service-requests/{A}/report.csv")
        assert csv.content == CSV and csv.headers["content-type"].startswith("text/csv")
        assert api.get(f"/service-requests/{A}/report.xlsx").status_code == 404
        for path in ("/service-requests/nope-" + RUN, f"/service-requests/nope-{RUN}/report.pdf",
                     "/service-requests/a%00b"):
            r = api.get(path)
            assert r.status_code == 404 and r.json()["detail"], path
        # bad parameters
        assert api.get("/service-requests", params={"status": "done"}).status_code == 422
        assert api.get("/service-requests", params={"limit": 0}).status_code == 422
        assert api.get("/service-requests", params={"cursor": "!!"}).status_code == 422
        bad = api.get("/service-requests", params={"cursor": "WzFd"})  # [1]: not a string
        assert bad.status_code == 400 and "request_id" in bad.json()["detail"]


def test_non_conformances_and_protocols_through_the_api(seeded, cfg, query_api):
    with query_api(cfg, roles=("operator",)) as api:
        items, _ = walk_pages(api, "/non-conformances", request=A, limit=1)
        assert [(n["request_id"], n["sample_id"]) for n in items] == [(A, f"{A}-S2")]
        everything, pages = walk_pages(api, "/non-conformances", limit=1)
        assert {A, C} <= {n["request_id"] for n in everything} and pages >= 2
        assert api.get("/non-conformances", params={"cursor": "WyJ4Il0"}).status_code == 400
        assert api.get("/non-conformances", params={"request": "a\x00"}).json()["items"] == []
        listing = api.get("/protocols").json()["items"]
        catalog = shipped_catalog()
        assert [p["protocol_id"] for p in listing] == catalog.ids()
        p3 = next(p for p in listing if p["protocol_id"] == "PVTP-003")
        assert p3["versions"] == [{"version": 1, "title": "Insulation test",
                                   "sha256": catalog.get("PVTP-003", 1).sha256}]
        assert p3["standard"]["name"] == "IEC 61215-2"
        detail = api.get("/protocols/PVTP-003").json()
        assert detail["latest_version"] == 1
        assert detail["versions"][0]["template"] == catalog.get("PVTP-003").document
        assert api.get("/protocols/PVTP-999").status_code == 404


def test_students_and_researchers_read_nothing_of_the_testing_lab(seeded, cfg, query_api):
    paths = ["/service-requests", f"/service-requests/{A}", f"/service-requests/{A}/report.pdf",
             "/non-conformances", "/protocols", "/protocols/PVTP-003"]
    for roles in (("student",), ("researcher",)):
        with query_api(cfg, roles=roles) as api:
            for path in paths:
                r = api.get(path)
                assert r.status_code == 403, (roles, path, r.status_code)
                assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
