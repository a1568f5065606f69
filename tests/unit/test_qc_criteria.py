"""The pure QC evaluation (processors/qc): comparisons by the fixed operator set, the shipped
templates' criteria on their edges (MQT 03/15's area rule on both sides of 0.1 m2, a 4.9 % and a
5.1 % Pmax loss), a missing reading as a failure reason, inputs out of range refused before
anything runs, analysis failures as reasons rather than crashes."""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest

from labbus.events.protocols import InputError, parse_template, shipped_catalog
from labbus.processors.qc import analysis
from labbus.processors.qc.criteria import FAIL, NOT_APPLICABLE, PASS, compare
from labbus.processors.qc.evaluation import evaluate


def template(template_id: str):
    return shipped_catalog().get(template_id)


def insulation(resistance_mohm: float | None, breakdown: float = 0) -> dict:
    readings: dict = {"dielectric_withstand": {"breakdown": [breakdown]}}
    if resistance_mohm is not None:
        readings["insulation_resistance"] = {"insulation_resistance": [resistance_mohm]}
    return readings


def cycling(t_min=-40.4, t_max=85.6, cycles=200) -> dict:
    return {"thermal_cycling": {"module_temperature": [20.0, t_min, t_max, 21.0],
                                "cycles_completed": [cycles]}}


def verdicts(evaluation) -> dict[str, str]:
    return {c.id: c.verdict for c in evaluation.criteria}


# -- operators ----------------------------------------------------------------------------------

def test_the_fixed_operators_compare_as_written():
    assert compare(5.0, "<=", 5.0) and not compare(5.0000001, "<=", 5.0)
    assert compare(4.9, "<", 5.0) and not compare(5.0, "<", 5.0)
    assert compare(40.0, ">=", 40.0) and not compare(39.999, ">=", 40.0)
    assert compare(41.0, ">", 40.0) and not compare(40.0, ">", 40.0)
    assert compare(0.0, "==", 0.0) and not compare(1.0, "==", 0.0)
    assert compare(19.0, "between", (19.0, 25.0)) and compare(25.0, "between", (19.0, 25.0))
    assert not compare(25.1, "between", (19.0, 25.0))
    assert not compare(18.9, "between", (19.0, 25.0))


# -- MQT 03 / MQT 15: the area rule on both sides of 0.1 m2 --------------------------------------

@pytest.mark.parametrize("area,resistance,verdict,judged_by", [
    (1.6, 30.0, PASS, "resistance_times_area"),  # 48 MOhm m2
    (1.6, 24.0, FAIL, "resistance_times_area"),  # 38.4 MOhm m2
    (0.11, 370.0, PASS, "resistance_times_area"),  # 40.7 MOhm m2: over 0.1 m2, 400 not needed
    (0.1, 400.0, PASS, "resistance_small_module"),  # exactly 0.1 m2: the 400 MOhm side
    (0.1, 399.0, FAIL, "resistance_small_module"),  # 39.9 MOhm m2 would not pass either
    (0.05, 450.0, PASS, "resistance_small_module"),
    (0.05, 390.0, FAIL, "resistance_small_module"),  # 19.5 MOhm m2; 400 MOhm not reached
])
def test_mqt03_insulation_area_rule(area, resistance, verdict, judged_by):
    e = evaluate(template("PVTP-003"), {"module_area_m2": area}, insulation(resistance))
    other = ({"resistance_times_area", "resistance_small_module"} - {judged_by}).pop()
    assert verdicts(e)[judged_by] == verdict
    assert verdicts(e)[other] == NOT_APPLICABLE
    assert e.verdict == verdict
    assert e.passed is (verdict == PASS)


def test_mqt03_messages_say_value_limit_and_verdict():
    e = evaluate(template("PVTP-003"), {"module_area_m2": 1.6}, insulation(24.0))
    area = e.criterion("resistance_times_area")
    assert area.value == pytest.approx(38.4) and area.limit == 40
    assert area.message == ("Insulation resistance times module area (module over 0.1 m2): "
                            "38.4 MOhm*m2, limit >= 40 MOhm*m2: fail")
    assert e.criterion("resistance_small_module").message.endswith(
        "not applicable (module_area_m2 = 1.6, applies when <= 0.1)")
    assert e.reasons == (area.message,)


def test_mqt03_a_breakdown_fails_whatever_the_resistance():
    e = evaluate(template("PVTP-003"), {"module_area_m2": 1.6}, insulation(500.0, breakdown=1))
    assert verdicts(e) == {"no_breakdown": FAIL, "resistance_times_area": PASS,
                           "resistance_small_module": NOT_APPLICABLE, "test_voltage": PASS}
    assert e.verdict == FAIL


def test_mqt03_the_test_voltage_must_reach_the_system_voltage():
    e = evaluate(template("PVTP-003"), {"module_area_m2": 1.6, "max_system_voltage_v": 1500,
                                        "insulation_test_voltage_v": 1000}, insulation(100.0))
    assert verdicts(e)["test_voltage"] == FAIL
    assert "1000 V, limit >= 1500 V: fail" in e.criterion("test_voltage").message


