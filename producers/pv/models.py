"""The physics of the simulated PV test instruments: plain functions and frozen dataclasses, no
I/O, deterministic for a seed. The instrument agents (a later slice) answer commands with them.

**Modules.** A module type is an entry of pvlib's CEC module database (`cec_modules()`, read
once). A module sample (`make_module`) is a type plus seeded per-sample properties (its
susceptibilities to each stress and its insulation) and a `Degradation` state that the stress
functions (`thermal_cycling`, `damp_heat`, `pid_stress`) return increased, never mutate.

**I-V curve tracer** (`iv_sweep`). `pvlib.pvsystem.calcparams_cec` gives the single-diode
parameters at the irradiance and cell temperature a protocol step asks for; the degradation
changes them (below); `pvlib.pvsystem.i_from_v` gives the current at `points` voltages from 1 %
below 0 V to 2 % beyond Voc (a four-quadrant load sweeps through both ends, as the analysis's
straight-line fits at Isc and Voc want). Each reading gets Gaussian noise: sigma = 0.1 % of Voc
on voltage and 0.1 % of Isc on current (`TracerAccuracy`). That is an assumption, not a vendor's
figure: a +-0.2 % (k=2) uncertainty per point on V and I, the order usually asked of the
electrical measurement in IEC 60904-1 (not checked against its text). Irradiance and
temperature are taken as exactly those asked for (no irradiance or spectral mismatch error).

**Degradation model.** Three mechanisms, each a number that is, to first order, the fraction of
STC Pmax it costs, so that numbers compare across module types (R_ch = Vmp/Imp at STC is the
module's characteristic resistance; dP/P ~ -dRs/R_ch and ~ -dG*R_ch for small changes):

- `series`: Rs + series*R_ch (interconnect fatigue and solder-bond cracking under thermal
  cycling, corrosion of contacts in damp heat);
- `shunt`: a shunt conductance shunt/R_ch in parallel with Rsh (potential-induced shunting,
  PID-s, of p-type cells under negative bias);
- `photocurrent`: IL * exp(-photocurrent) (inactive cell areas behind cracks).

Each stress adds damage = rate x dose x the sample's susceptibility, a lognormal multiplier of
median 1 drawn from its seed. The rates and spreads are chosen, not fitted:

- thermal cycling: median 0.8 % Pmax loss after 200 cycles of -40/+85 degC (80 % series, 20 %
  photocurrent), lognormal sigma 1.2, so that about 6 % of samples lose more than 5 %. Kiwa
  PVEL's 2024 scorecard reports a 0.8 % median after 600 cycles (TC600) with 84 % of bills of
  materials under 2 % and 11 % with some failure: the simulated fleet is deliberately worse
  than the market, so that a lab's fleet shows failures. Other temperature swings scale by
  Coffin-Manson, (swing / 125 degC)^2. The current injected above 25 degC is reported in the
  chamber's readings; it does not change the damage here.
- PID: median 1.0 % after 96 h at -1000 V, 85 degC / 85 % RH (all shunt), lognormal sigma 1.3,
  so that about 11 % of samples lose more than 5 % (real populations are bimodal: resistant
  cells lose little, susceptible ones a lot; the heavy tail stands in for that). The rate scales
  with |bias| / 1000 V; positive bias does nothing (PID-s needs the cells negative against the
  frame). The stress also carries the damp heat of its hours (below).
- damp heat: median 1.0 % after 1000 h at 85 degC / 85 % RH (series), lognormal sigma 0.9; it
  also lowers the insulation (moisture ingress): the area-specific insulation resistance is
  multiplied by exp(-susceptibility * hours / 3000 h).
- Temperature and humidity other than 85/85 scale by Peck's model, RH^2.66 * exp(-0.79 eV/kT)
  (Peck 1986's humidity exponent and activation energy for humidity-driven failures, a
  plausible shape here rather than a fitted PID or damp heat law): 60 degC is ~7x slower.

**Climate chamber** (`thermal_cycling_profile`, `damp_heat_profile`, `ChamberRun`). Piecewise
linear setpoints; the thermal cycle follows IEC 61215-2 MQT 11 (-40 degC <-> +85 degC, ramp
<= 100 degC/h, dwell >= 10 min at each extreme, cycle <= 6 h; the limits are checked and a
profile outside them refused); damp heat (MQT 13) and the PID stress (IEC TS 62804-1 chamber
method; 85 degC / 85 % RH as the laboratory asks, -1000 V) hold temperature, humidity and bias
for the stress duration after a ramp. The chamber controls the module temperature (MQT 11
measures it on the module), so a reading is the setpoint plus noise (sigma 0.3 degC, 1 % RH),
no control lag. Time is simulated: `ChamberRun(speed=...)` maps simulated seconds to wall
seconds, so a 200-cycle test (~570 h) takes 2 s of wall time at speed 1e6.

**Insulation and wet leakage testers** (`withstand_breakdown`, `insulation_resistance`,
`wet_leakage`; IEC 61215-2 MQT 03 and MQT 15). A sample's area-specific insulation resistance
(MOhm*m2, lognormal) divided by its area is its resistance: dry median 4000 MOhm*m2, wet
(immersed) median 800 MOhm*m2, sigma 1.0; 5 % of samples have an insulation defect (a cut
backsheet, a leaking junction box) that divides both by 200 and breaks down in the withstand
test. Against the standard's limit (R x area >= 40 MOhm*m2 above 0.1 m2) most pass dry and wet
and the defective ones fail. The reading's noise is sigma 2.5 % (a +-5 % class insulation
tester).
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass, replace

import numpy as np
import pvlib

DEFAULT_MODULE = "Canadian_Solar_Inc__CS6K_275M"  # 60 cells, 275 W, 1.62 m2
BOLTZMANN_EV_K = 8.617333262e-5

# --- degradation: rates (fraction of STC Pmax per unit dose at reference conditions), spreads
TC_LOSS_PER_CYCLE = 0.008 / 200  # median module, -40/+85 degC cycles
TC_SERIES_SHARE = 0.8  # the rest is photocurrent (cracked cell areas)
TC_SIGMA = 1.2
TC_REFERENCE_SWING_C = 125.0
COFFIN_MANSON_EXPONENT = 2.0
PID_LOSS_PER_HOUR = 0.010 / 96  # median module, -1000 V at 85 degC / 85 % RH
PID_REFERENCE_BIAS_V = 1000.0
PID_SIGMA = 1.3
DH_LOSS_PER_HOUR = 0.010 / 1000  # median module, 85 degC / 85 % RH
DH_SIGMA = 0.9
DH_INSULATION_TIME_CONSTANT_H = 3000.0
PECK_HUMIDITY_EXPONENT = 2.66
PECK_ACTIVATION_EV = 0.79
REFERENCE_TEMPERATURE_C = 85.0
REFERENCE_HUMIDITY_PCT = 85.0

# --- insulation (area-specific resistance, MOhm*m2)
INSULATION_DRY_MEDIAN = 4000.0
INSULATION_WET_MEDIAN = 800.0
INSULATION_SIGMA = 1.0
INSULATION_DEFECT_PROBABILITY = 0.05
INSULATION_DEFECT_FACTOR = 200.0

# --- climate chamber: IEC 61215-2 MQT 11 limits
MQT11_LOW_C = -40.0
MQT11_HIGH_C = 85.0
MQT11_MAX_RAMP_C_PER_H = 100.0
MQT11_MIN_DWELL_S = 600.0
MQT11_MAX_CYCLE_S = 6 * 3600.0
AMBIENT_C = 25.0
AMBIENT_RH_PCT = 50.0

# I-V sweep range, as fractions of Voc
SWEEP_START = -0.01
SWEEP_END = 1.02


def _rng(seed: int, *names: str) -> np.random.Generator:
    """A generator for one purpose of one sample: stable across processes and Python versions
    (crc32, not hash()), and independent per purpose, so adding a draw for one does not move
    the others."""
    return np.random.default_rng([int(seed)] + [zlib.crc32(name.encode()) for name in names])


# --- module database -----------------------------------------------------------------------

@functools.cache
def cec_modules():
    """pvlib's CEC module database (a pandas DataFrame, one column per module), read once."""
    return pvlib.pvsystem.retrieve_sam("CECMod")


