"""The PDF report of a service request, with ReportLab's platypus layout engine.

Why ReportLab (and not fpdf2, the other well-kept choice): platypus flows paragraphs, tables and
images over pages by itself (a long criteria or readings table splits across pages and repeats
its header row), it has an `invariant` mode for reproducible files, it is BSD-licensed (fpdf2 is
LGPL-3.0), maintained since 2000 with regular releases and C accelerators for the hot paths.
Charts are matplotlib PNGs (`charts.py`).

Layout: a cover page (request, customer, module, samples with their inspection findings, every
execution with its template version, operator, times and verdict, the non-conformances), one
part per execution in the order of its template's `report.sections` (inputs, I-V curves, the
before/after comparison, readings, analysis results, criteria with value, limit and verdict),
and a certificate page only when every requested protocol passed on every sample.

Same input, same bytes: `invariant=1` fixes the document id and the fonts' subset names, the
creation and modification dates are the input's `generated_at`, and the charts are
deterministic. The text uses DejaVu Sans (shipped with matplotlib), embedded as a subset, so a
customer's name in any script prints and pypdf extracts the text.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from xml.sax.saxutils import escape

import matplotlib
from reportlab.lib import colors
from reportlab.lib.enums import TA_CENTER
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.platypus import (
    Image,
    KeepTogether,
    PageBreak,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

from labbus.processors.qc.criteria import FAIL, NOT_APPLICABLE, PASS, fmt, fmt_limit
from labbus.processors.reports import charts
from labbus.processors.reports.model import (
    ExecutionReport,
    ReportSection,
    ServiceRequestReport,
    iso,
)

FONT, BOLD = "LabbusSans", "LabbusSans-Bold"
WIDTH = A4[0] - 36 * mm  # the frame's width (18 mm margins)
VERDICT_COLOURS = {PASS: colors.HexColor("#1b7f3b"), FAIL: colors.HexColor("#b3261e"),
                   NOT_APPLICABLE: colors.HexColor("#6b6b6b")}
VERDICT_TEXT = {PASS: "PASS", FAIL: "FAIL", NOT_APPLICABLE: "N/A"}


@functools.cache
def _fonts() -> None:
    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    pdfmetrics.registerFont(TTFont(FONT, str(ttf / "DejaVuSans.ttf")))
    pdfmetrics.registerFont(TTFont(BOLD, str(ttf / "DejaVuSans-Bold.ttf")))
    pdfmetrics.registerFontFamily(FONT, normal=FONT, bold=BOLD, italic=FONT, boldItalic=BOLD)


@functools.cache
def _styles() -> dict[str, ParagraphStyle]:
    _fonts()
    base = getSampleStyleSheet()
    body = ParagraphStyle("body", parent=base["BodyText"], fontName=FONT, fontSize=9,
                          leading=11.5)
    return {
        "body": body,
        "small": ParagraphStyle("small", parent=body, fontSize=7.5, leading=9.5),
        "cell": ParagraphStyle("cell", parent=body, fontSize=7.5, leading=9, spaceBefore=0,
                               spaceAfter=0),
        "h1": ParagraphStyle("h1", parent=base["Heading1"], fontName=BOLD, fontSize=16,
                             leading=20),
        "h2": ParagraphStyle("h2", parent=base["Heading2"], fontName=BOLD, fontSize=12.5,
                             leading=16, spaceBefore=4),
        "h3": ParagraphStyle("h3", parent=base["Heading3"], fontName=BOLD, fontSize=10,
                             leading=13, spaceBefore=8, spaceAfter=3),
        "cert": ParagraphStyle("cert", parent=base["Title"], fontName=BOLD, fontSize=20,
                               leading=26, alignment=TA_CENTER),
        "center": ParagraphStyle("center", parent=body, alignment=TA_CENTER, fontSize=10,
                                 leading=14),
    }


def _p(text: str, style: str = "body") -> Paragraph:
    return Paragraph(escape(text), _styles()[style])


def _verdict(verdict: str, style: str = "cell") -> Paragraph:
    colour = VERDICT_COLOURS.get(verdict, colors.black).hexval()[2:]
    return Paragraph(f'<font color="#{colour}"><b>{VERDICT_TEXT.get(verdict, verdict)}</b>'
                     "</font>", _styles()[style])


def _table(rows: Sequence[Sequence[object]], widths: Sequence[float],
           header: bool = True) -> Table:
    """Cells that are text become wrapping paragraphs; the header row repeats on each page."""
    cells = [[c if isinstance(c, Paragraph) else _p("" if c is None else str(c), "cell")
              for c in row] for row in rows]
    total = sum(widths)
    table = Table(cells, colWidths=[WIDTH * w / total for w in widths],
                  repeatRows=1 if header else 0, hAlign="LEFT")
    style = [("GRID", (0, 0), (-1, -1), 0.25, colors.HexColor("#9a9a9a")),
             ("VALIGN", (0, 0), (-1, -1), "TOP"),
             ("TOPPADDING", (0, 0), (-1, -1), 2), ("BOTTOMPADDING", (0, 0), (-1, -1), 2)]
    if header:
        style.append(("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e6ebf0")))
    table.setStyle(TableStyle(style))
    return table


def _key_values(rows: Sequence[tuple[str, object]]) -> Table:
    return _table([(_p(k, "cell"), v) for k, v in rows], (1, 3.2), header=False)


def _image(png: bytes, width: float = WIDTH) -> Image:
    image = Image(io.BytesIO(png))
    scale = width / image.imageWidth
    image.drawWidth, image.drawHeight = width, image.imageHeight * scale
    return image


def _when(when: datetime | None) -> str:
    """Minutes and the offset, for the tables' narrow columns."""
    if when is None:
        return "-"
    return f"{when:%Y-%m-%d %H:%M} {iso(when)[19:] or 'UTC'}"


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    u = f" {unit}" if unit and unit != "1" else ""
    return f"{fmt(value)}{u}"


