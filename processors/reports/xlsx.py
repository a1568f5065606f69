"""The Excel workbook of a service request (openpyxl, write-only mode).

Sheets:

- `Summary`: the request (customer, module, samples, overall verdict, report date), one row per
  execution (protocol, template version and hash, operator, times, verdict, failure reason),
  every criterion of every execution (value, limit, unit, verdict, message) and the
  non-conformances.
- one sheet per execution, named `<n> <protocol> <sample>` (n: its place in the request):
  the execution's facts in A:B, its inputs, analysis results and criteria, then its raw
  readings: a header row `n | <step>.<metric> (<unit>) | ...` and one row per reading index,
  one column per series (series of different lengths leave cells empty).

Numbers are written as numbers (a NaN or an infinity as its text: Excel has no such number);
openpyxl writes 16 significant digits, so a value read back is within one unit in the last
place of the float measured (Excel itself keeps 15 digits). The CSV keeps the exact floats.
Same input, same bytes: the document's created/modified properties and the zip entries' times
are the input's `generated_at` (openpyxl stamps the save time; the file is repacked).
"""

from __future__ import annotations

import io
import re
import zipfile
from datetime import UTC, datetime
from itertools import zip_longest

from openpyxl import Workbook
from openpyxl.cell import WriteOnlyCell
from openpyxl.styles import Font, PatternFill

from labbus.processors.reports.model import (
    ExecutionReport,
    ServiceRequestReport,
    iso,
    limit_parts,
    plain,
)

BOLD = Font(bold=True)
HEADER_FILL = PatternFill("solid", fgColor="E6EBF0")
VERDICT_FONTS = {"pass": Font(bold=True, color="1B7F3B"), "fail": Font(bold=True, color="B3261E")}
READINGS_HEADER = "n"  # the first cell of an execution sheet's readings header row
_BAD_SHEET_CHARS = re.compile(r"[\[\]:*?/\\]")


def _cell(ws, value, font: Font | None = None, fill: PatternFill | None = None) -> WriteOnlyCell:
    cell = WriteOnlyCell(ws, value=plain(value))
    if font is not None:
        cell.font = font
    if fill is not None:
        cell.fill = fill
    return cell


def _header(ws, *names: str) -> list[WriteOnlyCell]:
    return [_cell(ws, n, BOLD, HEADER_FILL) for n in names]


def _verdict(ws, verdict: str) -> WriteOnlyCell:
    return _cell(ws, verdict, VERDICT_FONTS.get(verdict))


def sheet_name(index: int, e: ExecutionReport) -> str:
    """`<index> <protocol> <sample>`, within Excel's 31 characters and allowed characters."""
    return _BAD_SHEET_CHARS.sub("_", f"{index} {e.protocol_id} {e.sample_id}")[:31]


def _criteria_header(ws) -> list[WriteOnlyCell]:
    return _header(ws, "criterion", "description", "clause", "value", "operator", "limit",
                   "limit high", "unit", "verdict", "message")


def _criteria_rows(ws, e: ExecutionReport, prefix: tuple = ()) -> list[list]:
    rows = []
    for c in e.criteria:
        low, high = limit_parts(c)
        rows.append([*prefix, c.id, c.description, c.clause, c.value, c.operator, low, high,
                     c.unit, _verdict(ws, c.verdict), c.message])
    return rows


def _summary(wb: Workbook, r: ServiceRequestReport) -> None:
    ws = wb.create_sheet("Summary")
    for col, width in zip("ABCDEFGHIJKLMN", (22, 16, 14, 34, 12, 12, 18, 22, 22, 12, 50, 12,
                                             12, 60), strict=True):
        ws.column_dimensions[col].width = width
    ws.append([_cell(ws, f"Test report {r.request_id}", Font(bold=True, size=14))])
    for key, value in (("Service request", r.request_id), ("Customer", r.customer),
                       ("Laboratory", r.laboratory), ("Module type", r.module_type),
                       ("Module area (m2)", r.module_area_m2),
                       ("Samples", ", ".join(s.sample_id for s in r.samples)),
                       ("Protocols", ", ".join(r.protocols)),
                       ("Submitted", iso(r.submitted_at)), ("Report date", iso(r.generated_at))):
        ws.append([_cell(ws, key, BOLD), value])
    ws.append([_cell(ws, "Overall verdict", BOLD), _verdict(ws, r.verdict)])
    ws.append([])
    ws.append(_header(ws, "execution", "sample", "protocol", "title", "template version",
                      "sheet", "operator", "started", "finished", "verdict",
                      "failure reason", "template sha256"))
    for n, e in enumerate(r.executions, 1):
        ws.append([e.execution_id, e.sample_id, e.protocol_id, e.protocol_title,
                   e.template_version, sheet_name(n, e), e.operator, iso(e.started_at),
                   iso(e.finished_at), _verdict(ws, e.verdict), e.failure_reason,
                   e.template_sha256])
    ws.append([])
    ws.append(_header(ws, "execution", "sample", "protocol") + _criteria_header(ws))
    for e in r.executions:
        for row in _criteria_rows(ws, e, (e.execution_id, e.sample_id, e.protocol_id)):
            ws.append(row)
    ws.append([])
    ws.append(_header(ws, "non-conformance", "execution", "sample", "protocol", "raised",
                      "criteria", "reason"))
    for nc in r.non_conformances:
        ws.append([nc.id, nc.execution_id, nc.sample_id, nc.protocol_id, iso(nc.raised_at),
                   ", ".join(nc.criteria), nc.reason])