@dataclass(frozen=True)
class ModuleType:
    """One CEC database entry: its datasheet values at STC and the single-diode reference
    parameters `calcparams_cec` takes."""

    name: str
    technology: str
    cells_in_series: int
    area_m2: float
    stc_pmax_w: float
    v_mp_ref: float
    i_mp_ref: float
    v_oc_ref: float
    i_sc_ref: float
    alpha_sc: float
    a_ref: float
    i_l_ref: float
    i_o_ref: float
    r_sh_ref: float
    r_s: float
    adjust: float

    @property
    def characteristic_resistance_ohm(self) -> float:
        return self.v_mp_ref / self.i_mp_ref


@functools.cache
def module_type(name: str = DEFAULT_MODULE) -> ModuleType:
    db = cec_modules()
    if name not in db.columns:
        raise KeyError(f"module {name!r} is not in pvlib's CEC module database")
    row = db[name]
    return ModuleType(
        name=name, technology=str(row["Technology"]), cells_in_series=int(row["N_s"]),
        area_m2=float(row["A_c"]), stc_pmax_w=float(row["STC"]),
        v_mp_ref=float(row["V_mp_ref"]), i_mp_ref=float(row["I_mp_ref"]),
        v_oc_ref=float(row["V_oc_ref"]), i_sc_ref=float(row["I_sc_ref"]),
        alpha_sc=float(row["alpha_sc"]), a_ref=float(row["a_ref"]),
        i_l_ref=float(row["I_L_ref"]), i_o_ref=float(row["I_o_ref"]),
        r_sh_ref=float(row["R_sh_ref"]), r_s=float(row["R_s"]), adjust=float(row["Adjust"]))