@pytest.mark.parametrize("area,resistance,verdict", [
    (2.0, 20.0, PASS),  # limit 40 / 2 = 20 MOhm
    (2.0, 19.9, FAIL),
    (0.08, 400.0, PASS),
    (0.08, 399.0, FAIL),
])
def test_mqt15_wet_leakage_limit_is_an_expression_of_the_area(area, resistance, verdict):
    readings = {"wet_insulation": {"insulation_resistance": [resistance],
                                   "solution_resistivity": [3100.0],
                                   "solution_temperature": [22.4]}}
    e = evaluate(template("PVTP-010"), {"module_area_m2": area}, readings)
    assert e.verdict == verdict
    judged = [c for c in e.criteria if c.id.startswith("resistance")
              and c.verdict != NOT_APPLICABLE]
    assert len(judged) == 1 and judged[0].verdict == verdict
    if area > 0.1:
        assert judged[0].limit == pytest.approx(40 / area)


def test_mqt15_the_solution_must_be_as_specified():
    readings = {"wet_insulation": {"insulation_resistance": [100.0],
                                   "solution_resistivity": [3600.0],
                                   "solution_temperature": [25.5]}}
    e = evaluate(template("PVTP-010"), {"module_area_m2": 1.6}, readings)
    assert verdicts(e)["solution_resistivity"] == FAIL
    assert e.criterion("solution_temperature").message == (
        "Solution temperature 22 +/- 3 degC: 25.5 degC, limit in [19, 25] degC: fail")
    assert e.verdict == FAIL


# -- Pmax degradation: 4.9 % passes, 5.1 % fails ------------------------------------------------

@pytest.mark.parametrize("template_id,readings,inputs", [
    ("PVTP-015", cycling(), {"injection_current_a": 9.8}),
    ("PVTP-030", {"pid_stress": {"chamber_temperature": [84.6, 85.2],
                                 "relative_humidity": [84.0, 86.0],
                                 "stress_duration": [96.0]}}, {}),
])
@pytest.mark.parametrize("final_w,loss_pct,verdict", [
    (285.3, 4.9, PASS), (285.0, 5.0, PASS), (284.7, 5.1, FAIL), (312.0, -4.0, PASS)])
def test_degradation_limit_of_five_percent(template_id, readings, inputs, final_w, loss_pct,
                                           verdict):
    """Pmax before and after as an operator enters them (TestResultRecorded): the template's
    own analysis (relative_change) and criterion judge them."""
    e = evaluate(template(template_id), inputs, readings,
                 entered={"pmax_initial_w": 300.0, "pmax_final_w": final_w})
    degradation = e.criterion("pmax_degradation")
    assert degradation.value == pytest.approx(loss_pct)
    assert degradation.verdict == verdict
    assert e.results["pmax_change"] == pytest.approx(-loss_pct / 100)
    assert e.verdict == verdict, e.reasons
    if verdict == FAIL:
        stress = "thermal cycling" if template_id == "PVTP-015" else "the PID stress"
        assert e.reasons == (f"Pmax degradation after {stress}: {loss_pct} %, limit <= 5 %: "
                             "fail",)


def test_thermal_cycling_checks_the_extremes_and_the_cycle_count():
    e = evaluate(template("PVTP-015"), {"injection_current_a": 9.8},
                 cycling(t_min=-37.0, t_max=85.0, cycles=150),
                 entered={"pmax_initial_w": 300.0, "pmax_final_w": 299.0})
    assert verdicts(e) == {"pmax_degradation": PASS, "cycles_completed": FAIL,
                           "low_extreme": FAIL, "high_extreme": PASS}
    assert e.criterion("cycles_completed").message == (
        "Thermal cycles completed: 150, limit >= 200: fail")


# -- missing readings, bad data, bad inputs -----------------------------------------------------

def test_a_missing_reading_is_a_clear_failure_reason():
    e = evaluate(template("PVTP-003"), {"module_area_m2": 1.6}, insulation(None))
    reason = "missing reading insulation_resistance of step insulation_resistance"
    assert e.verdict == FAIL
    assert e.reasons[0] == reason
    area = e.criterion("resistance_times_area")
    assert area.verdict == FAIL and area.value is None
    assert area.message.endswith(f"cannot be judged: {reason}")
    assert e.criterion("no_breakdown").verdict == PASS  # what was measured is still judged
    assert e.results == {"breakdowns": 0.0}
    empty = {**insulation(None), "insulation_resistance": {"insulation_resistance": []}}
    assert evaluate(template("PVTP-003"), {"module_area_m2": 1.6}, empty).reasons[0] == reason


