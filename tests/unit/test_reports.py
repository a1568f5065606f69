"""The report generators (processors/reports) on a realistic service request: samples measured
by the simulated PV instruments (pvlib curves, the MQT 11 chamber, the insulation tester) and
judged by the QC against the shipped templates PVTP-001, PVTP-015 and PVTP-003
(tests/support/pv_reports.py). The PDF's text, extracted with pypdf, holds each verdict and each
criterion's value and limit; the workbook opens with openpyxl and holds the readings; the CSV
holds every criterion; the certificate page is there only when every protocol passed; the same
input gives the same bytes, in another process too."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import openpyxl
import pytest
from pypdf import PdfReader

from labbus.events.protocols import shipped_catalog
from labbus.processors.qc.criteria import FAIL, NOT_APPLICABLE, PASS, fmt, fmt_limit
from labbus.processors.qc.evaluation import evaluate
from labbus.processors.reports import (
    ReportInputError,
    ReportSection,
    ServiceRequestReport,
    execution_from_evaluation,
    render_criteria_csv,
    render_pdf,
    render_xlsx,
)
from labbus.processors.reports.csv_export import COLUMNS
from labbus.processors.reports.xlsx import READINGS_HEADER, sheet_name
from labbus.producers.pv import models as pv
from tests.support.pv_reports import FAILS_TC, PASSES_ALL, service_request

REPO = Path(__file__).resolve().parents[2]
VERDICT_WORDS = {PASS: "PASS", FAIL: "FAIL", NOT_APPLICABLE: "N/A"}
CERTIFICATE = "Certificate of conformity"


@pytest.fixture(scope="module")
def failing() -> ServiceRequestReport:
    return service_request((FAILS_TC,))


@pytest.fixture(scope="module")
def passing() -> ServiceRequestReport:
    return service_request((PASSES_ALL,), request_id="SR-2026-0043")


@pytest.fixture(scope="module")
def failing_pdf(failing) -> bytes:
    return render_pdf(failing)


@pytest.fixture(scope="module")
def passing_pdf(passing) -> bytes:
    return render_pdf(passing)


def words(text: str) -> str:
    """Whitespace collapsed: a table cell's wrapped text reads as one line."""
    return " ".join(text.split())


def pages(pdf: bytes) -> list[str]:
    return [words(p.extract_text()) for p in PdfReader(io.BytesIO(pdf)).pages]


def execution_parts(report: ServiceRequestReport, pdf: bytes) -> dict[str, str]:
    """execution id -> the text of its part (from its heading to the next part)."""
    text = " ".join(pages(pdf))
    heads = [f"{e.protocol_id} {e.protocol_title} \u2014 sample {e.sample_id}"
             for e in report.executions]
    starts = [text.index(h) for h in heads]
    ends = starts[1:] + [len(text)]
    return {e.execution_id: text[a:b] for e, a, b in zip(report.executions, starts, ends,
                                                          strict=True)}


# -- the verdicts themselves --------------------------------------------------------------------

def test_the_realistic_request_has_the_expected_verdicts(failing, passing):
    got = {(e.sample_id, e.protocol_id): e.verdict for e in failing.executions}
    assert got == {(FAILS_TC, "PVTP-001"): PASS, (FAILS_TC, "PVTP-015"): FAIL,
                   (FAILS_TC, "PVTP-003"): PASS}
    tc = next(e for e in failing.executions if e.protocol_id == "PVTP-015")
    assert tc.criteria[0].id == "pmax_degradation" and tc.criteria[0].value > 5
    assert "Pmax degradation after thermal cycling" in tc.failure_reason
    assert [n.execution_id for n in failing.non_conformances] == [tc.execution_id]
    assert not failing.all_passed and failing.verdict == FAIL
    assert passing.all_passed and passing.verdict == PASS
    assert all(e.passed for e in passing.executions)


# -- PDF ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["failing", "passing"])
def test_pdf_holds_each_verdict_and_each_criterions_value_and_limit(which, request):
    report = request.getfixturevalue(which)
    parts = execution_parts(report, request.getfixturevalue(f"{which}_pdf"))
    for e in report.executions:
        part = parts[e.execution_id]
        assert f"Verdict {VERDICT_WORDS[e.verdict]}" in part, e.execution_id
        assert f"version {e.template_version}, sha256 {e.template_sha256}" in part
        assert e.operator in part and e.started_at.isoformat() in part
        table = part[part.index("Criterion Clause Value Limit Verdict"):]
        for c in e.criteria:
            row = re.search(re.escape(c.id) + r" (.*?) (PASS|FAIL|N/A)", table)
            assert row, f"{e.execution_id} {c.id} not in its criteria table"
            assert row.group(2) == VERDICT_WORDS[c.verdict], (e.execution_id, c.id)
            if c.value is not None:
                unit = f" {c.unit}" if c.unit and c.unit != "1" else ""
                assert f"{fmt(c.value)}{unit}" in row.group(1), (c.id, row.group(1))
                assert fmt_limit(c.operator, c.limit, c.unit) in row.group(1), c.id