# --- module samples and their degradation -------------------------------------------------

@dataclass(frozen=True)
class Susceptibility:
    """A sample's seeded properties: multipliers (median 1) of each stress's damage rate, and
    its area-specific insulation resistance."""

    thermal_cycling: float
    pid: float
    damp_heat: float
    insulation_dry_mohm_m2: float
    insulation_wet_mohm_m2: float
    insulation_defect: bool


@dataclass(frozen=True)
class Degradation:
    """Accumulated damage; `series`, `shunt` and `photocurrent` each ~ the fraction of STC Pmax
    it costs (module docstring); `insulation` multiplies the insulation resistance."""

    series: float = 0.0
    shunt: float = 0.0
    photocurrent: float = 0.0
    insulation: float = 1.0


@dataclass(frozen=True)
class PVModule:
    sample_id: str
    type: ModuleType
    susceptibility: Susceptibility
    degradation: Degradation = Degradation()
    seed: int = 0

    @property
    def area_m2(self) -> float:
        return self.type.area_m2


def make_module(sample_id: str, module: str = DEFAULT_MODULE, seed: int = 0) -> PVModule:
    """A fresh sample of a CEC module type; its properties depend on (seed, sample_id) only."""
    rng = _rng(seed, sample_id, "susceptibility")
    tc, pid, dh = (float(rng.lognormal(0.0, sigma)) for sigma in (TC_SIGMA, PID_SIGMA, DH_SIGMA))
    dry, wet = (float(rng.lognormal(math.log(median), INSULATION_SIGMA))
                for median in (INSULATION_DRY_MEDIAN, INSULATION_WET_MEDIAN))
    defect = bool(rng.random() < INSULATION_DEFECT_PROBABILITY)
    if defect:
        dry /= INSULATION_DEFECT_FACTOR
        wet /= INSULATION_DEFECT_FACTOR
    return PVModule(sample_id, module_type(module),
                    Susceptibility(tc, pid, dh, dry, wet, defect), seed=seed)