def test_too_few_values_or_a_non_number_are_failure_reasons():
    short = {"stc": {"voltage": [0.1 * i for i in range(60)], "current": [9.0] * 60}}
    e = evaluate(template("PVTP-001"), {"rated_pmax_w": 400, "measurement_uncertainty_pct": 2},
                 short)
    assert e.verdict == FAIL
    assert e.reasons[:2] == ("missing reading voltage of step stc: 60 of the 100 values "
                             "expected",
                             "missing reading current of step stc: 60 of the 100 values "
                             "expected")
    e = evaluate(template("PVTP-003"), {"module_area_m2": 1.6}, insulation(math.nan))
    assert e.reasons[0] == ("reading insulation_resistance of step insulation_resistance: "
                            "nan is not a finite number")


def test_an_input_out_of_range_is_refused_before_anything_runs():
    with pytest.raises(InputError) as e:
        evaluate(template("PVTP-003"), {"module_area_m2": 0.0}, insulation(500.0))
    assert e.value.problems == ["input module_area_m2 = 0 m2 is out of its range "
                                "[0.001, 10] m2"]
    with pytest.raises(InputError, match="input cycles = 150 1 is out of its range"):
        evaluate(template("PVTP-015"), {"cycles": 150, "injection_current_a": 9}, {})
    with pytest.raises(InputError, match="entered result 'pmax_w' is not an analysis result"):
        evaluate(template("PVTP-015"), {"injection_current_a": 9}, {},
                 entered={"pmax_w": 300.0})


def test_the_iv_analysis_missing_is_a_reason_not_a_crash(monkeypatch):
    """Until processors/qc/iv.py is importable, an I-V protocol fails saying why."""
    monkeypatch.setitem(sys.modules, "labbus.processors.qc.iv", None)  # import raises
    curve = {"voltage": [0.5 * i for i in range(100)], "current": [9.0] * 100}
    e = evaluate(template("PVTP-001"), {"rated_pmax_w": 400, "measurement_uncertainty_pct": 2},
                 {"stc": curve})
    assert e.verdict == FAIL
    assert e.reasons[0].startswith("analysis stc_curve (iv_parameters) unavailable: the I-V "
                                   "analysis (labbus.processors.qc.iv) cannot be imported")
    assert e.criterion("pmax_vs_nameplate").verdict == FAIL


def test_an_analysis_that_cannot_compute_is_a_reason():
    e = evaluate(template("PVTP-015"), {"injection_current_a": 9.8}, cycling(),
                 entered={"pmax_initial_w": 0.0, "pmax_final_w": 280.0})
    assert e.reasons[0] == ("analysis pmax_change (relative_change): relative change against a "
                            "reference of 0")
    assert e.criterion("pmax_degradation").verdict == FAIL
    assert verdicts(e)["cycles_completed"] == PASS


def test_results_not_entered_are_unavailable_only_to_criteria_needing_them():
    doc = json.loads(json.dumps(template("PVTP-015").document))
    doc["criteria"].append({"id": "ff_kept", "description": "Fill factor after cycling",
                            "value": "ff_final", "operator": ">=", "limit": 0.7, "unit": "1",
                            "clause": "laboratory rule"})
    e = evaluate(parse_template(doc), {"injection_current_a": 9.8}, cycling(),
                 entered={"pmax_initial_w": 300.0, "pmax_final_w": 295.0})
    assert verdicts(e)["pmax_degradation"] == PASS
    assert e.criterion("ff_kept").message == (
        "Fill factor after cycling: cannot be judged: ff_final was not entered (analysis "
        "final_curve was replaced by results entered by hand)")
    assert e.verdict == FAIL


def test_no_applicable_criterion_is_not_a_pass():
    doc = copy.deepcopy(template("PVTP-003").document)
    doc["criteria"] = [c for c in doc["criteria"] if "applies_if" in c][:1]
    e = evaluate(parse_template(doc), {"module_area_m2": 0.05}, insulation(500.0))
    assert [c.verdict for c in e.criteria] == [NOT_APPLICABLE]
    assert e.verdict == FAIL and e.reasons == ("no criterion applied to this execution",)


def test_the_evaluation_serialises_to_json():
    e = evaluate(template("PVTP-003"), {"module_area_m2": 0.05}, insulation(390.0))
    data = json.loads(json.dumps(e.to_dict()))
    assert data["template_id"] == "PVTP-003" and data["template_version"] == 1
    assert data["template_sha256"] == template("PVTP-003").sha256
    assert data["results"]["insulation_resistance_mohm"] == {"value": 390.0, "unit": "MOhm"}
    assert [c["verdict"] for c in data["criteria"]] == [PASS, NOT_APPLICABLE, FAIL, PASS]
    assert data["verdict"] == FAIL


# -- the analysis functions ---------------------------------------------------------------------

def test_the_statistics_functions():
    values = [3.0, -1.0, 4.0, 1.5]
    assert analysis.minimum(values) == -1.0 and analysis.maximum(values) == 4.0
    assert analysis.mean(values) == 1.875 and analysis.last(values) == 1.5
    assert analysis.relative_change(285.3, 300.0) == pytest.approx(-0.049)
    with pytest.raises(ValueError, match="no values"):
        analysis.mean([])
    with pytest.raises(ValueError, match="inf is not a finite number"):
        analysis.maximum([1.0, math.inf])