def test_pdf_cover_lists_executions_and_the_non_conformance(failing, failing_pdf):
    cover = pages(failing_pdf)[0]
    assert f"Test report {failing.request_id}" in cover and failing.customer in cover
    assert "Overall verdict FAIL" in cover
    for e in failing.executions:
        assert e.execution_id in cover
    nc = failing.non_conformances[0]
    # a long id wraps within its narrow cell: compare without the spaces of the wrapping
    assert nc.id in cover.replace(" ", "") and "Pmax degradation after thermal cycling" in cover


def test_pdf_has_the_iv_charts_and_the_before_after_comparison(failing, failing_pdf):
    reader = PdfReader(io.BytesIO(failing_pdf))
    images = sum(len(page.images) for page in reader.pages)
    # PVTP-001: 1 I-V chart; PVTP-015: I-V before/after, comparison bars, chamber readings
    assert images == 4
    tc = execution_parts(failing, failing_pdf)[failing.executions[1].execution_id]
    assert "I-V curves before and after" in tc and "Before and after" in tc
    assert re.search(r"pmax w [\d.]+ W [\d.]+ W -[\d.]+ %", tc)


def test_certificate_page_only_when_every_protocol_passed(failing_pdf, passing_pdf, passing):
    assert not any(CERTIFICATE in p for p in pages(failing_pdf))
    last = pages(passing_pdf)[-1]
    assert CERTIFICATE in last and passing.request_id in last
    for protocol in ("PVTP-001", "PVTP-015", "PVTP-003"):
        assert protocol in last
    assert sum(CERTIFICATE in p for p in pages(passing_pdf)) == 1


def test_no_certificate_when_a_requested_protocol_did_not_run_or_a_nc_was_raised(passing,
                                                                                failing):
    missing = dataclasses.replace(passing, requested_protocols=(
        "PVTP-001", "PVTP-015", "PVTP-003", "PVTP-030"))
    assert not missing.all_passed
    assert CERTIFICATE not in " ".join(pages(render_pdf(missing)))
    flagged = dataclasses.replace(passing, non_conformances=failing.non_conformances[:0] + (
        dataclasses.replace(failing.non_conformances[0], sample_id=PASSES_ALL),))
    assert not flagged.all_passed
    assert not dataclasses.replace(passing, executions=()).all_passed


def test_same_input_same_bytes_and_the_date_comes_from_the_input(failing, failing_pdf):
    assert render_pdf(failing) == failing_pdf
    assert render_xlsx(failing) == render_xlsx(failing)
    assert render_criteria_csv(failing) == render_criteria_csv(failing)
    meta = PdfReader(io.BytesIO(failing_pdf)).metadata
    assert meta.creation_date == failing.generated_at
    assert meta.modification_date == failing.generated_at
    later = dataclasses.replace(failing, generated_at=failing.generated_at + timedelta(days=1))
    assert render_pdf(later) != failing_pdf
    assert PdfReader(io.BytesIO(render_pdf(later))).metadata.creation_date == \
        later.generated_at


def test_a_regenerated_report_in_another_process_has_the_same_sha256(failing, failing_pdf):
    code = ("import hashlib, sys\n"
            "from labbus.processors.reports import render_pdf, render_xlsx\n"
            "from tests.support.pv_reports import service_request\n"
            "r = service_request((sys.argv[1],))\n"
            "print(hashlib.sha256(render_pdf(r)).hexdigest())\n"
            "print(hashlib.sha256(render_xlsx(r)).hexdigest())\n")
    out = subprocess.run([sys.executable, "-c", code, FAILS_TC], cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=120).stdout.split()
    assert out == [hashlib.sha256(failing_pdf).hexdigest(),
                   hashlib.sha256(render_xlsx(failing)).hexdigest()]


def test_an_aborted_execution_reports_its_reason_and_what_was_measured(passing):
    template = shipped_catalog().get("PVTP-015")
    module = pv.make_module(PASSES_ALL)
    sweep = pv.iv_sweep(module, points=100)
    readings = {"stc_initial": {"voltage": sweep.voltage_v.tolist(),
                                "current": sweep.current_a.tolist()}}
    evaluation = evaluate(template, {"cycles": 200, "injection_current_a": 8.6}, readings)
    e = execution_from_evaluation(template, evaluation, execution_id="EX-ABORT",
                                  sample_id=PASSES_ALL, readings=readings,
                                  operator="dave@lab.example")
    assert e.verdict == FAIL and "missing reading" in e.failure_reason
    assert [s.step_id for s in e.steps] == ["stc_initial"]
    report = dataclasses.replace(passing, executions=(e,), non_conformances=())
    text = " ".join(pages(render_pdf(report)))
    assert "missing reading module_temperature of step thermal_cycling" in text
    assert "cannot be judged" in text and "Verdict FAIL" in text
    book = openpyxl.load_workbook(io.BytesIO(render_xlsx(report)), read_only=True)
    assert book.sheetnames == ["Summary", sheet_name(1, e)]


# -- Excel --------------------------------------------------------------------------------------

