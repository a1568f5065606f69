"""Pass/fail criteria: a value compared with a limit by one operator of a fixed set.

The value and the limit are expressions of the safe language (`labbus.events.protocols.
Expression`: numbers, names of inputs and analysis results, + - * /, unary minus, parentheses;
parsed with `ast` and refused at template load time if anything else is in them — never `eval`).
The operators: `<=`, `<`, `>=`, `>`, `==` and `between` (a [low, high] limit, both inclusive).
A criterion with `applies_if` is judged only when that comparison holds, otherwise it is not
applicable (MQT 03's two area rules).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from labbus.events.protocols import Comparison, CriterionSpec, ExpressionError

PASS = "pass"
FAIL = "fail"
NOT_APPLICABLE = "not_applicable"

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq,
}
_SYMBOL = {"<=": "<=", "<": "<", ">=": ">=", ">": ">", "==": "=", "between": "in"}

Limit = float | tuple[float, float]


def compare(value: float, op: str, limit: Limit) -> bool:
    """`value op limit`; for between, low <= value <= high."""
    if op == "between":
        low, high = limit  # type: ignore[misc]
        return low <= value <= high
    return _COMPARE[op](value, limit)


def fmt(value: float) -> str:
    return f"{value:.6g}"


def fmt_limit(op: str, limit: Limit, unit: str) -> str:
    u = f" {unit}" if unit and unit != "1" else ""
    if op == "between":
        low, high = limit  # type: ignore[misc]
        return f"in [{fmt(low)}, {fmt(high)}]{u}"
    return f"{_SYMBOL[op]} {fmt(limit)}{u}"  # type: ignore[arg-type]


@dataclass(frozen=True)
class CriterionResult:
    id: str
    description: str
    clause: str
    operator: str
    unit: str
    value: float | None  # None: it could not be computed (see message)
    limit: Limit | None
    verdict: str  # pass, fail or not_applicable
    message: str

    def to_dict(self) -> dict[str, Any]:
        limit = list(self.limit) if isinstance(self.limit, tuple) else self.limit
        return {"id": self.id, "description": self.description, "clause": self.clause,
                "operator": self.operator, "unit": self.unit, "value": self.value,
                "limit": limit, "verdict": self.verdict, "message": self.message}


def _limit(c: Comparison, env: Mapping[str, float]) -> Limit:
    if isinstance(c.limit, tuple):
        low, high = (e.evaluate(env) for e in c.limit)
        return (low, high)
    return c.limit.evaluate(env)


def _values(c: Comparison, env: Mapping[str, float],
            unavailable: Mapping[str, str]) -> tuple[float, Limit] | str:
    """(value, limit) of a comparison, or why they cannot be computed."""
    reasons = [unavailable[n] for n in sorted(c.names) if n in unavailable]
    if reasons:
        return "; ".join(dict.fromkeys(reasons))
    try:
        return c.value.evaluate(env), _limit(c, env)
    except ExpressionError as e:
        return str(e)


def judge(criterion: CriterionSpec, env: Mapping[str, float],
          unavailable: Mapping[str, str] | None = None) -> CriterionResult:
    """One criterion over `env` (inputs and analysis results by name). `unavailable` maps the
    names that could not be computed to why; a criterion needing one fails with that reason."""
    unavailable = unavailable or {}
    c = criterion.check

    def result(verdict: str, message: str, value: float | None = None,
               limit: Limit | None = None) -> CriterionResult:
        return CriterionResult(id=criterion.id, description=criterion.description,
                               clause=criterion.clause, operator=c.operator,
                               unit=criterion.unit, value=value, limit=limit, verdict=verdict,
                               message=f"{criterion.description}: {message}")

    if criterion.applies_if is not None:
        a = criterion.applies_if
        got = _values(a, env, unavailable)
        if isinstance(got, str):
            return result(FAIL, f"cannot tell whether it applies: {got}")
        subject, bound = got
        if not compare(subject, a.operator, bound):
            return result(NOT_APPLICABLE, f"not applicable ({a.value.text} = {fmt(subject)}, "
                                          f"applies when {fmt_limit(a.operator, bound, '')})")
    got = _values(c, env, unavailable)
    if isinstance(got, str):
        return result(FAIL, f"cannot be judged: {got}")
    value, limit = got
    verdict = PASS if compare(value, c.operator, limit) else FAIL
    u = f" {criterion.unit}" if criterion.unit and criterion.unit != "1" else ""
    return result(verdict, f"{fmt(value)}{u}, limit {fmt_limit(c.operator, limit, criterion.unit)}"
                           f": {verdict}", value, limit)