def make_fleet(count: int, module: str = DEFAULT_MODULE, seed: int = 0,
               prefix: str = "S") -> list[PVModule]:
    """`count` samples of one type, ids `{prefix}001`..."""
    return [make_module(f"{prefix}{n:03d}", module, seed) for n in range(1, count + 1)]


def peck_factor(temperature_c: float, relative_humidity_pct: float) -> float:
    """Acceleration of humidity-driven damage relative to 85 degC / 85 % RH (Peck's model)."""
    if not 0 <= relative_humidity_pct <= 100:
        raise ValueError(f"relative humidity {relative_humidity_pct} % is not within 0-100 %")
    reference_k = REFERENCE_TEMPERATURE_C + 273.15
    kelvin = temperature_c + 273.15
    return ((relative_humidity_pct / REFERENCE_HUMIDITY_PCT) ** PECK_HUMIDITY_EXPONENT
            * math.exp(PECK_ACTIVATION_EV / BOLTZMANN_EV_K * (1 / reference_k - 1 / kelvin)))


def _damaged(module: PVModule, **added: float) -> PVModule:
    d = module.degradation
    insulation = added.pop("insulation_factor", 1.0)
    changed = {name: getattr(d, name) + value for name, value in added.items()}
    return replace(module, degradation=replace(d, insulation=d.insulation * insulation,
                                               **changed))


def thermal_cycling(module: PVModule, cycles: float, low_c: float = MQT11_LOW_C,
                    high_c: float = MQT11_HIGH_C) -> PVModule:
    """The sample after `cycles` thermal cycles between `low_c` and `high_c`."""
    if cycles < 0:
        raise ValueError(f"cycles must be >= 0, not {cycles}")
    if high_c <= low_c:
        raise ValueError(f"the high temperature {high_c} degC is not above the low {low_c} degC")
    equivalent = cycles * ((high_c - low_c) / TC_REFERENCE_SWING_C) ** COFFIN_MANSON_EXPONENT
    loss = TC_LOSS_PER_CYCLE * equivalent * module.susceptibility.thermal_cycling
    return _damaged(module, series=TC_SERIES_SHARE * loss,
                    photocurrent=(1 - TC_SERIES_SHARE) * loss)


def damp_heat(module: PVModule, hours: float, temperature_c: float = REFERENCE_TEMPERATURE_C,
              relative_humidity_pct: float = REFERENCE_HUMIDITY_PCT) -> PVModule:
    """The sample after `hours` of damp heat."""
    if hours < 0:
        raise ValueError(f"hours must be >= 0, not {hours}")
    dose = hours * peck_factor(temperature_c, relative_humidity_pct) \
        * module.susceptibility.damp_heat
    return _damaged(module, series=DH_LOSS_PER_HOUR * dose,
                    insulation_factor=math.exp(-dose / DH_INSULATION_TIME_CONSTANT_H))


def pid_stress(module: PVModule, hours: float, bias_voltage_v: float = -1000.0,
               temperature_c: float = REFERENCE_TEMPERATURE_C,
               relative_humidity_pct: float = REFERENCE_HUMIDITY_PCT) -> PVModule:
    """The sample after `hours` of damp heat with the cell circuit at `bias_voltage_v` against
    the frame (the damp heat's own damage included)."""
    stressed = damp_heat(module, hours, temperature_c, relative_humidity_pct)
    bias = max(0.0, -bias_voltage_v) / PID_REFERENCE_BIAS_V
    loss = (PID_LOSS_PER_HOUR * hours * bias * peck_factor(temperature_c, relative_humidity_pct)
            * module.susceptibility.pid)
    return _damaged(stressed, shunt=loss)


# --- I-V curve tracer ----------------------------------------------------------------------

