"""Protocol templates (events/protocols.py): the shipped ones validate, an invalid one fails at
load time with a readable error naming the file and the JSON path, expressions are parsed and
never executed, versions and content hashes, the catalog, inputs and payloads."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from labbus.events import protocols
from labbus.events.protocols import (
    ANALYSIS_FUNCTIONS,
    PROTOCOLS_DIR,
    SCHEMA_PATH,
    Catalog,
    Expression,
    ExpressionError,
    InputError,
    TemplateError,
    UnknownProtocol,
    content_hash,
    load_template,
    parse_template,
    render_payload,
    resolve_inputs,
    shipped_catalog,
)
from labbus.processors.qc.analysis import FUNCTIONS

SHIPPED = ["PVTP-001", "PVTP-003", "PVTP-010", "PVTP-015", "PVTP-030"]


def document(template_id: str = "PVTP-003") -> dict:
    return json.loads((PROTOCOLS_DIR / f"{template_id}.json").read_text(encoding="utf-8"))


def write(folder: Path, doc: dict, name: str | None = None) -> Path:
    path = folder / (name or f"{doc['id']}.json")
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return path


# -- the shipped templates ----------------------------------------------------------------------

def test_the_schema_is_a_valid_draft_2020_12_schema():
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_every_shipped_template_validates_and_cites_its_clause():
    catalog = Catalog.from_dir(PROTOCOLS_DIR)
    assert catalog.ids() == SHIPPED
    for template in catalog:
        doc = template.document
        assert doc["standard"]["clause"] and doc["notes"], template.id
        assert all(c["clause"] for c in doc["criteria"]), template.id
        assert template.version == 1
        assert template.sha256 == content_hash(doc) and len(template.sha256) == 64


def test_shipped_numbers_are_the_ones_the_standards_state():
    """The figures the issue names, read back from the templates as data."""
    catalog = shipped_catalog()
    stc = catalog.get("PVTP-001").steps[0].payload
    assert (stc["irradiance_w_m2"], stc["cell_temperature_c"], stc["spectrum"]) == \
        (1000, 25, "AM1.5G")
    tc = catalog.get("PVTP-015")
    cycle = tc.step("thermal_cycling").payload
    assert (cycle["low_c"], cycle["high_c"], cycle["max_ramp_c_per_h"]) == (-40, 85, 100)
    assert tc.inputs[0].name == "cycles" and tc.inputs[0].default == 200
    pid = {i.name: i.default for i in catalog.get("PVTP-030").inputs}
    assert pid == {"bias_voltage_v": -1000, "chamber_temperature_c": 85,
                   "relative_humidity_pct": 85, "duration_h": 96}
    for template_id in ("PVTP-015", "PVTP-030"):
        degradation = catalog.get(template_id).document["criteria"][0]
        assert (degradation["operator"], degradation["limit"], degradation["unit"]) == \
            ("<=", 5, "%")
    for template_id in ("PVTP-003", "PVTP-010"):
        criteria = catalog.get(template_id).document["criteria"]
        assert {json.dumps(c.get("applies_if"), sort_keys=True) for c in criteria} >= {
            json.dumps({"value": "module_area_m2", "operator": ">", "limit": 0.1},
                       sort_keys=True),
            json.dumps({"value": "module_area_m2", "operator": "<=", "limit": 0.1},
                       sort_keys=True)}


def test_the_analysis_function_names_agree_everywhere():
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    enum = schema["properties"]["analysis"]["items"]["properties"]["function"]["enum"]
    assert set(enum) == set(ANALYSIS_FUNCTIONS) == set(FUNCTIONS)


# -- invalid templates --------------------------------------------------------------------------

def _set(doc: dict, path: list, value) -> dict:
    doc = copy.deepcopy(doc)
    target = doc
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return doc


INVALID = [
    # (change, JSON path in the message, words of the reason)
    (lambda d: {**d, "titel": "x"}, "$:", "'titel' was unexpected"),
    (lambda d: _set(d, ["criteria", 1, "opertor"], ">="), "$.criteria[1]:",
     "'opertor' was unexpected"),
    (lambda d: _set(d, ["criteria", 1, "operator"], "=>"), "$.criteria[1].operator:",
     "'=>' is not one of"),
    (lambda d: _set(d, ["criteria", 1, "value"], "max(insulation_resistance_mohm, 1)"),
     "$.criteria[1].value:", "function calls are not allowed"),
    (lambda d: _set(d, ["criteria", 1, "limit"], "module_area_m2.real"),
     "$.criteria[1].limit:", "attribute access is not allowed"),
    (lambda d: _set(d, ["criteria", 0, "value"], "__import__('os').system('echo hi')"),
     "$.criteria[0].value:", "function calls are not allowed"),
    (lambda d: _set(d, ["criteria", 0, "value"], "__builtins__"),
     "$.criteria[0].value:", "name '__builtins__' is not allowed"),
    (lambda d: _set(d, ["criteria", 0, "value"], "breakdowns ** 2"),
     "$.criteria[0].value:", "operator ** is not allowed"),
    (lambda d: _set(d, ["criteria", 0, "value"], "breakdowns > 0"),
     "$.criteria[0].value:", "comparisons are not allowed"),
    (lambda d: _set(d, ["criteria", 0, "value"], "'text'"),
     "$.criteria[0].value:", "only numbers are allowed"),
    (lambda d: _set(d, ["criteria", 0, "value"], "breakdowns +"),
     "$.criteria[0].value:", "does not parse"),
    (lambda d: _set(d, ["criteria", 0, "value"], "breakdown_count"),
     "$.criteria[0].value:", "'breakdown_count' is not an input or an analysis result"),
    (lambda d: _set(d, ["criteria", 2, "applies_if", "value"], "area"),
     "$.criteria[2].applies_if.value:", "'area' is not"),
    (lambda d: _set(d, ["criteria", 0, "limit"], [0, 1]), "$.criteria[0].limit:",
     "is not of type 'string', 'number'"),
    (lambda d: _set(d, ["criteria", 0, "operator"], "between"), "$.criteria[0].limit:",
     "is not of type 'array'"),
    (lambda d: _set(d, ["steps", 1, "payload", "voltage_v"], "${test_voltage}"),
     "$.steps[1].payload.voltage_v:", "'test_voltage' is not an input"),
    (lambda d: _set(d, ["steps", 1, "payload", "voltage_v"], "${open('/etc/passwd')}"),
     "$.steps[1].payload.voltage_v:", "function calls are not allowed"),
    (lambda d: _set(d, ["analysis", 1, "args", "values"], "insulation_resistance.resistance"),
     "$.analysis[1].args.values:", "step 'insulation_resistance' declares no reading"),
    (lambda d: _set(d, ["analysis", 1, "args", "values"], "megger.insulation_resistance"),
     "$.analysis[1].args.values:", "no step 'megger'"),
    (lambda d: _set(d, ["analysis", 1, "function"], "median"), "$.analysis[1].function:",
     "'median' is not one of"),
    (lambda d: _set(d, ["inputs", 1, "name"], "module_area_m2"), "$.inputs[1].name:",
     "'module_area_m2' is already inputs[0]"),
    (lambda d: _set(d, ["inputs", 1, "default"], 5000), "$.inputs[1].default:",
     "out of its range [50, 1500]"),
    (lambda d: _set(d, ["criteria", 1, "id"], "no_breakdown"), "$.criteria[1].id:",
     "already criteria[0]"),
    (lambda d: _set(d, ["version"], 0), "$.version:", "less than the minimum of 1"),
    (lambda d: _set(d, ["steps", 0, "timeout_s"], "import os"), "$.steps[0].timeout_s:",
     "does not parse"),
]


@pytest.mark.parametrize("change,where,reason", INVALID,
                         ids=[f"{i}:{w}" for i, (_, w, _) in enumerate(INVALID)])
def test_an_invalid_template_fails_with_the_file_and_json_path(tmp_path, change, where, reason):
    path = write(tmp_path, change(document("PVTP-003")))
    with pytest.raises(TemplateError) as e:
        load_template(path)
    message = str(e.value)
    assert message.startswith(f"PVTP-003.json: {where}"), message
    assert reason in message, message


def test_a_template_expression_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    doc = _set(document("PVTP-003"), ["criteria", 0, "value"],
               f"__import__('pathlib').Path('{marker}').touch()")
    with pytest.raises(TemplateError, match="function calls are not allowed"):
        parse_template(doc, source="evil.json")
    with pytest.raises(ExpressionError):
        Expression.parse(f"[open('{marker}', 'w')][0]")
    assert not marker.exists()


def test_a_file_that_is_not_json_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "PVTP-003.json"
    path.write_text('{\n  "id": "PVTP-003",\n  "title": \n}', encoding="utf-8")
    with pytest.raises(TemplateError, match=r"^PVTP-003.json: not JSON \(line 4"):
        load_template(path)


def test_a_template_in_a_file_of_another_name_is_refused(tmp_path):
    path = write(tmp_path, document("PVTP-003"), name="PVTP-004.json")
    with pytest.raises(TemplateError, match="PVTP-004.json: .* belongs in PVTP-003.json"):
        load_template(path)


def test_an_analysis_needs_its_unit_and_outputs_match_the_function():
    doc = document("PVTP-015")
    no_unit = copy.deepcopy(doc)
    del no_unit["analysis"][2]["unit"]
    with pytest.raises(TemplateError, match=r"\$.analysis\[2\]: relative_change needs the "
                                            "result's unit"):
        parse_template(no_unit)
    bad_key = _set(doc, ["analysis", 0, "outputs"], {"p_max": "pmax_initial_w"})
    with pytest.raises(TemplateError, match=r"\$.analysis\[0\].outputs.p_max: iv_parameters "
                                            "has no output 'p_max'"):
        parse_template(bad_key)
    later = _set(doc, ["analysis", 2, "args", "new"], "cycles_done")  # computed further down
    with pytest.raises(TemplateError, match="'cycles_done' is not an input or an earlier"):
        parse_template(later)


# -- the expression language --------------------------------------------------------------------

def test_expressions_compute_with_precedence_unary_minus_and_parentheses():
    env = {"a": 2.0, "b": 8.0}
    assert Expression.parse("40 / b").evaluate(env) == 5.0
    assert Expression.parse("-100 * (a - b) / b").evaluate(env) == 75.0
    assert Expression.parse("1 + a * 3").evaluate(env) == 7.0
    assert Expression.parse("--a").evaluate(env) == 2.0
    assert Expression.parse(1.5).evaluate({}) == 1.5
    assert Expression.parse("a * b + a").names == {"a", "b"}


def test_expression_errors_at_evaluation_are_readable():
    with pytest.raises(ExpressionError, match="division by zero"):
        Expression.parse("40 / area").evaluate({"area": 0.0})
    with pytest.raises(ExpressionError, match="area has no value"):
        Expression.parse("40 / area").evaluate({})
    with pytest.raises(ExpressionError, match="not a finite number"):
        Expression.parse("1e308 * 10").evaluate({})
    for bad in (True, None, math.nan, "", "x" * 501, "lambda: 1", "(a := 1)", "a if a else 1",
                "a and 1", "a[0]", "~a", "a % 2", "a // 2", "not a"):
        with pytest.raises(ExpressionError):
            Expression.parse(bad)


# -- versions and the catalog -------------------------------------------------------------------

def test_the_content_hash_ignores_formatting_but_not_content():
    doc = document("PVTP-003")
    reordered = dict(reversed(list(doc.items())))
    as_float = _set(doc, ["criteria", 1, "limit"], 40.0)
    assert content_hash(doc) == content_hash(reordered) == content_hash(as_float)
    assert content_hash(json.loads(json.dumps(doc, indent=7))) == content_hash(doc)
    changed = _set(doc, ["criteria", 1, "limit"], 41)
    assert content_hash(changed) != content_hash(doc)


def test_a_changed_template_under_the_same_version_is_refused(tmp_path):
    doc = document("PVTP-003")
    catalog = Catalog([parse_template(doc, source="PVTP-003.json")])
    assert catalog.add(parse_template(copy.deepcopy(doc), source="again.json")).source == \
        "PVTP-003.json"  # the same content again: no-op, the first stays
    changed = _set(doc, ["criteria", 1, "limit"], 50)
    with pytest.raises(TemplateError, match="PVTP-003 version 1 is already PVTP-003.json with "
                                            "other content .*a changed template is a new "
                                            "version"):
        catalog.add(parse_template(changed, source="edited.json"))
    v2 = catalog.add(parse_template(_set(changed, ["version"], 2), source="v2.json"))
    assert catalog.versions("PVTP-003") == [1, 2]
    assert catalog.latest("PVTP-003") is catalog.get("PVTP-003") is v2
    assert catalog.get("PVTP-003", 1).sha256 == content_hash(doc)
    assert catalog.get("PVTP-003", 2).document["criteria"][1]["limit"] == 50


def test_a_folder_keeps_several_versions_of_one_protocol(tmp_path):
    doc = document("PVTP-003")
    write(tmp_path, doc)
    write(tmp_path, _set(_set(doc, ["version"], 2), ["title"], "Insulation test (v2)"),
          name="PVTP-003.v2.json")
    (tmp_path / "ignored.schema.json").write_text("{}")
    catalog = Catalog.from_dir(tmp_path)
    assert [(t.id, t.version) for t in catalog] == [("PVTP-003", 1), ("PVTP-003", 2)]
    assert catalog.latest("PVTP-003").title == "Insulation test (v2)"
    write(tmp_path, _set(doc, ["title"], "edited in place"), name="PVTP-003.v1.json")
    with pytest.raises(TemplateError, match="a changed template is a new version"):
        Catalog.from_dir(tmp_path)


def test_unknown_protocols_and_versions_are_lookup_errors():
    catalog = shipped_catalog()
    with pytest.raises(UnknownProtocol, match="no protocol PVTP-999 .known: PVTP-001"):
        catalog.get("PVTP-999")
    with pytest.raises(UnknownProtocol, match=r"no protocol PVTP-001 version 7 \(versions: 1\)"):
        catalog.get("PVTP-001", 7)


# -- inputs and payloads ------------------------------------------------------------------------

def test_inputs_take_their_defaults_and_are_refused_out_of_range():
    t = shipped_catalog().get("PVTP-003")
    assert resolve_inputs(t, {"module_area_m2": 1.6}) == {
        "module_area_m2": 1.6, "max_system_voltage_v": 1000.0,
        "insulation_test_voltage_v": 1000.0}
    with pytest.raises(InputError) as e:
        resolve_inputs(t, {"module_area_m2": 12, "max_system_voltage_v": True, "area": 1,
                           "insulation_test_voltage_v": math.inf})
    assert e.value.problems == [
        "unknown input 'area' (declared: insulation_test_voltage_v, max_system_voltage_v, "
        "module_area_m2)",
        "input module_area_m2 = 12 m2 is out of its range [0.001, 10] m2",
        "input max_system_voltage_v = True is not a number",
        "input insulation_test_voltage_v = inf is not a number"]
    with pytest.raises(InputError, match="input module_area_m2 .m2. is required"):
        resolve_inputs(t, {})


def test_payloads_are_rendered_from_the_inputs():
    t = shipped_catalog().get("PVTP-003")
    values = resolve_inputs(t, {"module_area_m2": 1.6, "max_system_voltage_v": 1500,
                                "insulation_test_voltage_v": 1500})
    assert render_payload(t.step("dielectric_withstand"), values) == {
        "voltage_v": 4000, "max_ramp_v_per_s": 500, "hold_s": 60}
    pid = shipped_catalog().get("PVTP-030")
    rendered = render_payload(pid.step("pid_stress"), resolve_inputs(pid, {}))
    assert rendered == {"temperature_c": 85, "relative_humidity_pct": 85,
                        "duration_s": 345600, "bias_voltage_v": -1000}
    assert pid.step("pid_stress").timeout_s.evaluate(resolve_inputs(pid, {})) == 345600 + 86400
    step = protocols.StepSpec(id="s", instrument_type="x", command="c",
                              payload={"label": "bias ${bias_voltage_v} V", "n": ["${1 / 4}"]},
                              readings=(), timeout_s=Expression.parse(1))
    assert render_payload(step, {"bias_voltage_v": -1000.0}) == {"label": "bias -1000 V",
                                                                 "n": [0.25]}
