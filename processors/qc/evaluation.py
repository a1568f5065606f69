"""The QC evaluation of one execution: a template, its inputs and the readings of its steps ->
analysis results, a verdict per criterion and the overall verdict. Pure: no Kafka, no clock.

Inputs out of their range (or unknown, or missing) are refused before anything runs
(`InputError`). Everything else that goes wrong is a failure with a readable reason, not an
exception: a missing reading ("missing reading current of step stc_final"), too few values, a
non-finite value, an analysis that cannot compute (a curve it cannot read, a division by zero).
Results computed from what was measured are kept; criteria that need what is missing fail with
the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from labbus.events.protocols import (
    AnalysisSpec,
    ExpressionError,
    InputError,
    ProtocolTemplate,
    resolve_inputs,
)
from labbus.processors.qc.analysis import FUNCTIONS, AnalysisUnavailable, Result
from labbus.processors.qc.criteria import FAIL, PASS, CriterionResult, judge

Readings = Mapping[str, Mapping[str, Sequence[float]]]  # step id -> metric -> values


@dataclass(frozen=True)
class Evaluation:
    template_id: str
    template_version: int
    template_sha256: str
    inputs: Mapping[str, float]
    results: Mapping[str, float]  # analysis result -> value (those that could be computed)
    units: Mapping[str, str]  # analysis result -> unit
    criteria: tuple[CriterionResult, ...]
    verdict: str  # pass or fail
    reasons: tuple[str, ...]  # why it failed: problems with the data, then failed criteria

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    def criterion(self, criterion_id: str) -> CriterionResult:
        return next(c for c in self.criteria if c.id == criterion_id)

    def to_dict(self) -> dict[str, Any]:
        return {"template_id": self.template_id, "template_version": self.template_version,
                "template_sha256": self.template_sha256, "inputs": dict(self.inputs),
                "results": {n: {"value": v, "unit": self.units[n]}
                            for n, v in self.results.items()},
                "criteria": [c.to_dict() for c in self.criteria], "verdict": self.verdict,
                "reasons": list(self.reasons)}


def missing_readings(template: ProtocolTemplate, readings: Readings) -> dict[tuple[str, str], str]:
    """(step, metric) -> why its readings are not usable, for every declared reading that is
    absent, has fewer values than the step declares, or holds a value that is not a finite
    number."""
    out = {}
    for step in template.steps:
        for spec in step.readings:
            values = readings.get(step.id, {}).get(spec.metric)
            where = f"reading {spec.metric} of step {step.id}"
            if not values:
                out[(step.id, spec.metric)] = f"missing {where}"
            elif len(values) < spec.count:
                out[(step.id, spec.metric)] = (f"missing {where}: {len(values)} of the "
                                               f"{spec.count} values expected")
            else:
                bad = next((v for v in values if not _finite(v)), None)
                if bad is not None:
                    out[(step.id, spec.metric)] = f"{where}: {bad!r} is not a finite number"
    return out


def _finite(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def evaluate(template: ProtocolTemplate, inputs: Mapping[str, Any], readings: Readings, *,
             entered: Mapping[str, Any] | None = None,
             functions: Mapping[str, Callable[..., Result]] = FUNCTIONS) -> Evaluation:
    """Analyse `readings` (step id -> metric -> values) as `template` says and judge its
    criteria. `entered`: analysis results an operator entered by hand (TestResultRecorded); an
    analysis with an entered result is not computed (its other results are then unavailable,
    and so are the criteria that need them). InputError for bad inputs or an
    entered name that is not an analysis result."""
    values = resolve_inputs(template, inputs)
    entered = _check_entered(template, entered or {})
    problems: list[str] = []
    results: dict[str, float] = {}
    units: dict[str, str] = {}
    unavailable: dict[str, str] = {}  # result -> why it is missing

    missing = missing_readings(template, readings)
    replaced = [a for a in template.analysis if set(a.outputs.values()) & set(entered)]
    needed = {(r.step, r.metric) for a in template.analysis if a not in replaced
              for r in a.series.values()}
    used = {(r.step, r.metric) for a in template.analysis for r in a.series.values()}
    # a reading only an analysis replaced by entered results uses is not missing; any other is
    problems.extend(why for key, why in missing.items() if key in needed or key not in used)

    for a in template.analysis:
        units.update(a.units)
        names = list(a.outputs.values())
        if a in replaced:
            for n in names:
                if n in entered:
                    results[n] = entered[n]
                else:
                    unavailable[n] = (f"{n} was not entered (analysis {a.name} was replaced "
                                      "by results entered by hand)")
            continue
        why = _run(a, values, results, unavailable, readings, missing, functions)
        if isinstance(why, str):
            problems.append(why)
            unavailable.update({n: why for n in names})
        else:
            results.update(why)

    env = {**values, **results}
    criteria = tuple(judge(c, env, unavailable) for c in template.criteria)
    problems = list(dict.fromkeys(problems))
    failed = [c.message for c in criteria if c.verdict == FAIL]
    if not problems and not failed and not any(c.verdict == PASS for c in criteria):
        problems.append("no criterion applied to this execution")
    verdict = PASS if not problems and not failed else FAIL
    return Evaluation(template_id=template.id, template_version=template.version,
                      template_sha256=template.sha256, inputs=values, results=results,
                      units=units, criteria=criteria, verdict=verdict,
                      reasons=tuple(problems + [m for m in failed if m not in problems]))


def _check_entered(template: ProtocolTemplate, entered: Mapping[str, Any]) -> dict[str, float]:
    names = set(template.result_names)
    problems = []
    for name, value in entered.items():
        if name not in names:
            problems.append(f"entered result {name!r} is not an analysis result of "
                            f"{template.id} (results: {', '.join(sorted(names))})")
        elif not _finite(value):
            problems.append(f"entered result {name} = {value!r} is not a number")
    if problems:
        raise InputError(template.id, problems)
    return {n: float(v) for n, v in entered.items()}


def _run(a: AnalysisSpec, inputs: Mapping[str, float], results: Mapping[str, float],
         unavailable: Mapping[str, str], readings: Readings,
         missing: Mapping[tuple[str, str], str],
         functions: Mapping[str, Callable[..., Result]]) -> dict[str, float] | str:
    """One analysis entry: its results, or why they cannot be computed."""
    label = f"analysis {a.name} ({a.function})"
    args: dict[str, Any] = {}
    for param, ref in a.series.items():
        if (ref.step, ref.metric) in missing:
            return missing[(ref.step, ref.metric)]
        args[param] = [float(v) for v in readings[ref.step][ref.metric]]
    for param, expr in a.scalars.items():
        lacking = [unavailable[n] for n in sorted(expr.names) if n in unavailable]
        if lacking:
            return lacking[0]
        try:
            args[param] = expr.evaluate({**inputs, **results})
        except ExpressionError as e:
            return f"{label}: {e}"
    try:
        out = functions[a.function](**args)
    except AnalysisUnavailable as e:
        return f"{label} unavailable: {e}"
    except (ValueError, ArithmeticError) as e:
        return f"{label}: {e}"
    computed = {}
    for key, name in a.outputs.items():
        value = out if key == "" else out.get(key) if isinstance(out, Mapping) else None
        if not _finite(value):
            return f"{label}: {key or 'result'} = {value!r} is not a finite number"
        computed[name] = float(value)  # type: ignore[arg-type]
    return computed
