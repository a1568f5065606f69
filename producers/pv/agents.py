"""Simulated PV test instruments as labbus devices (`labbus agent pv --devices ...`).

One process runs a fleet of devices of four types, each a device like any other on the bus:
it registers (DeviceRegistered, with its measurement specs), heartbeats (DeviceHeartbeat every
`heartbeat_s`; the device processor sets it ONLINE/OFFLINE), and answers the commands the
device processor dispatched to it (CommandDispatched on lab.commands) with CommandAccepted,
CommandStarted, its readings (MeasurementRecorded), then CommandCompleted — or CommandRejected
(a command type it does not have) or CommandFailed (a payload it cannot run). Commands reach a
device through the kernel's `run_consumer`, one consumer group per device
(`agent-pv.<device id>`), as the SiLA 2 bridge does: the input offset is committed only after
every output is acknowledged, and a device runs one command at a time.

    device type          command                      readings (metric, unit)
    iv-curve-tracer      sweep                        voltage V, current A (one pair per point)
    climate-chamber      thermal_cycle                module_temperature degC (the lowest and
                                                      highest of each cycle), cycles_completed 1
    climate-chamber      damp_heat_bias               chamber_temperature degC, relative_humidity
                                                      %RH (hourly), stress_duration h
    insulation-tester    withstand                    breakdown 1 (1: broke down)
    insulation-tester    insulation_resistance        insulation_resistance MOhm
    wet-leakage-tester   wet_insulation_resistance    insulation_resistance MOhm,
                                                      solution_resistivity Ohm*cm,
                                                      solution_temperature degC

The physics is `producers.pv.models` (pvlib). Every command's payload names the module under
test (`sample_id`, `module_type`: a CEC module name; the testing processor adds both); the
samples' degradation is kept per sample id in the agent process (`Samples`), shared by its
devices, so the thermal cycles a chamber ran degrade the module the tracer sweeps afterwards.
A sample's properties depend only on (seed, sample id) (`models.make_module`): the same seed
and sample id fail or pass the same way on every run. Time is compressed by
LABBUS_TESTING_SPEED (a 200-cycle run, ~570 h, takes 2 s at 1e6 (`models.ChamberRun`)).

Correlation (what the testing processor relies on): every answer and every reading carries the
dispatched command's correlation id; readings carry the CommandDispatched's event id as their
causation id; the completion's `result_json` announces the readings published,
`{"readings": {metric: count}, ...}`. Ids derive from the command id, so a command answered
again after a crash (the offset not committed) repeats the same events.

Limits: the samples' degradation lives in this process only (a restarted agent starts from
fresh modules); a command re-delivered after a crash runs again (its events have the same ids,
but the stress is applied again to the in-memory sample).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from labbus.events import kafka
from labbus.events.config import Config
from labbus.events.devices import commands_horizon_ms, registrations
from labbus.events.model import (
    CommandAccepted,
    CommandCompleted,
    CommandDispatched,
    CommandFailed,
    CommandRejected,
    CommandStarted,
    DeviceHeartbeat,
    DeviceRegistered,
    Event,
    MeasurementRecorded,
    derived_id,
    utcnow,
)
from labbus.events.runtime import Backoff, Deliveries, Step, retrying, run_consumer
from labbus.events.topics import COMMANDS
from labbus.producers.pv import models

log = logging.getLogger(__name__)

PROCESS = "agent-pv"

# device type -> (model, {metric: (unit, min, max)}, commands)
DEVICE_TYPES: dict[str, tuple[str, dict[str, tuple[str, float, float]], tuple[str, ...]]] = {
    "iv-curve-tracer": ("IVT-sim (pvlib single diode)",
                        {"voltage": ("V", -50.0, 1500.0), "current": ("A", -5.0, 50.0)},
                        ("sweep",)),
    "climate-chamber": ("CC-sim (MQT 11 / MQT 13 / TS 62804-1)",
                        {"module_temperature": ("degC", -70.0, 150.0),
                         "cycles_completed": ("1", 0.0, 10_000.0),
                         "chamber_temperature": ("degC", -70.0, 150.0),
                         "relative_humidity": ("%RH", 0.0, 100.0),
                         "stress_duration": ("h", 0.0, 100_000.0)},
                        ("thermal_cycle", "damp_heat_bias")),
    "insulation-tester": ("IT-sim (MQT 03)",
                          {"breakdown": ("1", 0.0, 1.0),
                           "insulation_resistance": ("MOhm", 0.0, 1e9)},
                          ("withstand", "insulation_resistance")),
    "wet-leakage-tester": ("WLT-sim (MQT 15)",
                           {"insulation_resistance": ("MOhm", 0.0, 1e9),
                            "solution_resistivity": ("Ohm*cm", 0.0, 10_000.0),
                            "solution_temperature": ("degC", 0.0, 50.0)},
                           ("wet_insulation_resistance",)),
}


class PayloadError(ValueError):
    """A command payload the instrument cannot run (CommandFailed with this message)."""


def parse_devices(spec: str, prefix: str = "pv") -> list[tuple[str, str]]:
    """"iv-curve-tracer:2,climate-chamber:1" -> [(device id, type)], ids `<prefix>-<type>-<n>`.
    ValueError naming the problem."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        kind, _, count = part.partition(":")
        if kind not in DEVICE_TYPES:
            raise ValueError(f"unknown PV device type {kind!r} (known: "
                             f"{', '.join(DEVICE_TYPES)})")
        try:
            n = int(count or "1")
        except ValueError:
            raise ValueError(f"{part!r}: the count after ':' must be a whole number") from None
        if not 1 <= n <= 100:
            raise ValueError(f"{part!r}: 1 to 100 devices of a type")
        out.extend((f"{prefix}-{kind}-{i}", kind) for i in range(1, n + 1))
    if not out:
        raise ValueError("no devices given")
    return out


