"""Protocol templates as data: loading, validation, versions, and the safe expression language.

A template (`schemas/protocols/<id>.json`, or `<id>.v<version>.json` when several versions of
one protocol are kept) declares a test protocol: the standard it follows, its inputs with unit
and range, the instrument steps and the readings each must deliver, the analysis of those
readings, the pass/fail criteria and the report sections. It is checked in two passes, both when
it is loaded, so a bad template never reaches an execution:

1. the JSON Schema `schemas/protocols/protocol-template.schema.json` (strict: an unknown key, a
   missing field or an operator outside the fixed set fails);
2. the meaning: unique names, every expression parses in the safe language and names only what
   it may (inputs; analysis results computed before it), every reading an analysis uses is one a
   step declares, every `${...}` of a payload names inputs, ranges hold their defaults.

Every error is a `TemplateError` naming the file and the JSON path (`$.criteria[1].limit`).

Versions: a template's `version` is explicit; its content hash is the sha256 of its canonical
JSON (keys sorted, no whitespace, integral numbers written as integers). A `Catalog` refuses two
different contents under one (id, version): a changed template is a new version, and executions
record the version and hash they ran.

The expression language (`Expression`): Python syntax parsed with `ast`, of which only numbers,
names, `+ - * /`, unary minus/plus and parentheses are accepted; evaluated by walking that tree
with float arithmetic. Never `eval`. It lives in the kernel, beside the loader, because the
loader must refuse a bad expression at load time and the processors, API and gateway all read
templates; `labbus.processors.qc` evaluates criteria and analyses with it.
"""

from __future__ import annotations

import ast
import copy
import functools
import hashlib
import json
import math
import operator
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labbus.events.codec import SCHEMAS_DIR

PROTOCOLS_DIR = SCHEMAS_DIR / "protocols"
SCHEMA_PATH = PROTOCOLS_DIR / "protocol-template.schema.json"

OPERATORS = ("<=", "<", ">=", ">", "==", "between")
MAX_EXPRESSION_CHARS = 500


class TemplateError(ValueError):
    """A template is invalid; the message names the file and the JSON path."""


class InputError(ValueError):
    """Inputs given for an execution break the template's declaration (unknown, missing, not a
    number, out of range); `problems` lists each."""

    def __init__(self, template_id: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{template_id}: " + "; ".join(problems))


class ExpressionError(ValueError):
    """An expression could not be parsed (not in the safe language) or evaluated."""


class UnknownProtocol(LookupError):
    """No template with that id (and version) in the catalog."""


# -- the safe expression language ---------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_REFUSED = {  # the constructs people try, named in the error
    ast.Call: "function calls are not allowed",
    ast.Attribute: "attribute access is not allowed",
    ast.Subscript: "subscripts are not allowed",
    ast.Compare: "comparisons are not allowed here (use the criterion's operator)",
    ast.BoolOp: "and/or are not allowed",
    ast.IfExp: "conditional expressions are not allowed",
    ast.Lambda: "lambda is not allowed",
    ast.NamedExpr: "assignment is not allowed",
}


@dataclass(frozen=True)
class Expression:
    """A parsed expression of the safe language: `Expression.parse("40 / module_area_m2")`."""

    text: str
    names: frozenset[str]
    _tree: ast.expr = field(repr=False, compare=False)

    @classmethod
    def parse(cls, source: str | int | float) -> Expression:
        if isinstance(source, bool) or not isinstance(source, (str, int, float)):
            raise ExpressionError(f"expected a number or an expression, got {source!r}")
        if not isinstance(source, str):
            if not math.isfinite(source):
                raise ExpressionError(f"{source!r} is not a finite number")
            return cls(repr(source), frozenset(), ast.Constant(float(source)))
        text = source.strip()
        if not text:
            raise ExpressionError("empty expression")
        if len(text) > MAX_EXPRESSION_CHARS:
            raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
        try:
            tree = ast.parse(text, mode="eval").body
        except (SyntaxError, ValueError, RecursionError) as e:
            detail = e.msg if isinstance(e, SyntaxError) else str(e)
            raise ExpressionError(f"expression {text!r} does not parse: {detail}") from None
        names: set[str] = set()
        _check(tree, text, names)
        return cls(text, frozenset(names), tree)

    def evaluate(self, env: Mapping[str, float]) -> float:
        """The value over `env` (name -> number); ExpressionError for an unknown name, a
        division by zero or a result that is not a finite number."""
        try:
            value = _eval(self._tree, env)
        except ZeroDivisionError:
            raise ExpressionError(f"{self.text}: division by zero") from None
        except OverflowError:
            raise ExpressionError(f"{self.text}: number too large") from None
        except KeyError as e:
            raise ExpressionError(f"{self.text}: {e.args[0]} has no value") from None
        if not math.isfinite(value):
            raise ExpressionError(f"{self.text}: result {value} is not a finite number")
        return value

    def __str__(self) -> str:
        return self.text