def _execution(wb: Workbook, n: int, e: ExecutionReport) -> None:
    ws = wb.create_sheet(sheet_name(n, e))
    for col, width in zip("ABCDEFGHIJ", (26, 30, 24, 12, 9, 12, 12, 10, 9, 60), strict=True):
        ws.column_dimensions[col].width = width
    facts = [("Execution", e.execution_id), ("Sample", e.sample_id),
             ("Protocol", f"{e.protocol_id} {e.protocol_title}"),
             ("Template version", e.template_version), ("Template sha256", e.template_sha256),
             ("Standard", str(e.standard)), ("Operator", e.operator),
             ("Started", iso(e.started_at)), ("Finished", iso(e.finished_at))]
    for key, value in facts:
        ws.append([_cell(ws, key, BOLD), value])
    ws.append([_cell(ws, "Verdict", BOLD), _verdict(ws, e.verdict)])
    ws.append([_cell(ws, "Failure reason", BOLD), e.failure_reason])
    for step in e.steps:
        ws.append([_cell(ws, f"Step {step.step_id}", BOLD),
                   " ".join(x for x in (step.instrument_type, step.instrument_id) if x),
                   iso(step.started_at), iso(step.finished_at)])
    ws.append([])
    ws.append(_header(ws, "input", "value", "unit"))
    for name, value in e.inputs.items():
        ws.append([name, value, e.input_units.get(name, "")])
    ws.append([])
    ws.append(_header(ws, "analysis result", "value", "unit"))
    for name, value in e.results.items():
        ws.append([name, plain(value), e.result_units.get(name, "")])
    ws.append([])
    ws.append(_criteria_header(ws))
    for row in _criteria_rows(ws, e):
        ws.append(row)
    ws.append([])
    series = [(step, s) for step in e.steps for s in step.series]
    ws.append(_header(ws, READINGS_HEADER, *(
        f"{step.step_id}.{s.metric}" + (f" ({s.unit})" if s.unit else "")
        for step, s in series)))
    for k, values in enumerate(zip_longest(*(s.values for _, s in series)), 1):
        ws.append([k, *(plain(v) for v in values)])


def render_xlsx(report: ServiceRequestReport) -> bytes:
    """The workbook of a service request; the same input gives the same bytes."""
    wb = Workbook(write_only=True)
    when = report.generated_at.astimezone(UTC).replace(tzinfo=None)
    wb.properties.creator = "labbus"
    wb.properties.title = f"Test report {report.request_id}"
    wb.properties.created = when
    _summary(wb, report)
    for n, e in enumerate(report.executions, 1):
        _execution(wb, n, e)
    out = io.BytesIO()
    wb.save(out)
    return _repacked(out.getvalue(), when)


_MODIFIED = re.compile(rb"(<dcterms:modified[^>]*>)[^<]*(</dcterms:modified>)")


def _repacked(xlsx: bytes, when: datetime) -> bytes:
    """The workbook with its save time replaced by `when` (core properties, zip entry times)."""
    stamp = when.strftime("%Y-%m-%dT%H:%M:%SZ").encode()
    date_time = (max(when.year, 1980),) + tuple(when.timetuple())[1:6]
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(xlsx)) as src, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "docProps/core.xml":
                data = _MODIFIED.sub(rb"\g<1>" + stamp + rb"\g<2>", data)
            entry = zipfile.ZipInfo(info.filename, date_time)
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = info.external_attr
            dst.writestr(entry, data)
    return out.getvalue()
