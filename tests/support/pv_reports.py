"""A realistic service request for the report generators (tests and bench): samples of a CEC
module type measured by the simulated instruments (producers/pv/models.py: pvlib I-V sweeps,
the MQT 11 chamber, the insulation tester), evaluated by the QC (processors/qc) against the
shipped templates PVTP-001 (Pmax at STC), PVTP-015 (TC200) and PVTP-003 (insulation).

With the default seed, sample S001 loses ~7.8 % Pmax in thermal cycling (its susceptibility is
9.7x the median's), so it fails PVTP-015; S002 loses ~0.8 % and passes everything.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from labbus.events.protocols import shipped_catalog
from labbus.processors.qc.evaluation import evaluate
from labbus.processors.reports import (
    ExecutionReport,
    NonConformance,
    Sample,
    ServiceRequestReport,
    execution_from_evaluation,
)
from labbus.producers.pv import models as pv

FAILS_TC = "S001"
PASSES_ALL = "S002"
MODULE = pv.DEFAULT_MODULE
START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
CHAMBER_INTERVAL_S = 600.0  # one chamber reading per 10 simulated minutes (~3400 in TC200)


def _sweep(module: pv.PVModule, seed: int) -> dict[str, list[float]]:
    sweep = pv.iv_sweep(module, 1000.0, 25.0, points=100, seed=seed)
    return {"voltage": sweep.voltage_v.tolist(), "current": sweep.current_a.tolist()}


def _times(offset_h: float, hours: float) -> tuple[datetime, datetime]:
    start = START + timedelta(hours=offset_h)
    return start, start + timedelta(hours=hours)


def stc_execution(module: pv.PVModule, n: int) -> ExecutionReport:
    template = shipped_catalog().get("PVTP-001")
    readings = {"stc": _sweep(module, seed=n)}
    inputs = {"rated_pmax_w": module.type.stc_pmax_w, "measurement_uncertainty_pct": 2.5}
    started, finished = _times(n, 0.25)
    return execution_from_evaluation(
        template, evaluate(template, inputs, readings), execution_id=f"EX-{n:03d}-001",
        sample_id=module.sample_id, readings=readings, operator="alice@lab.example",
        started_at=started, finished_at=finished, instruments={"stc": "ivt-01"},
        step_times={"stc": (started, finished)})


def tc_execution(module: pv.PVModule, n: int) -> ExecutionReport:
    template = shipped_catalog().get("PVTP-015")
    profile = pv.thermal_cycling_profile(200, injection_current_a=module.type.i_mp_ref)
    chamber = pv.chamber_readings(profile, CHAMBER_INTERVAL_S, seed=n)
    after = pv.thermal_cycling(module, 200)
    readings = {
        "stc_initial": _sweep(module, seed=100 + n),
        "thermal_cycling": {"module_temperature": chamber["temperature_c"].tolist(),
                            "cycles_completed": chamber["cycles_completed"].tolist()},
        "stc_final": _sweep(after, seed=200 + n),
    }
    inputs = {"cycles": 200, "injection_current_a": module.type.i_mp_ref}
    hours = profile.duration_s / 3600
    started, _ = _times(n, 0)
    t1 = started + timedelta(minutes=15)
    t2 = t1 + timedelta(hours=hours)
    finished = t2 + timedelta(minutes=15)
    return execution_from_evaluation(
        template, evaluate(template, inputs, readings), execution_id=f"EX-{n:03d}-015",
        sample_id=module.sample_id, readings=readings, operator="bob@lab.example",
        started_at=started, finished_at=finished,
        instruments={"stc_initial": "ivt-01", "thermal_cycling": "chamber-02",
                     "stc_final": "ivt-01"},
        step_times={"stc_initial": (started, t1), "thermal_cycling": (t1, t2),
                    "stc_final": (t2, finished)})


def insulation_execution(module: pv.PVModule, n: int) -> ExecutionReport:
    template = shipped_catalog().get("PVTP-003")
    reading = pv.insulation_resistance(module, 1000.0, seed=n)
    readings = {"dielectric_withstand": {"breakdown": [float(pv.withstand_breakdown(module,
                                                                                   3000.0))]},
                "insulation_resistance": {
                    "insulation_resistance": [reading.insulation_resistance_mohm]}}
    started, finished = _times(n + 0.5, 0.2)
    return execution_from_evaluation(
        template, evaluate(template, {"module_area_m2": module.area_m2}, readings),
        execution_id=f"EX-{n:03d}-003", sample_id=module.sample_id, readings=readings,
        operator="carol@lab.example", started_at=started, finished_at=finished,
        instruments={"dielectric_withstand": "ins-01", "insulation_resistance": "ins-01"})


def service_request(sample_ids: tuple[str, ...] = (FAILS_TC,), request_id: str = "SR-2026-0042",
                    customer: str = "Sonnenfeld Solar GmbH") -> ServiceRequestReport:
    """A request with PVTP-001, PVTP-015 and PVTP-003 on each sample; a non-conformance for each
    failed execution."""
    executions: list[ExecutionReport] = []
    samples = []
    for k, sample_id in enumerate(sample_ids):
        module = pv.make_module(sample_id, MODULE)
        samples.append(Sample(sample_id, f"serial {MODULE[-8:]}-{sample_id}",
                              ("no visible defects",) if k else
                              ("no visible defects", "label slightly scratched")))
        n = 10 * k + 1
        executions += [stc_execution(module, n), tc_execution(module, n + 1),
                       insulation_execution(module, n + 2)]
    ncs = tuple(NonConformance(f"NC-{e.execution_id}", e.execution_id, e.sample_id,
                               e.protocol_id, e.failure_reason, e.finished_at,
                               tuple(c.id for c in e.criteria if c.verdict == "fail"))
                for e in executions if not e.passed)
    return ServiceRequestReport(
        request_id=request_id, customer=customer, module_type=MODULE,
        module_area_m2=pv.module_type(MODULE).area_m2, samples=tuple(samples),
        executions=tuple(executions), non_conformances=ncs,
        submitted_at=START - timedelta(days=3), generated_at=START + timedelta(days=30))