@dataclass(frozen=True)
class TracerAccuracy:
    """Standard deviation of each reading: voltage as a fraction of Voc, current of Isc."""

    voltage_fraction: float = 0.001
    current_fraction: float = 0.001


NOISE_FREE = TracerAccuracy(0.0, 0.0)


@dataclass(frozen=True, eq=False)
class IVSweep:
    voltage_v: np.ndarray
    current_a: np.ndarray
    irradiance_w_m2: float
    cell_temperature_c: float


def diode_parameters(module: PVModule, irradiance_w_m2: float, cell_temperature_c: float):
    """(photocurrent, saturation current, Rs, Rsh, nNsVth) of the degraded sample at these
    conditions: the five arguments of pvlib's single-diode functions."""
    if not irradiance_w_m2 > 0:
        raise ValueError(f"irradiance must be > 0 W/m2, not {irradiance_w_m2}")
    t = module.type
    il, i0, rs, rsh, nnsvth = pvlib.pvsystem.calcparams_cec(
        float(irradiance_w_m2), float(cell_temperature_c), t.alpha_sc, t.a_ref, t.i_l_ref,
        t.i_o_ref, t.r_sh_ref, t.r_s, t.adjust)
    d = module.degradation
    r_ch = t.characteristic_resistance_ohm
    return (float(il) * math.exp(-d.photocurrent), float(i0), float(rs) + d.series * r_ch,
            1.0 / (1.0 / float(rsh) + d.shunt / r_ch), float(nnsvth))


def true_iv_parameters(module: PVModule, irradiance_w_m2: float = 1000.0,
                       cell_temperature_c: float = 25.0) -> dict[str, float]:
    """The sample's exact curve parameters (pvlib's singlediode), keyed as the analysis's."""
    sd = pvlib.pvsystem.singlediode(*diode_parameters(module, irradiance_w_m2,
                                                      cell_temperature_c))
    p, voc, isc = float(sd["p_mp"]), float(sd["v_oc"]), float(sd["i_sc"])
    return {"pmax_w": p, "vmp_v": float(sd["v_mp"]), "imp_a": float(sd["i_mp"]),
            "voc_v": voc, "isc_a": isc, "ff": p / (voc * isc)}


def iv_sweep(module: PVModule, irradiance_w_m2: float = 1000.0,
             cell_temperature_c: float = 25.0, points: int = 100, seed: int = 0,
             accuracy: TracerAccuracy = TracerAccuracy()) -> IVSweep:
    """One measured sweep of `points` readings, from just below 0 V to just beyond Voc."""
    if not 2 <= points <= 100_000:
        raise ValueError(f"points must be 2-100000, not {points}")
    params = diode_parameters(module, irradiance_w_m2, cell_temperature_c)
    voc = float(pvlib.pvsystem.v_from_i(0.0, *params))
    isc = float(pvlib.pvsystem.i_from_v(0.0, *params))
    v = np.linspace(SWEEP_START * voc, SWEEP_END * voc, points)
    i = np.asarray(pvlib.pvsystem.i_from_v(v, *params), dtype=float)
    rng = _rng(seed, module.sample_id, "iv")
    v_measured = v + rng.normal(0.0, accuracy.voltage_fraction * voc, points)
    i_measured = i + rng.normal(0.0, accuracy.current_fraction * isc, points)
    return IVSweep(v_measured, i_measured, float(irradiance_w_m2), float(cell_temperature_c))


