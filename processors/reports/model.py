"""What a report is made of: `ServiceRequestReport`, the one input of every generator.

Plain frozen dataclasses, no I/O. The workflow processor fills them from the events of a service
request (ServiceRequestSubmitted, InspectionRecorded, ExecutionStarted, the readings, QcEvaluated,
ExecutionPassed/Failed, NonConformanceRaised); `execution_from_evaluation` builds one execution's
part from the QC evaluation (`labbus.processors.qc.evaluation.Evaluation`) and its template, so
the titles, units, clauses and report sections come from the template the execution ran.

`generated_at` is part of the input, not the clock's: the same input gives the same bytes (the
PDF's creation date, the workbook's properties and its zip entries' times are all taken from it),
so a regenerated report has the same sha256 and is stored once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from labbus.events.protocols import ProtocolTemplate
from labbus.processors.qc.criteria import FAIL, PASS, CriterionResult
from labbus.processors.qc.evaluation import Evaluation

VERDICTS = (PASS, FAIL)
SECTION_KINDS = ("summary", "inputs", "readings", "analysis", "criteria", "iv_curves",
                 "comparison", "text")
# the sections of an execution whose template is not at hand
DEFAULT_SECTIONS = (("summary", "Summary", "summary"), ("conditions", "Inputs", "inputs"),
                    ("results", "Analysis results", "analysis"),
                    ("verdicts", "Criteria", "criteria"))


class ReportInputError(ValueError):
    """The report's input is inconsistent (a naive timestamp, an unknown verdict, a section that
    names a step the execution has no readings of...)."""


def _aware(when: datetime | None, what: str) -> None:
    if when is not None and (when.tzinfo is None or when.utcoffset() is None):
        raise ReportInputError(f"{what} must carry a time zone, not {when.isoformat()}")


@dataclass(frozen=True)
class Standard:
    name: str
    clause: str
    edition: str = ""
    title: str = ""

    def __str__(self) -> str:
        edition = f":{self.edition}" if self.edition else ""
        return f"{self.name}{edition} {self.clause}".strip()


@dataclass(frozen=True)
class Series:
    """The values of one metric of one step, in the order measured."""

    metric: str
    unit: str
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))


@dataclass(frozen=True)
class StepReadings:
    """The raw readings of one step of an execution (e.g. the I-V sweep before cycling)."""

    step_id: str
    instrument_type: str
    series: tuple[Series, ...]
    description: str = ""
    instrument_id: str = ""  # the device that measured
    started_at: datetime | None = None
    finished_at: datetime | None = None

    def __post_init__(self) -> None:
        _aware(self.started_at, f"step {self.step_id} started_at")
        _aware(self.finished_at, f"step {self.step_id} finished_at")

    def get(self, metric: str) -> Series | None:
        return next((s for s in self.series if s.metric == metric), None)


@dataclass(frozen=True)
class ReportSection:
    """One section of an execution's part, as the template's `report.sections` declares it."""

    id: str
    title: str
    kind: str
    steps: tuple[str, ...] = ()
    results: tuple[str, ...] = ()
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind not in SECTION_KINDS:
            raise ReportInputError(f"section {self.id}: unknown kind {self.kind!r} "
                                   f"(kinds: {', '.join(SECTION_KINDS)})")


@dataclass(frozen=True)
class ExecutionReport:
    """One protocol run on one sample: who ran which template version when, what was measured,
    what the analysis gave and how each criterion was judged."""

    execution_id: str
    sample_id: str
    protocol_id: str
    protocol_title: str
    template_version: int
    template_sha256: str
    standard: Standard
    verdict: str  # pass or fail
    criteria: tuple[CriterionResult, ...]
    inputs: Mapping[str, float] = field(default_factory=dict)
    input_units: Mapping[str, str] = field(default_factory=dict)
    results: Mapping[str, float] = field(default_factory=dict)  # analysis result -> value
    result_units: Mapping[str, str] = field(default_factory=dict)
    steps: tuple[StepReadings, ...] = ()
    operator: str = ""  # the actor who started it (user or service principal)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    failure_reason: str = ""  # why it failed (data problems, failed criteria); "" if it passed
    sections: tuple[ReportSection, ...] = ()

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ReportInputError(f"execution {self.execution_id}: verdict {self.verdict!r} "
                                   f"is not one of {', '.join(VERDICTS)}")
        _aware(self.started_at, f"execution {self.execution_id} started_at")
        _aware(self.finished_at, f"execution {self.execution_id} finished_at")
        if not self.sections:
            object.__setattr__(self, "sections", tuple(
                ReportSection(i, t, k) for i, t, k in DEFAULT_SECTIONS))
        known = {s.step_id for s in self.steps}
        for section in self.sections:
            for step in section.steps:
                if step not in known:
                    raise ReportInputError(
                        f"execution {self.execution_id}: section {section.id} shows step "
                        f"{step!r}, which has no readings here (steps: "
                        f"{', '.join(sorted(known)) or 'none'})")

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    def step(self, step_id: str) -> StepReadings:
        return next(s for s in self.steps if s.step_id == step_id)


@dataclass(frozen=True)
class Sample:
    sample_id: str
    description: str = ""  # e.g. serial number, position on the pallet
    findings: tuple[str, ...] = ()  # visual inspection on receipt (InspectionRecorded)


@dataclass(frozen=True)
class NonConformance:
    id: str
    execution_id: str
    sample_id: str
    protocol_id: str
    reason: str
    raised_at: datetime | None = None
    criteria: tuple[str, ...] = ()  # ids of the criteria that failed

    def __post_init__(self) -> None:
        _aware(self.raised_at, f"non-conformance {self.id} raised_at")


@dataclass(frozen=True)
class ServiceRequestReport:
    """Everything the PDF, the workbook and the CSV show of one service request."""

    request_id: str
    customer: str
    module_type: str
    module_area_m2: float
    samples: tuple[Sample, ...]
    executions: tuple[ExecutionReport, ...]
    generated_at: datetime  # the report's date (fixed by the input: same input, same bytes)
    non_conformances: tuple[NonConformance, ...] = ()
    submitted_at: datetime | None = None
    laboratory: str = "labbus test laboratory"
    requested_protocols: tuple[str, ...] = ()  # empty: those of the executions

    def __post_init__(self) -> None:
        _aware(self.generated_at, "generated_at")
        _aware(self.submitted_at, "submitted_at")
        if not math.isfinite(self.module_area_m2) or self.module_area_m2 <= 0:
            raise ReportInputError(f"module area {self.module_area_m2} m2 is not > 0")
        ids = [e.execution_id for e in self.executions]
        if len(set(ids)) != len(ids):
            raise ReportInputError("two executions with one id")
        samples = {s.sample_id for s in self.samples}
        for e in self.executions:
            if e.sample_id not in samples:
                raise ReportInputError(f"execution {e.execution_id} ran on sample "
                                       f"{e.sample_id!r}, which is not a sample of the request")

    @property
    def protocols(self) -> tuple[str, ...]:
        return self.requested_protocols or tuple(dict.fromkeys(
            e.protocol_id for e in self.executions))

    @property
    def all_passed(self) -> bool:
        """Every requested protocol ran on every sample and passed, and no non-conformance was
        raised: the condition of the certificate."""
        if not self.executions or self.non_conformances:
            return False
        ran = {(e.sample_id, e.protocol_id) for e in self.executions}
        wanted = {(s.sample_id, p) for s in self.samples for p in self.protocols}
        return wanted <= ran and all(e.passed for e in self.executions)

    @property
    def verdict(self) -> str:
        return PASS if self.all_passed else FAIL


def sections_of(template: ProtocolTemplate) -> tuple[ReportSection, ...]:
    """The template's report sections."""
    return tuple(ReportSection(id=s["id"], title=s["title"], kind=s["kind"],
                               steps=tuple(s.get("steps", ())),
                               results=tuple(s.get("results", ())), text=s.get("text", ""))
                 for s in template.document["report"]["sections"])