# -- the parts ----------------------------------------------------------------------------------

def _cover(r: ServiceRequestReport) -> list:
    s = _styles()
    out: list = [Paragraph(f"Test report {escape(r.request_id)}", s["h1"]),
                 _p(r.laboratory, "small"), Spacer(1, 4 * mm)]
    out.append(_key_values([
        ("Service request", r.request_id), ("Customer", r.customer),
        ("Module type", r.module_type), ("Module area", f"{fmt(r.module_area_m2)} m2"),
        ("Samples", ", ".join(x.sample_id for x in r.samples)),
        ("Protocols requested", ", ".join(r.protocols)),
        ("Submitted", iso(r.submitted_at) or "-"), ("Report date", iso(r.generated_at)),
        ("Overall verdict", _verdict(r.verdict)),
    ]))
    out += [Paragraph("Executions", s["h3"]), _table(
        [("Execution", "Sample", "Protocol", "Template", "Operator", "Started", "Finished",
          "Verdict")]
        + [(e.execution_id, e.sample_id, f"{e.protocol_id} {e.protocol_title}",
            f"v{e.template_version} ({e.template_sha256[:12]})", e.operator or "-",
            _when(e.started_at), _when(e.finished_at), _verdict(e.verdict))
           for e in r.executions],
        (1.2, 0.7, 1.8, 1.3, 1.3, 1.3, 1.3, 0.8))]
    findings = [(x.sample_id, x.description or "-", "; ".join(x.findings) or "none")
                for x in r.samples]
    out += [Paragraph("Samples and inspection on receipt", s["h3"]),
            _table([("Sample", "Description", "Findings")] + findings, (1, 2, 4))]
    out.append(Paragraph("Non-conformances", s["h3"]))
    if r.non_conformances:
        out.append(_table(
            [("Id", "Execution", "Sample", "Protocol", "Raised", "Reason")]
            + [(n.id, n.execution_id, n.sample_id, n.protocol_id, _when(n.raised_at),
                n.reason) for n in r.non_conformances], (1.5, 1.3, 0.8, 0.9, 1.3, 3.0)))
    else:
        out.append(_p("None raised."))
    return out


def _execution(e: ExecutionReport) -> list:
    s = _styles()
    out: list = [PageBreak(), Paragraph(
        f"{escape(e.protocol_id)} {escape(e.protocol_title)} \u2014 sample "
        f"{escape(e.sample_id)}", s["h2"])]
    sections = list(e.sections)
    kinds = {x.kind for x in sections}
    # who ran what when, and every criterion's value, limit and verdict, whatever the template
    if "summary" not in kinds:
        sections.insert(0, ReportSection("summary", "Summary", "summary"))
    if "criteria" not in kinds:
        sections.append(ReportSection("verdicts", "Criteria", "criteria"))
    for section in sections:
        out += _SECTIONS[section.kind](e, section)
    return out


