"""The simulated PV instruments' physics (producers/pv/models.py): CEC modules at STC, the
seeded degradation, the fleet's verdicts, the climate chamber's profiles and pacing, the
insulation and wet leakage testers."""

import time

import numpy as np
import pytest

from labbus.processors.qc.iv import iv_parameters
from labbus.producers.pv import models as pv

CRITERION = 0.05  # Pmax loss allowed after TC200 / PID (the protocols' criterion)
INSULATION_LIMIT_MOHM_M2 = 40.0  # MQT 03 / MQT 15 for modules above 0.1 m2


# --- modules at STC --------------------------------------------------------------------------

def test_the_cec_database_is_read_once():
    assert pv.cec_modules() is pv.cec_modules()
    assert pv.module_type(pv.DEFAULT_MODULE) is pv.module_type(pv.DEFAULT_MODULE)
    with pytest.raises(KeyError, match="not in pvlib's CEC module database"):
        pv.module_type("Acme_Sunshine_9000")


@pytest.mark.parametrize("name", ["Canadian_Solar_Inc__CS6K_275M", "SunPower_SPR_X21_345",
                                  "First_Solar__Inc__FS_4117_3"])
def test_stc_curve_matches_the_datasheet_pmax(name):
    module = pv.make_module("STC", name)
    datasheet = module.type.stc_pmax_w
    assert pv.true_iv_parameters(module)["pmax_w"] == pytest.approx(datasheet, rel=0.01)
    sweep = pv.iv_sweep(module, 1000, 25, points=100, seed=11)
    measured = iv_parameters(sweep.voltage_v, sweep.current_a)
    assert measured["pmax_w"] == pytest.approx(datasheet, rel=0.01)
    assert measured["voc_v"] == pytest.approx(module.type.v_oc_ref, rel=0.01)
    assert measured["isc_a"] == pytest.approx(module.type.i_sc_ref, rel=0.01)


def test_the_sweep_follows_irradiance_and_temperature():
    module = pv.make_module("S")
    stc = pv.true_iv_parameters(module, 1000, 25)
    low = pv.true_iv_parameters(module, 500, 25)
    hot = pv.true_iv_parameters(module, 1000, 65)
    assert low["isc_a"] == pytest.approx(stc["isc_a"] / 2, rel=0.01)
    assert hot["voc_v"] < stc["voc_v"] - 4 and hot["pmax_w"] < 0.9 * stc["pmax_w"]
    sweep = pv.iv_sweep(module, 1000, 25, points=50, accuracy=pv.NOISE_FREE)
    assert len(sweep.voltage_v) == len(sweep.current_a) == 50
    assert sweep.voltage_v[0] < 0 < stc["voc_v"] < sweep.voltage_v[-1]
    assert sweep.current_a[-1] < 0 < sweep.current_a[0]
    with pytest.raises(ValueError, match="irradiance"):
        pv.iv_sweep(module, 0)


def test_the_tracers_noise_is_seeded_and_of_the_stated_size():
    module = pv.make_module("S")
    a, b = (pv.iv_sweep(module, seed=5, points=400) for _ in range(2))
    assert np.array_equal(a.voltage_v, b.voltage_v) and np.array_equal(a.current_a, b.current_a)
    assert not np.array_equal(a.current_a, pv.iv_sweep(module, seed=6, points=400).current_a)
    clean = pv.iv_sweep(module, points=400, accuracy=pv.NOISE_FREE)
    truth = pv.true_iv_parameters(module)
    assert np.std(a.voltage_v - clean.voltage_v) / truth["voc_v"] == pytest.approx(0.001, rel=0.2)
    # the current's residual also holds the voltage noise through dI/dV; the near-flat half
    # of the curve shows the current noise alone
    flat = clean.voltage_v < 0.5 * truth["voc_v"]
    residual = a.current_a[flat] - clean.current_a[flat]
    assert np.std(residual) / truth["isc_a"] == pytest.approx(0.001, rel=0.2)