def standard_of(template: ProtocolTemplate) -> Standard:
    s = template.document["standard"]
    return Standard(name=s["name"], clause=s["clause"], edition=s.get("edition", ""),
                    title=s.get("title", ""))


def execution_from_evaluation(
        template: ProtocolTemplate, evaluation: Evaluation, *, execution_id: str,
        sample_id: str, readings: Mapping[str, Mapping[str, Sequence[float]]],
        operator: str = "", started_at: datetime | None = None,
        finished_at: datetime | None = None,
        instruments: Mapping[str, str] | None = None,
        step_times: Mapping[str, tuple[datetime | None, datetime | None]] | None = None,
        failure_reason: str | None = None) -> ExecutionReport:
    """One execution's part from the template it ran, its QC evaluation and its readings (step
    id -> metric -> values, as `evaluate` took them). `instruments`: step id -> device id;
    `step_times`: step id -> (started, finished). The failure reason defaults to the
    evaluation's reasons; a step without readings (an aborted run) is left out."""
    if (evaluation.template_id, evaluation.template_sha256) != (template.id, template.sha256):
        raise ReportInputError(f"the evaluation is of {evaluation.template_id} "
                               f"({evaluation.template_sha256[:12]}), not of the template "
                               f"{template.id} ({template.sha256[:12]})")
    instruments = instruments or {}
    step_times = step_times or {}
    steps = []
    for spec in template.steps:
        measured = readings.get(spec.id) or {}
        series = tuple(Series(r.metric, r.unit, tuple(measured[r.metric]))
                       for r in spec.readings if measured.get(r.metric))
        extra = tuple(Series(m, "", tuple(v)) for m, v in sorted(measured.items())
                      if spec.reading(m) is None and v)
        if not series and not extra:
            continue
        started, finished = step_times.get(spec.id, (None, None))
        steps.append(StepReadings(
            step_id=spec.id, instrument_type=spec.instrument_type, series=series + extra,
            description=str(template.document["steps"][template.steps.index(spec)]
                            .get("description", "")),
            instrument_id=instruments.get(spec.id, ""), started_at=started,
            finished_at=finished))
    have = {s.step_id for s in steps}
    sections = tuple(
        s if set(s.steps) <= have else ReportSection(
            s.id, s.title, s.kind, tuple(x for x in s.steps if x in have), s.results, s.text)
        for s in sections_of(template))
    reason = "; ".join(evaluation.reasons) if failure_reason is None else failure_reason
    return ExecutionReport(
        execution_id=execution_id, sample_id=sample_id, protocol_id=template.id,
        protocol_title=template.title, template_version=template.version,
        template_sha256=template.sha256, standard=standard_of(template),
        verdict=evaluation.verdict, criteria=tuple(evaluation.criteria),
        inputs=dict(evaluation.inputs), input_units={i.name: i.unit for i in template.inputs},
        results=dict(evaluation.results), result_units=dict(evaluation.units),
        steps=tuple(steps), operator=operator, started_at=started_at,
        finished_at=finished_at, failure_reason=reason if evaluation.verdict == FAIL else "",
        sections=sections)


def limit_parts(c: CriterionResult) -> tuple[float | None, float | None]:
    """(limit, high limit): (x, None) for one limit, (low, high) for between."""
    if isinstance(c.limit, tuple):
        return c.limit
    return c.limit, None


def iso(when: datetime | None) -> str:
    return "" if when is None else when.isoformat(timespec="seconds")


def plain(value: Any) -> Any:
    """A number as a spreadsheet or CSV cell: NaN/inf as text, not as a float Excel refuses."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