# --- climate chamber -----------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ChamberProfile:
    """Setpoints linear between knots: at `times_s[k]` the module temperature is
    `temperature_c[k]` and the relative humidity `humidity_pct[k]` (NaN: not controlled)."""

    kind: str  # "thermal_cycling" or "damp_heat"
    times_s: np.ndarray
    temperature_c: np.ndarray
    humidity_pct: np.ndarray
    cycle_ends_s: np.ndarray  # thermal cycling: when each cycle ends
    bias_voltage_v: float = 0.0
    injection_current_a: float = 0.0  # thermal cycling: while the module is above
    inject_above_c: float = AMBIENT_C
    stress_start_s: float = 0.0  # damp heat: when the hold at the conditions begins
    stress_end_s: float = 0.0

    @property
    def duration_s(self) -> float:
        return float(self.times_s[-1])

    @property
    def cycles(self) -> int:
        return len(self.cycle_ends_s)

    def setpoint(self, t_s):
        """(temperature degC, humidity %RH or NaN) at time(s) `t_s`."""
        temperature = np.interp(t_s, self.times_s, self.temperature_c)
        humidity = np.interp(t_s, self.times_s, self.humidity_pct)
        return temperature, humidity

    def cycles_completed(self, t_s):
        return np.searchsorted(self.cycle_ends_s, t_s, side="right")

    def max_ramp_c_per_h(self) -> float:
        rates = np.abs(np.diff(self.temperature_c)) / np.diff(self.times_s) * 3600
        return float(rates.max())


def _ramp_s(from_c: float, to_c: float, ramp_c_per_h: float) -> float:
    return abs(to_c - from_c) / ramp_c_per_h * 3600


def thermal_cycling_profile(cycles: int = 200, low_c: float = MQT11_LOW_C,
                            high_c: float = MQT11_HIGH_C,
                            ramp_c_per_h: float = MQT11_MAX_RAMP_C_PER_H,
                            dwell_s: float = MQT11_MIN_DWELL_S,
                            injection_current_a: float = 0.0,
                            start_c: float = AMBIENT_C) -> ChamberProfile:
    """IEC 61215-2 MQT 11: from `start_c` up to `high_c`, dwell, down to `low_c`, dwell, back
    to `start_c`, `cycles` times. ValueError when the ramp, the dwell or the cycle time breaks
    the standard's limits."""
    if cycles < 1:
        raise ValueError(f"cycles must be >= 1, not {cycles}")
    if not low_c < start_c < high_c:
        raise ValueError(f"need low < start < high, not {low_c}, {start_c}, {high_c} degC")
    if not 0 < ramp_c_per_h <= MQT11_MAX_RAMP_C_PER_H:
        raise ValueError(f"ramp {ramp_c_per_h} degC/h is outside MQT 11's (0, "
                         f"{MQT11_MAX_RAMP_C_PER_H:g}] degC/h")
    if dwell_s < MQT11_MIN_DWELL_S:
        raise ValueError(f"dwell {dwell_s} s is shorter than MQT 11's {MQT11_MIN_DWELL_S:g} s")
    legs = [(high_c, _ramp_s(start_c, high_c, ramp_c_per_h)), (high_c, dwell_s),
            (low_c, _ramp_s(high_c, low_c, ramp_c_per_h)), (low_c, dwell_s),
            (start_c, _ramp_s(low_c, start_c, ramp_c_per_h))]
    cycle_s = sum(duration for _, duration in legs)
    if cycle_s > MQT11_MAX_CYCLE_S:
        raise ValueError(f"a cycle takes {cycle_s / 3600:.2f} h, longer than MQT 11's "
                         f"{MQT11_MAX_CYCLE_S / 3600:g} h")
    offsets = np.cumsum([0.0] + [duration for _, duration in legs])
    temps = np.array([start_c] + [temp for temp, _ in legs])
    times = (np.arange(cycles)[:, None] * cycle_s + offsets[None, 1:]).ravel()
    times = np.concatenate([[0.0], times])
    temperatures = np.concatenate([[start_c], np.tile(temps[1:], cycles)])
    return ChamberProfile("thermal_cycling", times, temperatures,
                          np.full(times.shape, np.nan), (np.arange(cycles) + 1) * cycle_s,
                          injection_current_a=float(injection_current_a))