def _check(node: ast.AST, text: str, names: set[str]) -> None:
    if isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            raise ExpressionError(f"expression {text!r}: operator "
                                  f"{_op_symbol(node.op)} is not allowed (only + - * /)")
        _check(node.left, text, names)
        _check(node.right, text, names)
    elif isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY:
            raise ExpressionError(f"expression {text!r}: unary {_op_symbol(node.op)} is not "
                                  "allowed (only - and +)")
        _check(node.operand, text, names)
    elif isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ExpressionError(f"expression {text!r}: only numbers are allowed as "
                                  f"constants, not {node.value!r}")
    elif isinstance(node, ast.Name):
        if node.id.startswith("_"):
            raise ExpressionError(f"expression {text!r}: name {node.id!r} is not allowed")
        names.add(node.id)
    else:
        reason = next((r for t, r in _REFUSED.items() if isinstance(node, t)),
                      f"{type(node).__name__} is not allowed")
        raise ExpressionError(f"expression {text!r}: {reason}")


def _op_symbol(op: ast.AST) -> str:
    return {ast.Pow: "**", ast.Mod: "%", ast.FloorDiv: "//", ast.MatMult: "@",
            ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.LShift: "<<",
            ast.RShift: ">>", ast.Invert: "~", ast.Not: "not"}.get(type(op), type(op).__name__)


def _eval(node: ast.expr, env: Mapping[str, float]) -> float:
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_eval(node.left, env), _eval(node.right, env))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_eval(node.operand, env))
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(env[node.id])
    raise AssertionError(f"unchecked node {type(node).__name__}")  # _check refused it


# -- analysis functions: their signatures (implementations: labbus.processors.qc.analysis) -------

@dataclass(frozen=True)
class FunctionSignature:
    series: tuple[str, ...] = ()  # parameters taking a reading series ("step.metric")
    scalars: tuple[str, ...] = ()  # parameters taking an expression (a number)
    outputs: Mapping[str, str] | None = None  # output key -> unit; None: one number


IV_OUTPUTS = {"pmax_w": "W", "vmp_v": "V", "imp_a": "A", "voc_v": "V", "isc_a": "A", "ff": "1"}

ANALYSIS_FUNCTIONS: dict[str, FunctionSignature] = {
    "min": FunctionSignature(series=("values",)),
    "max": FunctionSignature(series=("values",)),
    "mean": FunctionSignature(series=("values",)),
    "last": FunctionSignature(series=("values",)),
    # (new - reference) / reference, a fraction: -0.049 is a 4.9 % loss
    "relative_change": FunctionSignature(scalars=("new", "reference")),
    "iv_parameters": FunctionSignature(series=("voltage_v", "current_a"), outputs=IV_OUTPUTS),
}


# -- the parsed template ------------------------------------------------------------------------

@dataclass(frozen=True)
class InputSpec:
    name: str
    unit: str
    description: str
    default: float | None = None
    min: float | None = None
    max: float | None = None
    integer: bool = False


@dataclass(frozen=True)
class ReadingSpec:
    metric: str
    unit: str
    count: int


@dataclass(frozen=True)
class StepSpec:
    id: str
    instrument_type: str
    command: str
    payload: Mapping[str, Any]
    readings: tuple[ReadingSpec, ...]
    timeout_s: Expression
    duration_s: Expression | None = None

    def reading(self, metric: str) -> ReadingSpec | None:
        return next((r for r in self.readings if r.metric == metric), None)