def _summary(e: ExecutionReport, section: ReportSection) -> list:
    rows: list[tuple[str, object]] = [
        ("Execution", e.execution_id), ("Sample", e.sample_id),
        ("Protocol", f"{e.protocol_id} {e.protocol_title}"),
        ("Template", f"version {e.template_version}, sha256 {e.template_sha256}"),
        ("Standard", f"{e.standard}" + (f" \u2014 {e.standard.title}"
                                         if e.standard.title else "")),
        ("Run by", e.operator or "-"), ("Started", iso(e.started_at) or "-"),
        ("Finished", iso(e.finished_at) or "-"), ("Verdict", _verdict(e.verdict))]
    if e.failure_reason:
        rows.append(("Failure reason", e.failure_reason))
    for step in e.steps:
        when = " \u2013 ".join(x for x in (iso(step.started_at), iso(step.finished_at)) if x)
        rows.append((f"Step {step.step_id}", f"{step.instrument_type}"
                     + (f" {step.instrument_id}" if step.instrument_id else "")
                     + (f", {when}" if when else "")))
    return [Paragraph(escape(section.title), _styles()["h3"]), _key_values(rows)]


def _inputs(e: ExecutionReport, section: ReportSection) -> list:
    rows = [("Input", "Value", "Unit")] + [
        (name, fmt(value), e.input_units.get(name, "")) for name, value in e.inputs.items()]
    return [Paragraph(escape(section.title), _styles()["h3"]), _table(rows, (3, 2, 1.5))]


def _max_power(step) -> float | None:
    pair = charts.iv_pair(step)
    return None if pair is None else max(v * i for v, i in zip(*pair, strict=True))


def _iv_curves(e: ExecutionReport, section: ReportSection) -> list:
    steps = [e.step(x) for x in section.steps] or [
        x for x in e.steps if charts.iv_pair(x) is not None]
    png = charts.iv_curves(steps, pmax=[_max_power(x) for x in steps])
    out: list = [Paragraph(escape(section.title), _styles()["h3"])]
    if png is None:
        return out + [_p("No I-V curve was measured.")]
    out.append(_image(png))
    out.append(_p("Solid: current; dashed: power. Pmax in the legend is the highest measured "
                  "point; the analysis's fitted values are in the tables.", "small"))
    return out


def _pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """("pmax_initial_w", "pmax_final_w", ...) -> [(before, after), ...], consecutive pairs."""
    return [(names[k], names[k + 1]) for k in range(0, len(names) - 1, 2)]


def _label(before: str, after: str) -> str:
    a, b = before.split("_"), after.split("_")
    common = [x for x in a if x in b]
    return " ".join(common) or before


def _comparison(e: ExecutionReport, section: ReportSection) -> list:
    rows: list = [("Parameter", "Before", "After", "Change")]
    labels, before, after = [], [], []
    for x, y in _pairs(section.results):
        vx, vy = e.results.get(x), e.results.get(y)
        unit = e.result_units.get(x, "")
        change = (f"{100 * (vy - vx) / vx:+.2f} %"
                  if vx not in (None, 0) and vy is not None else "-")
        rows.append((_label(x, y), _num(vx, unit), _num(vy, unit), change))
        if vx not in (None, 0) and vy is not None:
            labels.append(_label(x, y))
            before.append(vx)
            after.append(vy)
    out: list = [Paragraph(escape(section.title), _styles()["h3"]), _table(rows, (2, 2, 2, 1.4))]
    if labels:
        out += [Spacer(1, 2 * mm), _image(charts.comparison(labels, before, after), WIDTH * 0.9)]
    return out


def _readings(e: ExecutionReport, section: ReportSection) -> list:
    out: list = [Paragraph(escape(section.title), _styles()["h3"])]
    for step in [e.step(x) for x in section.steps] or list(e.steps):
        rows: list = [("Metric", "Unit", "Count", "Min", "Max", "Mean", "Last")]
        for x in step.series:
            v = x.values
            rows.append((x.metric, x.unit, len(v), fmt(min(v)), fmt(max(v)),
                         fmt(math.fsum(v) / len(v)), fmt(v[-1])) if v else
                        (x.metric, x.unit, 0, "-", "-", "-", "-"))
        out += [_p(f"Step {step.step_id} ({step.instrument_type}"
                   + (f" {step.instrument_id}" if step.instrument_id else "") + ")"),
                _table(rows, (2.2, 1, 0.9, 1.1, 1.1, 1.1, 1.1))]
        png = charts.series_chart(step)
        if png is not None:
            out += [Spacer(1, 2 * mm), _image(png, WIDTH * 0.9)]
    return out


def _analysis(e: ExecutionReport, section: ReportSection) -> list:
    names = list(section.results) or list(e.results)
    rows: list = [("Result", "Value", "Unit")]
    for name in names:
        if name in e.results:
            rows.append((name, fmt(e.results[name]), e.result_units.get(name, "")))
        elif name in e.inputs:
            rows.append((f"{name} (input)", fmt(e.inputs[name]), e.input_units.get(name, "")))
        else:
            rows.append((name, "not computed", e.result_units.get(name, "")))
    return [Paragraph(escape(section.title), _styles()["h3"]), _table(rows, (3, 2, 1.5))]