@dataclass
class Samples:
    """The modules under test, by sample id: their degradation accumulates across commands."""

    seed: int = 0
    modules: dict[str, models.PVModule] = field(default_factory=dict)

    def get(self, payload: dict) -> models.PVModule:
        sample = payload.get("sample_id")
        if not isinstance(sample, str) or not sample:
            raise PayloadError("the payload names no sample_id (the module under test)")
        if sample not in self.modules:
            module_type = payload.get("module_type") or models.DEFAULT_MODULE
            try:
                self.modules[sample] = models.make_module(sample, str(module_type), self.seed)
            except KeyError as e:
                raise PayloadError(str(e.args[0])) from None
        return self.modules[sample]

    def put(self, module: models.PVModule) -> None:
        self.modules[module.sample_id] = module


def _number(payload: dict, name: str, default: float | None = None) -> float:
    value = payload.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PayloadError(f"payload {name} = {value!r} is not a number")
    return float(value)


Reading = tuple[str, float]  # (metric, value)


def run_command(kind: str, command: str, payload: dict, samples: Samples, noise_seed: int
                ) -> tuple[float, list[Reading], dict]:
    """What an instrument does for one command: (simulated duration s, readings in order,
    result). Pure but for `samples` (the module's degradation after a stress). PayloadError or
    ValueError (from the models) for what it cannot run."""
    module = samples.get(payload)
    if kind == "iv-curve-tracer" and command == "sweep":
        points = int(_number(payload, "points", 100))
        sweep = models.iv_sweep(module, _number(payload, "irradiance_w_m2", 1000.0),
                                _number(payload, "cell_temperature_c", 25.0), points,
                                seed=noise_seed)
        readings = []
        for v, i in zip(sweep.voltage_v, sweep.current_a, strict=True):
            readings += [("voltage", float(v)), ("current", float(i))]
        return 1.0 * points, readings, {}
    if kind == "climate-chamber" and command == "thermal_cycle":
        cycles = int(_number(payload, "cycles", 200))
        low, high = _number(payload, "low_c", -40.0), _number(payload, "high_c", 85.0)
        profile = models.thermal_cycling_profile(
            cycles, low, high, ramp_c_per_h=_number(payload, "max_ramp_c_per_h", 100.0),
            dwell_s=_number(payload, "min_dwell_s", 600.0),
            injection_current_a=_number(payload, "injection_current_a", 0.0))
        r = models.chamber_readings(profile, 60.0, seed=noise_seed)
        cycle = np.searchsorted(profile.cycle_ends_s, r["t_s"], side="left")
        readings = []
        for k in range(profile.cycles):  # each cycle's lowest and highest module temperature
            temps = r["temperature_c"][cycle == k]
            readings += [("module_temperature", float(temps.min())),
                         ("module_temperature", float(temps.max()))]
        done = int(profile.cycles_completed(profile.duration_s))
        readings.append(("cycles_completed", float(done)))
        samples.put(models.thermal_cycling(module, done, low, high))
        return profile.duration_s, readings, {"cycles": done}
    if kind == "climate-chamber" and command == "damp_heat_bias":
        duration = _number(payload, "duration_s")
        temperature = _number(payload, "temperature_c", 85.0)
        humidity = _number(payload, "relative_humidity_pct", 85.0)
        bias = _number(payload, "bias_voltage_v", 0.0)
        profile = models.damp_heat_profile(duration, temperature, humidity, bias)
        r = models.chamber_readings(profile, 3600.0, seed=noise_seed)
        readings = []
        for t, h in zip(r["temperature_c"], r["humidity_pct"], strict=True):
            readings += [("chamber_temperature", float(t)), ("relative_humidity", float(h))]
        hours = float(r["stress_hours"][-1])
        readings.append(("stress_duration", hours))
        samples.put(models.pid_stress(module, hours, bias, temperature, humidity))
        return profile.duration_s, readings, {"stress_hours": hours}
    if kind == "insulation-tester" and command == "withstand":
        broke = models.withstand_breakdown(module, _number(payload, "voltage_v"))
        return _number(payload, "hold_s", 60.0), [("breakdown", 1.0 if broke else 0.0)], {}
    if kind == "insulation-tester" and command == "insulation_resistance":
        ir = models.insulation_resistance(module, _number(payload, "voltage_v", 1000.0),
                                          seed=noise_seed)
        return (_number(payload, "hold_s", 120.0),
                [("insulation_resistance", ir.insulation_resistance_mohm)],
                {"leakage_current_ua": ir.leakage_current_ua})
    if kind == "wet-leakage-tester" and command == "wet_insulation_resistance":
        wl = models.wet_leakage(module, _number(payload, "voltage_v", 1000.0), seed=noise_seed)
        return (_number(payload, "hold_s", 120.0),
                [("insulation_resistance", wl.insulation_resistance_mohm),
                 ("solution_resistivity", wl.solution_resistivity_ohm_cm),
                 ("solution_temperature", wl.solution_temperature_c)],
                {"leakage_current_ua": wl.leakage_current_ua})
    raise LookupError(f"a {kind} has no command {command!r} (it has: "
                      f"{', '.join(DEVICE_TYPES[kind][2])})")