# --- degradation -----------------------------------------------------------------------------

def _loss(before: pv.PVModule, after: pv.PVModule) -> float:
    return 1 - pv.true_iv_parameters(after)["pmax_w"] / pv.true_iv_parameters(before)["pmax_w"]


def test_thermal_cycling_degrades_every_module_reproducibly():
    fleet = pv.make_fleet(20, seed=3)
    losses = [_loss(m, pv.thermal_cycling(m, 200)) for m in fleet]
    assert min(losses) > 0
    again = [_loss(m, pv.thermal_cycling(m, 200)) for m in pv.make_fleet(20, seed=3)]
    assert again == losses
    other = [_loss(m, pv.thermal_cycling(m, 200)) for m in pv.make_fleet(20, seed=4)]
    assert other != losses
    module = fleet[0]
    assert module.degradation == pv.Degradation()  # the stress returned a new sample
    cycled = pv.thermal_cycling(module, 200)
    assert cycled.degradation.series > 0 and cycled.degradation.photocurrent > 0
    assert cycled.degradation.shunt == 0
    # more cycles, more loss; a smaller swing, less (Coffin-Manson)
    assert _loss(module, pv.thermal_cycling(module, 400)) > _loss(module, cycled)
    assert _loss(module, pv.thermal_cycling(module, 200, -20, 60)) < _loss(module, cycled)
    # stresses accumulate
    assert _loss(module, pv.thermal_cycling(cycled, 200)) == pytest.approx(
        _loss(module, pv.thermal_cycling(module, 400)), rel=1e-9)


def _measured_losses(fleet, stress):
    """Pmax loss of each sample as the protocol measures it: a noisy 100-point sweep at STC
    before and after, each analysed by the QC's I-V analysis."""
    losses = []
    for module in fleet:
        before = pv.iv_sweep(module, seed=1)
        after = pv.iv_sweep(stress(module), seed=2)
        p0 = iv_parameters(before.voltage_v, before.current_a)["pmax_w"]
        p1 = iv_parameters(after.voltage_v, after.current_a)["pmax_w"]
        losses.append(1 - p1 / p0)
    return np.array(losses)


@pytest.mark.parametrize("stress", [
    lambda m: pv.thermal_cycling(m, 200),
    lambda m: pv.pid_stress(m, 96, -1000, 85, 85),
], ids=["TC200", "PID96"])
def test_a_fleet_of_50_has_some_modules_failing_the_5_percent_criterion(stress):
    losses = _measured_losses(pv.make_fleet(50, seed=0), stress)
    failing = int(np.sum(losses > CRITERION))
    print(f"\n{failing}/50 lose more than 5 %; median loss {np.median(losses):.2%}, "
          f"worst {losses.max():.1%}")
    assert 1 <= failing <= 10
    assert np.median(losses) < 0.02


def test_pid_needs_negative_bias_and_is_slower_when_cooler():
    module = pv.make_module("P", seed=2)
    negative = pv.pid_stress(module, 96, -1000)
    assert negative.degradation.shunt > 0
    positive = pv.pid_stress(module, 96, +1000)
    assert positive.degradation.shunt == 0
    assert positive.degradation == pv.damp_heat(module, 96).degradation  # damp heat only
    assert _loss(module, pv.pid_stress(module, 96, -1000, 60, 85)) < _loss(module, negative) / 5
    assert pv.peck_factor(85, 85) == pytest.approx(1.0)
    # shunting shows most at low light (a smaller share of a smaller photocurrent)
    low_light = 1 - (pv.true_iv_parameters(negative, 200)["pmax_w"]
                     / pv.true_iv_parameters(module, 200)["pmax_w"])
    assert low_light > _loss(module, negative)