@dataclass(frozen=True)
class SeriesRef:
    step: str
    metric: str

    def __str__(self) -> str:
        return f"{self.step}.{self.metric}"


@dataclass(frozen=True)
class AnalysisSpec:
    name: str
    function: str
    series: Mapping[str, SeriesRef]  # parameter -> readings
    scalars: Mapping[str, Expression]  # parameter -> expression
    outputs: Mapping[str, str]  # function output key (or "" for one number) -> result name
    units: Mapping[str, str]  # result name -> unit


@dataclass(frozen=True)
class Comparison:
    value: Expression
    operator: str
    limit: Expression | tuple[Expression, Expression]

    @property
    def names(self) -> frozenset[str]:
        limits = self.limit if isinstance(self.limit, tuple) else (self.limit,)
        return self.value.names.union(*(e.names for e in limits))


@dataclass(frozen=True)
class CriterionSpec:
    id: str
    description: str
    check: Comparison
    unit: str
    clause: str
    applies_if: Comparison | None = None


@dataclass(frozen=True, eq=False)  # one template, one object: compare ids/versions/hashes
class ProtocolTemplate:
    id: str
    version: int
    title: str
    sha256: str
    document: Mapping[str, Any] = field(repr=False)  # the template as written (for the API)
    source: str = field(repr=False)
    inputs: tuple[InputSpec, ...] = field(repr=False)
    steps: tuple[StepSpec, ...] = field(repr=False)
    analysis: tuple[AnalysisSpec, ...] = field(repr=False)
    criteria: tuple[CriterionSpec, ...] = field(repr=False)

    def step(self, step_id: str) -> StepSpec:
        return next(s for s in self.steps if s.id == step_id)

    @property
    def result_names(self) -> list[str]:
        return [name for a in self.analysis for name in a.outputs.values()]


# -- canonical form and hash --------------------------------------------------------------------