def damp_heat_profile(duration_s: float, temperature_c: float = REFERENCE_TEMPERATURE_C,
                      relative_humidity_pct: float = REFERENCE_HUMIDITY_PCT,
                      bias_voltage_v: float = 0.0,
                      ramp_c_per_h: float = MQT11_MAX_RAMP_C_PER_H) -> ChamberProfile:
    """Damp heat (MQT 13: 85 degC / 85 % RH) or, with a bias, the PID stress: from ambient up
    to the conditions, held `duration_s` (the stress duration counts from there), back."""
    if not duration_s > 0:
        raise ValueError(f"duration must be > 0 s, not {duration_s}")
    if not 0 <= relative_humidity_pct <= 100:
        raise ValueError(f"relative humidity {relative_humidity_pct} % is not within 0-100 %")
    if not 0 < ramp_c_per_h <= MQT11_MAX_RAMP_C_PER_H:
        raise ValueError(f"ramp {ramp_c_per_h} degC/h is outside (0, "
                         f"{MQT11_MAX_RAMP_C_PER_H:g}] degC/h")
    ramp = max(_ramp_s(AMBIENT_C, temperature_c, ramp_c_per_h), 60.0)
    times = np.array([0.0, ramp, ramp + duration_s, 2 * ramp + duration_s])
    return ChamberProfile(
        "damp_heat", times, np.array([AMBIENT_C, temperature_c, temperature_c, AMBIENT_C]),
        np.array([AMBIENT_RH_PCT, relative_humidity_pct, relative_humidity_pct,
                  AMBIENT_RH_PCT]), np.array([]), bias_voltage_v=float(bias_voltage_v),
        stress_start_s=ramp, stress_end_s=ramp + duration_s)


@dataclass(frozen=True)
class ChamberAccuracy:
    temperature_c: float = 0.3  # sigma of a module temperature reading
    humidity_pct: float = 1.0  # sigma of a relative humidity reading


@dataclass(frozen=True)
class ChamberReading:
    t_s: float  # simulated time since the start
    setpoint_c: float
    temperature_c: float
    humidity_pct: float | None  # None: humidity not controlled (thermal cycling)
    cycles_completed: int
    injection_current_a: float
    bias_voltage_v: float
    stress_hours: float  # damp heat: time spent at the conditions so far


def chamber_readings(profile: ChamberProfile, sample_interval_s: float = 60.0, seed: int = 0,
                     accuracy: ChamberAccuracy = ChamberAccuracy()) -> dict[str, np.ndarray]:
    """Every reading of a whole run, one array per field of `ChamberReading` (humidity NaN when
    not controlled), one reading per `sample_interval_s` from 0 to the end inclusive."""
    if not sample_interval_s > 0:
        raise ValueError(f"the sample interval must be > 0 s, not {sample_interval_s}")
    t = np.arange(0.0, profile.duration_s, sample_interval_s)
    t = np.append(t, profile.duration_s)
    setpoint, humidity = profile.setpoint(t)
    rng = _rng(seed, profile.kind, "chamber")
    temperature = setpoint + rng.normal(0.0, accuracy.temperature_c, t.size)
    humidity = np.clip(humidity + rng.normal(0.0, accuracy.humidity_pct, t.size), 0.0, 100.0)
    injecting = setpoint > profile.inject_above_c
    stress_s = np.clip(t, profile.stress_start_s, profile.stress_end_s) - profile.stress_start_s
    return {"t_s": t, "setpoint_c": setpoint, "temperature_c": temperature,
            "humidity_pct": humidity, "cycles_completed": profile.cycles_completed(t),
            "injection_current_a": np.where(injecting, profile.injection_current_a, 0.0),
            "bias_voltage_v": np.full(t.shape, profile.bias_voltage_v),
            "stress_hours": stress_s / 3600.0}