def test_damp_heat_lowers_the_insulation():
    module = pv.make_module("D", seed=1)
    aged = pv.damp_heat(module, 1000)
    assert 0 < aged.degradation.insulation < 1
    assert (pv.wet_leakage(aged).insulation_resistance_mohm
            < pv.wet_leakage(module).insulation_resistance_mohm)


# --- climate chamber -------------------------------------------------------------------------

def _dwells(profile, level_c):
    """Durations of the stretches where the setpoint holds at `level_c`."""
    t, temp = profile.times_s, profile.temperature_c
    held = (temp[:-1] == level_c) & (temp[1:] == level_c)
    return np.diff(t)[held]


def test_thermal_cycling_profile_respects_mqt_11():
    profile = pv.thermal_cycling_profile(200)
    assert profile.cycles == 200
    assert profile.max_ramp_c_per_h() <= 100.0 + 1e-9
    for level in (-40.0, 85.0):
        dwells = _dwells(profile, level)
        assert len(dwells) == 200 and dwells.min() >= 600.0
    cycle_s = np.diff(np.concatenate([[0.0], profile.cycle_ends_s]))
    assert cycle_s.max() <= 6 * 3600
    assert profile.temperature_c[0] == profile.temperature_c[-1] == 25.0
    print(f"\nTC200: {profile.duration_s / 3600:.1f} h, cycle {cycle_s[0] / 60:.0f} min")


@pytest.mark.parametrize("kwargs, reason", [
    ({"ramp_c_per_h": 120}, "ramp 120"),
    ({"dwell_s": 300}, "dwell 300"),
    ({"ramp_c_per_h": 30}, "longer than MQT 11's 6 h"),
    ({"cycles": 0}, "cycles must be"),
])
def test_thermal_cycling_outside_mqt_11_is_refused(kwargs, reason):
    with pytest.raises(ValueError, match=reason):
        pv.thermal_cycling_profile(**kwargs)


def test_chamber_readings_follow_the_profile_within_tolerance():
    profile = pv.thermal_cycling_profile(10, injection_current_a=8.8)
    r = pv.chamber_readings(profile, sample_interval_s=60, seed=4)
    assert np.all(np.diff(r["t_s"]) > 0) and r["t_s"][-1] == profile.duration_s
    assert np.abs(r["temperature_c"] - r["setpoint_c"]).max() < 2.0  # MQT 11's +-2 degC
    # the noise-free setpoint samples never ramp faster than the limit
    rates = np.abs(np.diff(r["setpoint_c"])) / np.diff(r["t_s"]) * 3600
    assert rates.max() <= 100.0 + 1e-6
    # every cycle reaches both extremes
    cycle = np.minimum(r["cycles_completed"], 9)
    for k in range(10):
        temps = r["temperature_c"][cycle == k]
        assert temps.min() < -38 and temps.max() > 83
    assert np.all(np.diff(r["cycles_completed"]) >= 0) and r["cycles_completed"][-1] == 10
    assert np.isnan(r["humidity_pct"]).all()  # not controlled in thermal cycling
    # the current is injected only while the module is above 25 degC
    assert np.all((r["injection_current_a"] > 0) == (r["setpoint_c"] > 25.0))
    again = pv.chamber_readings(profile, sample_interval_s=60, seed=4)
    assert np.array_equal(again["temperature_c"], r["temperature_c"])


def test_pid_profile_holds_85_85_and_the_bias_for_96_hours():
    profile = pv.damp_heat_profile(96 * 3600, 85, 85, bias_voltage_v=-1000)
    assert profile.max_ramp_c_per_h() <= 100.0
    r = pv.chamber_readings(profile, sample_interval_s=300, seed=1)
    holding = (r["t_s"] >= profile.stress_start_s) & (r["t_s"] <= profile.stress_end_s)
    assert np.abs(r["temperature_c"][holding] - 85).max() < 2.0
    assert np.abs(r["humidity_pct"][holding] - 85).max() < 5.0
    assert r["stress_hours"][-1] == pytest.approx(96.0)
    assert np.all(r["bias_voltage_v"] == -1000)
    with pytest.raises(ValueError, match="relative humidity"):
        pv.damp_heat_profile(3600, 85, 120)