def _criteria(e: ExecutionReport, section: ReportSection) -> list:
    rows: list = [("Criterion", "Clause", "Value", "Limit", "Verdict")]
    for c in e.criteria:
        limit = "-" if c.limit is None else fmt_limit(c.operator, c.limit, c.unit)
        rows.append((Paragraph(f"<b>{escape(c.id)}</b><br/>{escape(c.description)}",
                               _styles()["cell"]), c.clause, _num(c.value, c.unit), limit,
                     _verdict(c.verdict)))
    out: list = [Paragraph(escape(section.title), _styles()["h3"]),
                 _table(rows, (3.2, 2, 1.3, 1.5, 0.8))]
    notes = [c.message for c in e.criteria if c.verdict != PASS]
    if notes:
        out += [Spacer(1, 1.5 * mm)] + [_p(n, "small") for n in notes]
    return [KeepTogether(out[:2])] + out[2:]


def _text(e: ExecutionReport, section: ReportSection) -> list:
    return [Paragraph(escape(section.title), _styles()["h3"]), _p(section.text)]


_SECTIONS = {"summary": _summary, "inputs": _inputs, "iv_curves": _iv_curves,
             "comparison": _comparison, "readings": _readings, "analysis": _analysis,
             "criteria": _criteria, "text": _text}


def _certificate(r: ServiceRequestReport) -> list:
    s = _styles()
    out: list = [PageBreak(), Spacer(1, 25 * mm),
                 Paragraph("Certificate of conformity", s["cert"]),
                 Spacer(1, 8 * mm),
                 Paragraph(f"Service request {escape(r.request_id)}", s["center"]),
                 Spacer(1, 6 * mm),
                 _p(f"{r.laboratory} certifies that the samples "
                    f"{', '.join(x.sample_id for x in r.samples)} of module type "
                    f"{r.module_type} submitted by {r.customer} were tested to the protocols "
                    "below and passed every criterion of each.", "center"),
                 Spacer(1, 6 * mm)]
    out.append(_table(
        [("Protocol", "Standard", "Template", "Samples", "Verdict")]
        + [(f"{p} {e[0].protocol_title}", str(e[0].standard),
            ", ".join(sorted({f"v{x.template_version} ({x.template_sha256[:12]})" for x in e})),
            ", ".join(x.sample_id for x in e), _verdict(PASS))
           for p in r.protocols
           for e in [[x for x in r.executions if x.protocol_id == p]]],
        (2.4, 2.4, 1.8, 1.2, 0.8)))
    out += [Spacer(1, 8 * mm), _p(f"Date of issue: {iso(r.generated_at)}", "center")]
    return out


def render_pdf(report: ServiceRequestReport) -> bytes:
    """The PDF report of a service request; the same input gives the same bytes."""
    _fonts()
    out = io.BytesIO()
    stamp = _pdf_date(report.generated_at)

    def page(canvas, doc) -> None:
        canvas.setDateFormatter(lambda *_: stamp)
        canvas.saveState()
        canvas.setFont(FONT, 7.5)
        canvas.setFillColor(colors.HexColor("#555555"))
        canvas.drawString(18 * mm, 10 * mm, f"{report.request_id} \u2014 {report.customer}")
        canvas.drawRightString(A4[0] - 18 * mm, 10 * mm, f"page {doc.page}")
        canvas.restoreState()

    doc = SimpleDocTemplate(
        out, pagesize=A4, leftMargin=18 * mm, rightMargin=18 * mm, topMargin=16 * mm,
        bottomMargin=18 * mm, title=f"Test report {report.request_id}",
        author=report.laboratory, subject=f"{report.customer}: {report.module_type}",
        creator="labbus", producer="labbus (ReportLab)", invariant=1)
    story = _cover(report)
    for e in report.executions:
        story += _execution(e)
    if report.all_passed:
        story += _certificate(report)
    doc.build(story, onFirstPage=page, onLaterPages=page)
    return out.getvalue()


def _pdf_date(when: datetime) -> str:
    """PDF date string "D:YYYYMMDDHHmmSS+hh'mm'" of an aware datetime."""
    offset = when.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset is not None else 0
    sign = "+" if minutes >= 0 else "-"
    return (f"D:{when:%Y%m%d%H%M%S}{sign}{abs(minutes) // 60:02d}'{abs(minutes) % 60:02d}'")