class ChamberRun:
    """A run's readings paced in compressed time: `due(wall_elapsed_s)` returns the readings
    whose simulated time divided by `speed` has passed and were not returned before. The agent
    calls it as the wall clock runs; the readings (and their noise) are the same whatever the
    speed and however often it is called."""

    def __init__(self, profile: ChamberProfile, sample_interval_s: float = 60.0,
                 speed: float = 1.0, seed: int = 0,
                 accuracy: ChamberAccuracy = ChamberAccuracy()) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0, not {speed}")
        self.profile = profile
        self.speed = float(speed)
        self._readings = chamber_readings(profile, sample_interval_s, seed, accuracy)
        self._next = 0

    @property
    def wall_duration_s(self) -> float:
        return self.profile.duration_s / self.speed

    @property
    def done(self) -> bool:
        return self._next >= self._readings["t_s"].size

    def __len__(self) -> int:
        return int(self._readings["t_s"].size)

    def due(self, wall_elapsed_s: float) -> list[ChamberReading]:
        r = self._readings
        end = int(np.searchsorted(r["t_s"], wall_elapsed_s * self.speed, side="right"))
        out = []
        for k in range(self._next, end):
            humidity = float(r["humidity_pct"][k])
            out.append(ChamberReading(
                float(r["t_s"][k]), float(r["setpoint_c"][k]), float(r["temperature_c"][k]),
                None if math.isnan(humidity) else humidity, int(r["cycles_completed"][k]),
                float(r["injection_current_a"][k]), float(r["bias_voltage_v"][k]),
                float(r["stress_hours"][k])))
        self._next = max(self._next, end)
        return out


# --- insulation and wet leakage testers ----------------------------------------------------

@dataclass(frozen=True)
class InsulationReading:
    test_voltage_v: float
    insulation_resistance_mohm: float
    leakage_current_ua: float  # V / R: volts over megaohms is microamperes


@dataclass(frozen=True)
class WetLeakageReading(InsulationReading):
    solution_resistivity_ohm_cm: float
    solution_temperature_c: float


INSULATION_READING_SIGMA = 0.025  # relative


def withstand_breakdown(module: PVModule, voltage_v: float) -> bool:
    """MQT 03's dielectric withstand (1000 V + 2x the maximum system voltage for 1 min): a
    defective sample breaks down (or tracks), a sound one does not."""
    if not voltage_v > 0:
        raise ValueError(f"test voltage must be > 0 V, not {voltage_v}")
    return module.susceptibility.insulation_defect


def _insulation(module: PVModule, specific_mohm_m2: float, voltage_v: float, seed: int,
                purpose: str, sigma: float) -> tuple[float, float]:
    if not voltage_v > 0:
        raise ValueError(f"test voltage must be > 0 V, not {voltage_v}")
    true_mohm = specific_mohm_m2 * module.degradation.insulation / module.area_m2
    noise = _rng(seed, module.sample_id, purpose).normal(0.0, sigma)
    measured = true_mohm * max(0.01, 1.0 + noise)
    return measured, voltage_v / measured


def insulation_resistance(module: PVModule, voltage_v: float = 1000.0, seed: int = 0,
                          sigma: float = INSULATION_READING_SIGMA) -> InsulationReading:
    """MQT 03's insulation resistance between the shorted terminals and the frame (dry)."""
    r, current = _insulation(module, module.susceptibility.insulation_dry_mohm_m2, voltage_v,
                             seed, "insulation", sigma)
    return InsulationReading(float(voltage_v), r, current)


def wet_leakage(module: PVModule, voltage_v: float = 1000.0, seed: int = 0,
                sigma: float = INSULATION_READING_SIGMA) -> WetLeakageReading:
    """MQT 15: the same with the module immersed in a wetting solution (resistivity <= 3500
    Ohm*cm, 22 +- 3 degC; the simulated bath's are drawn within those limits)."""
    r, current = _insulation(module, module.susceptibility.insulation_wet_mohm_m2, voltage_v,
                             seed, "wet-leakage", sigma)
    bath = _rng(seed, module.sample_id, "wet-leakage-bath")
    return WetLeakageReading(float(voltage_v), r, current,
                             float(bath.uniform(2500.0, 3400.0)),
                             float(np.clip(bath.normal(22.0, 0.8), 19.5, 24.5)))