def _normalised(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    return value


def canonical_json(document: Mapping[str, Any]) -> bytes:
    """Keys sorted, no whitespace, UTF-8, integral numbers as integers: two texts of the same
    template (re-indented, keys reordered, 40 written 40.0) give the same bytes."""
    return json.dumps(_normalised(document), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def content_hash(document: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(document)).hexdigest()


# -- loading ------------------------------------------------------------------------------------

@functools.cache
def _validator() -> Any:
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def json_path(parts: Sequence[str | int]) -> str:
    """("criteria", 0, "limit") -> "$.criteria[0].limit"."""
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def load_template(path: Path | str) -> ProtocolTemplate:
    """A template file, validated; TemplateError names the file and the JSON path."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TemplateError(f"{path.name}: not JSON (line {e.lineno} column {e.colno}: "
                            f"{e.msg})") from None
    template = parse_template(document, source=path.name)
    stem = path.name.removesuffix(".json")
    if stem not in (template.id, f"{template.id}.v{template.version}"):
        raise TemplateError(f"{path.name}: $.id: template {template.id} version "
                            f"{template.version} belongs in {template.id}.json or "
                            f"{template.id}.v{template.version}.json")
    return template


def parse_template(document: Any, source: str = "<template>") -> ProtocolTemplate:
    """A template document (parsed JSON), validated against the schema and for meaning."""
    import jsonschema

    errors = list(_validator().iter_errors(document))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise TemplateError(f"{source}: {json_path(list(best.absolute_path))}: "
                            f"{best.message}{more}")
    return _Reader(copy.deepcopy(document), source).template()  # later edits do not leak in


class _Reader:
    """The meaning pass over a schema-valid document."""

    def __init__(self, doc: Mapping[str, Any], source: str) -> None:
        self.doc = doc
        self.source = source

    def fail(self, path: Sequence[str | int], message: str) -> TemplateError:
        return TemplateError(f"{self.source}: {json_path(path)}: {message}")

    def expression(self, path: Sequence[str | int], source: Any, allowed: Mapping[str, str],
                   what: str) -> Expression:
        """Parse `source`; every name must be in `allowed` (name -> what it is)."""
        try:
            expr = Expression.parse(source)
        except ExpressionError as e:
            raise self.fail(path, str(e)) from None
        unknown = sorted(expr.names - set(allowed))
        if unknown:
            raise self.fail(path, f"{unknown[0]!r} is not {what} "
                                  f"(known: {', '.join(sorted(allowed)) or 'none'})")
        return expr

    def unique(self, items: Sequence[Mapping[str, Any]], key: str, where: str,
               taken: Mapping[str, str] | None = None) -> None:
        seen: dict[str, str] = dict(taken or {})
        for i, item in enumerate(items):
            name = item[key]
            if name in seen:
                raise self.fail([where, i, key], f"{name!r} is already {seen[name]}")
            seen[name] = f"{where}[{i}]"

    def template(self) -> ProtocolTemplate:
        doc = self.doc
        inputs = self.inputs()
        input_names = {i.name: "an input" for i in inputs}
        steps = self.steps(input_names)
        analysis = self.analysis(input_names, steps)
        results = {name: "an analysis result" for a in analysis for name in a.outputs.values()}
        criteria = self.criteria({**input_names, **results})
        self.unique(doc["criteria"], "id", "criteria")
        self.report(steps, {**input_names, **results})
        return ProtocolTemplate(
            id=doc["id"], version=doc["version"], title=doc["title"],
            sha256=content_hash(doc), document=doc, source=self.source, inputs=inputs,
            steps=steps, analysis=analysis, criteria=criteria)

    def inputs(self) -> tuple[InputSpec, ...]:
        items = self.doc["inputs"]
        self.unique(items, "name", "inputs")
        out = []
        for i, item in enumerate(items):
            spec = InputSpec(name=item["name"], unit=item["unit"],
                             description=item["description"], default=item.get("default"),
                             min=item.get("min"), max=item.get("max"),
                             integer=item.get("integer", False))
            if spec.min is not None and spec.max is not None and spec.min > spec.max:
                raise self.fail(["inputs", i, "min"], f"min {spec.min} > max {spec.max}")
            if spec.default is not None:
                problem = _range_problem(spec, spec.default)
                if problem:
                    raise self.fail(["inputs", i, "default"], problem)
            out.append(spec)
        return tuple(out)

    def steps(self, inputs: Mapping[str, str]) -> tuple[StepSpec, ...]:
        items = self.doc["steps"]
        self.unique(items, "id", "steps")
        out = []
        for i, item in enumerate(items):
            path = ["steps", i]
            self.unique(item["readings"], "metric", f"steps[{i}].readings")
            self.payload_expressions([*path, "payload"], item["payload"], inputs)
            timeout = self.expression([*path, "timeout_s"], item["timeout_s"], inputs,
                                      "an input")
            duration = (self.expression([*path, "duration_s"], item["duration_s"], inputs,
                                        "an input") if "duration_s" in item else None)
            out.append(StepSpec(
                id=item["id"], instrument_type=item["instrument_type"],
                command=item["command"], payload=item["payload"],
                readings=tuple(ReadingSpec(r["metric"], r["unit"], r["count"])
                               for r in item["readings"]),
                timeout_s=timeout, duration_s=duration))
        return tuple(out)

    def payload_expressions(self, path: list[str | int], value: Any,
                            inputs: Mapping[str, str]) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                self.payload_expressions([*path, k], v, inputs)
        elif isinstance(value, list):
            for j, v in enumerate(value):
                self.payload_expressions([*path, j], v, inputs)
        elif isinstance(value, str):
            rest = _PLACEHOLDER.sub("", value)
            if "${" in rest:
                raise self.fail(path, f"unclosed ${{...}} in {value!r}")
            for match in _PLACEHOLDER.finditer(value):
                self.expression(path, match.group(1), inputs, "an input")

    def analysis(self, inputs: Mapping[str, str],
                 steps: Sequence[StepSpec]) -> tuple[AnalysisSpec, ...]:
        items = self.doc["analysis"]
        known = dict(inputs)  # grows with each entry's results: later entries may use them
        labels: dict[str, str] = {}
        out = []
        for i, item in enumerate(items):
            path: list[str | int] = ["analysis", i]
            sig = ANALYSIS_FUNCTIONS[item["function"]]
            if item["name"] in labels or item["name"] in inputs:
                raise self.fail([*path, "name"], f"{item['name']!r} is already used")
            labels[item["name"]] = f"analysis[{i}]"
            args = item["args"]
            expected = set(sig.series) | set(sig.scalars)
            for name in sorted(set(args) - expected):
                raise self.fail([*path, "args", name], f"{item['function']} has no parameter "
                                f"{name!r} (it takes {', '.join(sorted(expected))})")
            for name in sorted(expected - set(args)):
                raise self.fail([*path, "args"], f"{item['function']} needs {name!r}")
            series = {p: self.series_ref([*path, "args", p], args[p], steps)
                      for p in sig.series}
            scalars = {p: self.expression([*path, "args", p], args[p], known,
                                          "an input or an earlier analysis result")
                       for p in sig.scalars}
            outputs, units = self.outputs(path, item, sig)
            for result in outputs.values():
                if result in known:
                    raise self.fail(path, f"result {result!r} is already {known[result]}")
                known[result] = "an analysis result"
            out.append(AnalysisSpec(name=item["name"], function=item["function"],
                                    series=series, scalars=scalars, outputs=outputs,
                                    units=units))
        return tuple(out)

    def series_ref(self, path: list[str | int], ref: Any,
                   steps: Sequence[StepSpec]) -> SeriesRef:
        if not isinstance(ref, str) or not _SERIES.match(ref):
            raise self.fail(path, f"expected a reading as \"step.metric\", got {ref!r}")
        step_id, metric = ref.split(".")
        step = next((s for s in steps if s.id == step_id), None)
        if step is None:
            raise self.fail(path, f"no step {step_id!r} "
                                  f"(steps: {', '.join(s.id for s in steps)})")
        if step.reading(metric) is None:
            raise self.fail(path, f"step {step_id!r} declares no reading {metric!r} "
                                  f"(it has: {', '.join(r.metric for r in step.readings)})")
        return SeriesRef(step_id, metric)

    def outputs(self, path: list[str | int], item: Mapping[str, Any],
                sig: FunctionSignature) -> tuple[dict[str, str], dict[str, str]]:
        if sig.outputs is None:
            if "outputs" in item:
                raise self.fail([*path, "outputs"], f"{item['function']} gives one number, "
                                "named by the entry's name: no outputs")
            if "unit" not in item:
                raise self.fail(path, f"{item['function']} needs the result's unit")
            return {"": item["name"]}, {item["name"]: item["unit"]}
        if "unit" in item:
            raise self.fail([*path, "unit"], f"{item['function']}'s outputs have their own "
                                             "units: no unit")
        outputs = item.get("outputs")
        if not outputs:
            raise self.fail(path, f"{item['function']} needs outputs (some of: "
                                  f"{', '.join(sig.outputs)})")
        for key in outputs:
            if key not in sig.outputs:
                raise self.fail([*path, "outputs", key], f"{item['function']} has no output "
                                f"{key!r} (it has: {', '.join(sig.outputs)})")
        if len(set(outputs.values())) != len(outputs):
            raise self.fail([*path, "outputs"], "two outputs with one result name")
        return dict(outputs), {name: sig.outputs[key] for key, name in outputs.items()}

    def comparison(self, path: list[str | int], item: Mapping[str, Any],
                   known: Mapping[str, str]) -> Comparison:
        what = "an input or an analysis result"
        value = self.expression([*path, "value"], item["value"], known, what)
        limit: Expression | tuple[Expression, Expression]
        if item["operator"] == "between":
            low, high = (self.expression([*path, "limit", j], item["limit"][j], known, what)
                         for j in (0, 1))
            if not low.names and not high.names and low.evaluate({}) > high.evaluate({}):
                raise self.fail([*path, "limit"], f"low {low} > high {high}")
            limit = (low, high)
        else:
            limit = self.expression([*path, "limit"], item["limit"], known, what)
        return Comparison(value, item["operator"], limit)

    def criteria(self, known: Mapping[str, str]) -> tuple[CriterionSpec, ...]:
        out = []
        for i, item in enumerate(self.doc["criteria"]):
            path: list[str | int] = ["criteria", i]
            applies = (self.comparison([*path, "applies_if"], item["applies_if"], known)
                       if "applies_if" in item else None)
            out.append(CriterionSpec(id=item["id"], description=item["description"],
                                     check=self.comparison(path, item, known),
                                     unit=item["unit"], clause=item["clause"],
                                     applies_if=applies))
        return tuple(out)

    def report(self, steps: Sequence[StepSpec], known: Mapping[str, str]) -> None:
        sections = self.doc["report"]["sections"]
        self.unique(sections, "id", "report.sections")
        step_ids = {s.id for s in steps}
        for i, section in enumerate(sections):
            for j, step in enumerate(section.get("steps", ())):
                if step not in step_ids:
                    raise self.fail(["report", "sections", i, "steps", j], f"no step {step!r}")
            for j, name in enumerate(section.get("results", ())):
                if name not in known:
                    raise self.fail(["report", "sections", i, "results", j],
                                    f"{name!r} is not an input or an analysis result")


_PLACEHOLDER = re.compile(r"\$\{([^{}]*)\}")
_SERIES = re.compile(r"^[a-z][a-z0-9_]*\.[A-Za-z][A-Za-z0-9_]*$")


# -- inputs and payloads of an execution --------------------------------------------------------

def _range_problem(spec: InputSpec, value: float) -> str | None:
    if spec.integer and not float(value).is_integer():
        return f"input {spec.name} = {value:g} must be a whole number"
    low = -math.inf if spec.min is None else spec.min
    high = math.inf if spec.max is None else spec.max
    if not low <= value <= high:
        return (f"input {spec.name} = {value:g} {spec.unit} is out of its range "
                f"[{_num(spec.min)}, {_num(spec.max)}] {spec.unit}")
    return None


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def resolve_inputs(template: ProtocolTemplate, given: Mapping[str, Any]) -> dict[str, float]:
    """The execution's inputs: given values, else defaults; InputError lists every input that is
    unknown, missing, not a number or out of its range (refused before anything runs)."""
    problems = []
    declared = {spec.name for spec in template.inputs}
    for name in given:
        if name not in declared:
            problems.append(f"unknown input {name!r} (declared: "
                            f"{', '.join(sorted(declared)) or 'none'})")
    values: dict[str, float] = {}
    for spec in template.inputs:
        raw = given.get(spec.name, spec.default)
        if raw is None:
            problems.append(f"input {spec.name} ({spec.unit}) is required: it has no default")
            continue
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) \
                or not math.isfinite(raw):
            problems.append(f"input {spec.name} = {raw!r} is not a number")
            continue
        problem = _range_problem(spec, raw)
        if problem:
            problems.append(problem)
            continue
        values[spec.name] = float(raw)
    if problems:
        raise InputError(template.id, problems)
    return values


def render_payload(step: StepSpec, inputs: Mapping[str, float]) -> dict[str, Any]:
    """The step's command payload for resolved inputs: a string that is one "${expr}" becomes
    the number (an int when whole), "${expr}" within a longer string its text."""
    def render(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: render(v) for k, v in value.items()}
        if isinstance(value, list):
            return [render(v) for v in value]
        if not isinstance(value, str):
            return value
        whole = _PLACEHOLDER.fullmatch(value)
        if whole:
            return _plain(Expression.parse(whole.group(1)).evaluate(inputs))
        return _PLACEHOLDER.sub(
            lambda m: f"{_plain(Expression.parse(m.group(1)).evaluate(inputs))}", value)

    return render(dict(step.payload))


def _plain(value: float) -> int | float:
    return int(value) if value.is_integer() and abs(value) < 2 ** 53 else value


# -- the catalog --------------------------------------------------------------------------------

class Catalog:
    """Templates by (id, version). Adding a second, different content under one (id, version)
    is refused: a changed template is a new version. The same content again is a no-op."""

    def __init__(self, templates: Sequence[ProtocolTemplate] = ()) -> None:
        self._templates: dict[tuple[str, int], ProtocolTemplate] = {}
        for t in templates:
            self.add(t)

    @classmethod
    def from_dir(cls, folder: Path | str = PROTOCOLS_DIR) -> Catalog:
        """Every `*.json` of `folder` but JSON Schemas (`*.schema.json`)."""
        paths = sorted(p for p in Path(folder).glob("*.json")
                       if not p.name.endswith(".schema.json"))
        return cls([load_template(p) for p in paths])

    def add(self, template: ProtocolTemplate) -> ProtocolTemplate:
        key = (template.id, template.version)
        known = self._templates.get(key)
        if known is None:
            self._templates[key] = template
            return template
        if known.sha256 != template.sha256:
            raise TemplateError(
                f"{template.source}: $.version: {template.id} version {template.version} is "
                f"already {known.source} with other content (sha256 {known.sha256[:12]}… vs "
                f"{template.sha256[:12]}…): a changed template is a new version")
        return known

    def get(self, template_id: str, version: int | None = None) -> ProtocolTemplate:
        """That version, or the latest when version is None."""
        if version is None:
            return self.latest(template_id)
        try:
            return self._templates[(template_id, version)]
        except KeyError:
            have = self.versions(template_id)
            raise UnknownProtocol(
                f"no protocol {template_id} version {version}"
                + (f" (versions: {', '.join(map(str, have))})" if have else "")) from None

    def latest(self, template_id: str) -> ProtocolTemplate:
        versions = self.versions(template_id)
        if not versions:
            raise UnknownProtocol(f"no protocol {template_id} (known: "
                                  f"{', '.join(self.ids()) or 'none'})")
        return self._templates[(template_id, versions[-1])]

    def versions(self, template_id: str) -> list[int]:
        return sorted(v for (i, v) in self._templates if i == template_id)

    def ids(self) -> list[str]:
        return sorted({i for (i, _) in self._templates})

    def __iter__(self) -> Iterator[ProtocolTemplate]:
        return iter(sorted(self._templates.values(), key=lambda t: (t.id, t.version)))

    def __len__(self) -> int:
        return len(self._templates)


@functools.cache
def shipped_catalog() -> Catalog:
    """The templates labbus ships (schemas/protocols), loaded once."""
    return Catalog.from_dir(PROTOCOLS_DIR)


# -- service requests ---------------------------------------------------------------------------

AREA_INPUT = "module_area_m2"


class RequestError(ValueError):
    """A service request that cannot run: unknown protocols, bad inputs, no samples; `problems`
    lists each readable reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def resolve_request(catalog: Catalog, sample_ids: Sequence[str],
                    protocols: Sequence[Mapping[str, Any]], module_area_m2: float
                    ) -> list[tuple[ProtocolTemplate, dict[str, float]]]:
    """The template and resolved inputs of each requested protocol ({"protocol_id", "version"
    (None: the latest), "inputs"}); a protocol with a `module_area_m2` input not given gets the
    request's module area. RequestError lists every problem (what the command gateway answers
    400 with, and what the testing processor rejects a request with)."""
    problems: list[str] = []
    if not sample_ids:
        problems.append("no sample ids")
    if len(set(sample_ids)) != len(sample_ids):
        problems.append("sample ids repeat")
    if not protocols:
        problems.append("no protocols requested")
    if not (isinstance(module_area_m2, (int, float)) and math.isfinite(module_area_m2)
            and module_area_m2 > 0):
        problems.append(f"module area {module_area_m2!r} m2 is not a number > 0")
    out = []
    seen: set[tuple[str, int]] = set()
    for p in protocols:
        pid, version = p.get("protocol_id"), p.get("version")
        try:
            template = catalog.get(str(pid), version)
        except UnknownProtocol as e:
            problems.append(f"unknown protocol: {e}")
            continue
        if (template.id, template.version) in seen:
            problems.append(f"{template.id} version {template.version} is requested twice")
            continue
        seen.add((template.id, template.version))
        given = dict(p.get("inputs") or {})
        if AREA_INPUT not in given and any(i.name == AREA_INPUT for i in template.inputs):
            given[AREA_INPUT] = module_area_m2
        try:
            out.append((template, resolve_inputs(template, given)))
        except InputError as e:
            problems.extend(f"{template.id}: {problem}" for problem in e.problems)
    if problems:
        raise RequestError(problems)
    return out