def _readings_table(ws) -> tuple[list[str], list[tuple]]:
    rows = list(ws.iter_rows(values_only=True))
    start = next(k for k, r in enumerate(rows) if r and r[0] == READINGS_HEADER)
    header = [c for c in rows[start] if c is not None]
    return header, rows[start + 1:]


def test_workbook_opens_with_openpyxl_and_holds_the_readings(failing):
    book = openpyxl.load_workbook(io.BytesIO(render_xlsx(failing)), read_only=True)
    assert book.sheetnames == ["Summary"] + [sheet_name(n, e) for n, e in
                                             enumerate(failing.executions, 1)]
    for n, e in enumerate(failing.executions, 1):
        header, rows = _readings_table(book[sheet_name(n, e)])
        expected = [(step, s) for step in e.steps for s in step.series]
        assert header[1:] == [f"{step.step_id}.{s.metric}" + (f" ({s.unit})" if s.unit else "")
                              for step, s in expected]
        assert len(rows) == max(len(s.values) for _, s in expected)
        for col, (_, s) in enumerate(expected, 1):
            column = [r[col] for r in rows[:len(s.values)]]
            # openpyxl writes 16 significant digits: within one unit in the last place
            assert column == pytest.approx(list(s.values), rel=1e-15, abs=1e-300), \
                f"{e.execution_id} {header[col]}"
    tc = book[sheet_name(2, failing.executions[1])]
    header, rows = _readings_table(tc)
    assert "thermal_cycling.module_temperature (degC)" in header and len(rows) > 3000


def test_workbook_summary_holds_verdicts_and_criteria(failing):
    book = openpyxl.load_workbook(io.BytesIO(render_xlsx(failing)), read_only=True)
    rows = [r for r in book["Summary"].iter_rows(values_only=True)]
    assert ("Overall verdict", FAIL) in [r[:2] for r in rows]
    sheets = {sheet_name(n, e): e for n, e in enumerate(failing.executions, 1)}
    listed = {r[0]: r for r in rows if len(r) > 9 and r[5] in sheets}
    for e in failing.executions:
        assert listed[e.execution_id][9] == e.verdict
    criteria = [r for r in rows if r and len(r) > 11 and r[3] in
                {c.id for e in failing.executions for c in e.criteria} and r[11] in VERDICT_WORDS]
    assert len(criteria) == sum(len(e.criteria) for e in failing.executions)


# -- CSV ----------------------------------------------------------------------------------------

def test_criteria_csv_holds_every_criterion(failing):
    data = render_criteria_csv(failing)
    assert b"\r\n" in data and not data.startswith(b"\xef\xbb\xbf")
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))
    assert tuple(rows[0]) == COLUMNS
    expected = [(e, c) for e in failing.executions for c in e.criteria]
    assert len(rows) == len(expected)
    for row, (e, c) in zip(rows, expected, strict=True):
        assert (row["execution_id"], row["criterion_id"], row["verdict"]) == \
            (e.execution_id, c.id, c.verdict)
        assert row["execution_verdict"] == e.verdict
        assert row["template_sha256"] == e.template_sha256
        if c.value is None:
            assert row["value"] == ""
        else:
            assert float(row["value"]) == c.value  # round-trips exactly
        if c.operator == "between":
            assert (float(row["limit"]), float(row["limit_high"])) == c.limit
        elif c.limit is not None:
            assert float(row["limit"]) == c.limit and row["limit_high"] == ""


# -- bad input ----------------------------------------------------------------------------------

def test_inconsistent_input_is_refused_with_a_reason(failing):
    e = failing.executions[1]
    with pytest.raises(ReportInputError, match="time zone"):
        dataclasses.replace(failing, generated_at=datetime(2026, 1, 1))
    with pytest.raises(ReportInputError, match="not a sample of the request"):
        dataclasses.replace(failing, executions=(dataclasses.replace(e, sample_id="S999"),))
    with pytest.raises(ReportInputError, match="no readings here"):
        dataclasses.replace(e, sections=(ReportSection("c", "Curves", "iv_curves",
                                                       steps=("nope",)),))
    with pytest.raises(ReportInputError, match="verdict"):
        dataclasses.replace(e, verdict="maybe")
    with pytest.raises(ReportInputError, match="two executions"):
        dataclasses.replace(failing, executions=(e, e))
    other = shipped_catalog().get("PVTP-001")
    evaluation = evaluate(shipped_catalog().get("PVTP-003"), {"module_area_m2": 1.6},
                          {"dielectric_withstand": {"breakdown": [0]},
                           "insulation_resistance": {"insulation_resistance": [900.0]}})
    with pytest.raises(ReportInputError, match="not of the template"):
        execution_from_evaluation(other, evaluation, execution_id="X", sample_id="S",
                                  readings={})


def test_names_beyond_latin_1_print_and_extract(failing):
    """DejaVu Sans covers Latin, Greek and Cyrillic (not CJK: such a name would need a CJK
    font registered)."""
    name = "Łódź Słoneczna Sp. z o.o. / Солнечная энергия"
    report = dataclasses.replace(failing, customer=name,
                                 generated_at=datetime(2026, 5, 1, 12, tzinfo=UTC))
    assert name in pages(render_pdf(report))[0]