@dataclass
class Device:
    device_id: str
    kind: str
    last_seq: int = 0

    @property
    def source(self) -> str:
        return f"pv/{self.device_id}"

    def sequence(self) -> int:
        self.last_seq = max(self.last_seq + 1, time.time_ns() // 1000)
        return self.last_seq

    def registration(self, heartbeat_s: float) -> DeviceRegistered:
        model, metrics, commands = DEVICE_TYPES[self.kind]
        specs = [{"metric": m, "unit": u, "min": lo, "max": hi, "expected_interval_s": 3600.0}
                 for m, (u, lo, hi) in metrics.items()]
        attributes = {"simulated": "true", "heartbeat_interval_s": f"{heartbeat_s:g}",
                      "commands": ",".join(commands)}
        content = json.dumps([self.kind, model, attributes, specs], sort_keys=True)
        return DeviceRegistered.create(
            source=self.source, subject=self.device_id, sequence=self.sequence(),
            event_id=uuid.UUID(derived_id(f"device/{self.device_id}", f"registered/{content}")),
            device_id=self.device_id, device_type=self.kind, model=model, location="pv-lab",
            metrics=list(metrics), attributes=attributes, specs=specs, spec_version=1)


class Commands:
    """The run_consumer handler of one device: its CommandDispatched → the instrument's
    answers (module docstring)."""

    def __init__(self, device: Device, samples: Samples, speed: float, seed: int) -> None:
        self.d = device
        self.samples = samples
        self.speed = speed
        self.seed = seed
        self.accepts = {CommandDispatched.TYPE}

    def _event(self, cls: type[Event], cmd: CommandDispatched, purpose: str, **payload: Any
               ) -> Event:
        return cls.create(source=self.d.source, subject=self.d.device_id,
                          sequence=self.d.sequence(),
                          event_id=uuid.UUID(derived_id(cmd.command_id, purpose)),
                          correlation_id=cmd.envelope.correlation_id,
                          causation_id=cmd.event_id, command_id=cmd.command_id,
                          device_id=self.d.device_id, **payload)

    async def __call__(self, cmd: CommandDispatched, _record: Any) -> AsyncIterator[Event]:
        if cmd.device_id != self.d.device_id:
            return
        if cmd.expires_at <= utcnow():
            log.info("command expired before it reached the device",
                     extra={"command": cmd.command_id, "device": self.d.device_id})
            return
        if cmd.command_type not in DEVICE_TYPES[self.d.kind][2]:
            yield self._event(CommandRejected, cmd, "rejected",
                              reason_code="unknown_command_type",
                              reason=f"a {self.d.kind} has no command {cmd.command_type!r}")
            return
        yield self._event(CommandAccepted, cmd, "accepted")
        yield self._event(CommandStarted, cmd, "started")
        try:
            payload = json.loads(cmd.payload_json or "{}")
            if not isinstance(payload, dict):
                raise PayloadError("the payload is not a JSON object")
            noise = (self.seed * 1_000_003 + zlib.crc32(cmd.command_id.encode())) % 2**31
            duration_s, readings, result = run_command(self.d.kind, cmd.command_type, payload,
                                                       self.samples, noise)
        except (ValueError, LookupError) as e:
            yield self._event(CommandFailed, cmd, "failed", error=str(e))
            return
        await asyncio.sleep(min(duration_s / self.speed, 3600.0))
        counts: dict[str, int] = {}
        units = DEVICE_TYPES[self.d.kind][1]
        for k, (metric, value) in enumerate(readings):
            counts[metric] = counts.get(metric, 0) + 1
            yield MeasurementRecorded.create(
                source=self.d.source, subject=self.d.device_id, sequence=self.d.sequence(),
                event_id=uuid.UUID(derived_id(cmd.command_id, f"reading/{k}")),
                correlation_id=cmd.envelope.correlation_id, causation_id=cmd.event_id,
                device_id=self.d.device_id, metric=metric, value=value,
                unit=units[metric][0])
        yield self._event(CommandCompleted, cmd, "completed", result_json=json.dumps(
            {"readings": counts, "simulated_s": duration_s, **result}, sort_keys=True))


async def heartbeats(cfg: Config, devices: list[Device], producer: Any, step: Step,
                     heartbeat_s: float, stop: asyncio.Event) -> None:
    backoff = Backoff(PROCESS, "kafka")
    while not stop.is_set():
        async def send() -> None:
            sent = Deliveries(producer, PROCESS)
            for d in devices:
                await sent.send(step.encode(DeviceHeartbeat.create(
                    source=d.source, subject=d.device_id, sequence=d.sequence(),
                    device_id=d.device_id, gateway="agent-pv")))
            await sent.acked()

        await retrying(send, backoff, stop)
        try:
            await asyncio.wait_for(stop.wait(), heartbeat_s)
        except TimeoutError:
            pass


async def run(cfg: Config, stop: asyncio.Event, devices: str = "iv-curve-tracer:1,"
              "climate-chamber:1,insulation-tester:1,wet-leakage-tester:1", prefix: str = "pv",
              seed: int = 0, heartbeat_s: float = 2.0) -> None:
    """`labbus agent pv`: register the devices, heartbeat, answer their commands until stop."""
    fleet = [Device(device_id, kind) for device_id, kind in parse_devices(devices, prefix)]
    samples = Samples(seed)
    step = Step(cfg, PROCESS)
    backoff = Backoff(PROCESS, "kafka")
    await retrying(lambda: kafka.ensure_topics(cfg), backoff, stop)
    producer = kafka.producer(cfg)
    await retrying(producer.start, backoff, stop)
    try:
        # before registering: a device new to the bus starts its commands at now
        known = await retrying(lambda: registrations(cfg, [d.device_id for d in fleet]),
                               backoff, stop)
        horizon = {d.device_id: commands_horizon_ms(
            cfg, known[d.device_id].first_ms if d.device_id in known else None) for d in fleet}

        async def register() -> None:
            sent = Deliveries(producer, PROCESS)
            for d in fleet:
                await sent.send(step.encode(d.registration(heartbeat_s)))
            await sent.acked()

        await retrying(register, backoff, stop)
        log.info("registered", extra={"devices": [d.device_id for d in fleet]})
        tasks = [asyncio.create_task(heartbeats(cfg, fleet, producer, step, heartbeat_s, stop))]
        for d in fleet:
            handler = Commands(d, samples, cfg.testing_speed, seed)
            tasks.append(asyncio.create_task(run_consumer(
                cfg, f"{PROCESS}.{d.device_id}", [COMMANDS], handler, stop,
                accepts=handler.accepts, max_records=1,
                first_run_since_ms=horizon[d.device_id])))
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise r
    finally:
        await producer.stop()