def test_a_200_cycle_run_takes_seconds_in_compressed_time():
    profile = pv.thermal_cycling_profile(200)
    whole = pv.ChamberRun(profile, sample_interval_s=60, speed=1, seed=2).due(1e12)
    # the same readings, whatever the pacing
    run = pv.ChamberRun(profile, sample_interval_s=60, speed=profile.duration_s / 0.5, seed=2)
    assert run.wall_duration_s == pytest.approx(0.5)
    assert len(run.due(0.0)) == 1  # the reading at t = 0
    start = time.monotonic()
    paced = [whole[0]]
    while not run.done:
        time.sleep(0.02)
        paced += run.due(time.monotonic() - start)
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 2.0
    assert paced == whole and len(whole) == len(run)
    assert whole[-1].cycles_completed == 200 and whole[-1].humidity_pct is None
    assert run.due(1e12) == []  # nothing twice
    print(f"\nTC200 ({profile.duration_s / 3600:.0f} h, {len(whole)} readings) "
          f"in {elapsed:.2f} s of wall time")


# --- insulation and wet leakage --------------------------------------------------------------

def test_insulation_resistance_scales_with_the_inverse_of_the_area():
    small = pv.make_module("A1", "SunPower_SPR_X21_345")
    large = pv.make_module("A1", "First_Solar__Inc__FS_4117_3")
    assert small.susceptibility == large.susceptibility  # same sample id and seed
    ratio = large.area_m2 / small.area_m2
    assert abs(ratio - 1) > 0.3
    for test in (pv.insulation_resistance, pv.wet_leakage):
        r_small = test(small, 1000, seed=3).insulation_resistance_mohm
        r_large = test(large, 1000, seed=3).insulation_resistance_mohm
        assert r_small / r_large == pytest.approx(ratio, rel=1e-9)


def test_insulation_testers_readings():
    module = pv.make_module("I", seed=5)
    dry = pv.insulation_resistance(module, 1000, seed=1)
    wet = pv.wet_leakage(module, 1000, seed=1)
    assert dry.test_voltage_v == 1000.0
    assert dry.leakage_current_ua == pytest.approx(1000 / dry.insulation_resistance_mohm)
    assert wet.insulation_resistance_mohm < dry.insulation_resistance_mohm
    assert wet.solution_resistivity_ohm_cm <= 3500 and 19 <= wet.solution_temperature_c <= 25
    assert pv.wet_leakage(module, 1000, seed=1) == wet
    assert pv.wet_leakage(module, 1000, seed=2) != wet
    with pytest.raises(ValueError, match="test voltage"):
        pv.insulation_resistance(module, 0)


def test_a_fleet_has_some_insulation_failures_and_most_passes():
    fleet = pv.make_fleet(100, seed=0)
    dry = [pv.insulation_resistance(m, 1000).insulation_resistance_mohm * m.area_m2
           for m in fleet]
    wet = [pv.wet_leakage(m, 1000).insulation_resistance_mohm * m.area_m2 for m in fleet]
    dry_failing = sum(r < INSULATION_LIMIT_MOHM_M2 for r in dry)
    wet_failing = sum(r < INSULATION_LIMIT_MOHM_M2 for r in wet)
    print(f"\n100 modules: {dry_failing} fail MQT 03, {wet_failing} fail MQT 15")
    assert 1 <= dry_failing <= wet_failing <= 15
    defective = [m for m in fleet if m.susceptibility.insulation_defect]
    assert defective and all(pv.withstand_breakdown(m, 3000) for m in defective)
    assert not any(pv.withstand_breakdown(m, 3000) for m in fleet
                   if not m.susceptibility.insulation_defect)
