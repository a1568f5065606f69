"""The SiLA 2 bridge against a real SiLA 2 server and the real broker: the thermostat simulator
(a sila2 server on the code sila2-codegen generated, `labbus agent sila2-sim`) on loopback with
TLS from a test CA, and the bridge (`labbus agent sila2`), both started as a user starts them
(sila2 must not be imported into the test process: see labbus.producers.sila), so either can be
stopped, restarted or killed -9. The device-lifecycle processor (`labbus process devices`) runs
too: the bridge executes only the commands it dispatched."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from labbus.deploy.demo import LABBUS
from labbus.events import kafka, pki
from labbus.events.codec import DecodeError, default_codec
from labbus.events.devices import reading_id
from labbus.events.model import CommandDispatched, CommandIssued, CommandRejected, derived_id
from labbus.events.runtime import Deliveries, Step
from labbus.events.topics import (
    COMMANDS,
    DEVICE_STATUS,
    DEVICES,
    MEASUREMENTS_RECORDED,
    topic_name,
)
from tests.conftest import REPO, Processes, free_port, read_topic, wait_for
from tests.support.process import Restartable

pytestmark = pytest.mark.services

DEVICE = f"thermo-{uuid.uuid4().hex[:6]}"


class Sim:
    """The SiLA 2 server; its log counts the SetTemperature executions."""

    def __init__(self, env, logdir) -> None:
        self.env, self.logdir = env, logdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.logs: list = []

    def start(self) -> None:
        self.logs.append(self.logdir / f"sim-{len(self.logs) + 1}.log")
        self.proc = subprocess.Popen(
            [LABBUS, "agent", "sila2-sim", "--port", str(self.port), "--ramp-rate", "10",
             "--interval", "0.2"],
            env={**self.env, "LABBUS_LOG_LEVEL": "INFO"}, stdout=open(self.logs[-1], "w"),
            stderr=subprocess.STDOUT, cwd=REPO)
        wait_for(lambda: "thermostat" in self.logs[-1].read_text(), 30, "the SiLA server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)

    def total_executions(self) -> int:
        return sum(p.read_text().count("SetTemperature executing") for p in self.logs)


class BridgeProc(Restartable):
    stop_timeout_s = 20

    def __init__(self, env, port: int, logdir) -> None:
        self.env, self.port, self.logdir = env, port, logdir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.logdir / f"bridge-{self.starts}.log", "w")
        self.proc = subprocess.Popen(
            [LABBUS, "agent", "sila2", "--server", f"127.0.0.1:{self.port}", "--device-id",
             DEVICE, "--heartbeat", "0.5", "--metrics-port", "-1"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)



@pytest.fixture(scope="module")
def rig(env, cfg, tmp_path_factory):
    pki_dir = tmp_path_factory.mktemp("pki")
    pki.init_ca(pki_dir)
    logdir = tmp_path_factory.mktemp("logs")
    env = {**env, "LABBUS_PKI_DIR": str(pki_dir)}
    # OFFLINE decided by the processor is not under test here (the bridge's own statuses are)
    lifecycle = Processes({**env, "LABBUS_OFFLINE_AFTER_INTERVALS": "60"}, logdir)
    lifecycle.start("process", "devices")
    sim = Sim(env, logdir)
    sim.start()
    bridge = BridgeProc({**env, "LABBUS_LOG_LEVEL": "INFO"}, sim.port, logdir)
    bridge.start()
    # the processor dispatches once it has heard of the device: probe until a command is
    # dispatched and the bridge answers it (it refuses it without touching the instrument)
    def probe():
        cid = issue(cfg, "Thermostat.Probe", {})
        return wait_for(lambda: [e.TYPE for e in command_events(cfg, cid)
                                 if e.TYPE != CommandIssued.TYPE], 60, "the probe's fate")
    wait_for(lambda: CommandDispatched.TYPE in probe(), 90, "the processor dispatching")
    wait_for(lambda: CommandRejected.TYPE in probe(), 90, "the bridge answering")
    yield sim, bridge
    bridge.stop()
    sim.stop()
    lifecycle.stop_all()


def events_of(cfg, spec, **match) -> list:
    codec = default_codec()
    out = []
    for r in asyncio.run(read_topic(cfg, topic_name(cfg, spec))):
        try:
            e = codec.decode(r.value)
        except DecodeError:
            continue  # other tests of the session put junk on the shared topics
        if getattr(e, "device_id", None) == DEVICE and all(
                getattr(e, k, None) == v for k, v in match.items()):
            out.append(e)
    return out


def command_events(cfg, command_id: str) -> list:
    """What happened to a command after it was issued (dispatched, then the bridge's events)."""
    return [e for e in events_of(cfg, COMMANDS, command_id=command_id)
            if e.TYPE != CommandIssued.TYPE]


def kinds(cfg, command_id: str) -> list[str]:
    return [e.TYPE.rsplit(".", 1)[1] for e in command_events(cfg, command_id)]


def issue(cfg, command_type: str, payload, key: str | None = None,
          command_id: str | None = None, as_dispatched: bool = False) -> str:
    """Publish a CommandIssued as the gateway's SendCommand does (same ids); `as_dispatched`:
    a CommandDispatched instead, as the lifecycle processor sends one again after a crash."""
    key = key or uuid.uuid4().hex
    cid = command_id or derived_id(f"device/{DEVICE}", f"command/{key}")
    cls = CommandDispatched if as_dispatched else CommandIssued
    event = cls.create(
        source="test", subject=DEVICE, sequence=0,
        event_id=uuid.UUID(derived_id(cid, "dispatched" if as_dispatched else "issued")),
        command_id=cid, device_id=DEVICE, idempotency_key=key, command_type=command_type,
        payload_json=payload if isinstance(payload, str) else json.dumps(payload),
        issued_by="test", expires_at=datetime.now(UTC) + timedelta(seconds=60))

    async def send() -> None:
        producer = kafka.producer(cfg)
        await producer.start()
        try:
            sent = Deliveries(producer, "test")
            await sent.send(Step(cfg, "test").encode(event))
            await sent.acked()
        finally:
            await producer.stop()

    asyncio.run(send())
    return cid


def final_of(cfg, cid: str, timeout: float = 20):
    finals = ("CommandCompleted", "CommandFailed", "CommandRejected")
    return wait_for(lambda: [e for e in command_events(cfg, cid)
                             if e.TYPE.rsplit(".", 1)[1] in finals],
                    timeout, f"a final state of {cid}")[0]


def test_registers_and_publishes_readings(rig, cfg):
    regs = wait_for(lambda: events_of(cfg, DEVICES), 30, "DeviceRegistered")
    reg = regs[-1]
    assert reg.device_type == "Thermostat" and reg.attributes["protocol"] == "sila2"
    specs = {s["metric"]: s for s in reg.specs}
    assert specs["Thermostat.CurrentTemperature"]["unit"] == "degC"
    assert (specs["Thermostat.CurrentTemperature"]["min"],
            specs["Thermostat.CurrentTemperature"]["max"]) == (-40.0, 150.0)
    assert specs["Thermostat.HeaterPower"]["unit"] == "%"
    assert "Thermostat.RampRate" not in specs  # not observable: not a reading
    readings = wait_for(lambda: (lambda rs: rs if len(rs) >= 10 else None)(
        [e for e in events_of(cfg, MEASUREMENTS_RECORDED)
         if e.metric == "Thermostat.CurrentTemperature"]), 20, "10 temperature readings")
    assert all(15 < r.value < 30 and r.unit == "degC" for r in readings)
    everything = events_of(cfg, MEASUREMENTS_RECORDED) + [
        e for e in events_of(cfg, DEVICE_STATUS) if e.envelope.source != "devices"]
    assert all(e.event_id == uuid.UUID(reading_id(DEVICE, e.envelope.sequence))
               for e in everything)
    assert len({e.envelope.sequence for e in everything}) == len(everything)
    status = [e for e in events_of(cfg, DEVICE_STATUS) if e.envelope.source != "devices"]
    assert [e.status for e in status if e.TYPE.endswith("StatusChanged")] == ["ONLINE"]
    assert any(e.TYPE.endswith("DeviceHeartbeat") for e in status)


def test_observable_command_reports_progress_and_result(rig, cfg):
    cid = issue(cfg, "Thermostat.SetTemperature", {"TargetTemperature": 30.0})
    done = final_of(cfg, cid)
    assert done.TYPE == "lab.command.CommandCompleted", done
    assert json.loads(done.result_json) == {"ReachedTemperature": 30.0}
    seen = kinds(cfg, cid)
    assert seen[:3] == ["CommandDispatched", "CommandAccepted", "CommandStarted"]
    assert seen[-1] == "CommandCompleted"
    progress = [e for e in command_events(cfg, cid) if e.TYPE.endswith("CommandProgress")]
    assert len(progress) >= 3 and seen[3:-1] == ["CommandProgress"] * len(progress)
    temps = [json.loads(p.intermediate_json)["CurrentTemperature"] for p in progress
             if p.intermediate_json]
    assert temps and temps == sorted(temps) and 21 <= temps[0] < temps[-1] <= 30.0
    assert progress[-1].progress == pytest.approx(1.0)


def test_unobservable_command(rig, cfg):
    def settled() -> float | None:  # an earlier test may have left the thermostat ramping
        values = [e.value for e in events_of(cfg, MEASUREMENTS_RECORDED)
                  if e.metric == "Thermostat.CurrentTemperature"][-3:]
        return values[-1] if len(values) == 3 and max(values) - min(values) < 0.1 else None

    reading = wait_for(settled, 60, "a steady temperature")
    cid = issue(cfg, "Calibrate", {"ReferenceTemperature": reading + 0.5})  # bare name works
    done = final_of(cfg, cid)
    assert done.TYPE == "lab.command.CommandCompleted", done
    assert json.loads(done.result_json)["Offset"] == pytest.approx(0.5, abs=0.1)
    assert kinds(cfg, cid) == [
        "CommandDispatched", "CommandAccepted", "CommandStarted", "CommandCompleted"]


@pytest.mark.parametrize("command_type, payload, expect", [
    ("Thermostat.SetTemperature", {"TargetTemperature": 110.0},
     "DefinedExecutionError: HeaterFault: target 110.0"),
    ("Thermostat.SetTemperature", {"TargetTemperature": 500.0},
     "ValidationError: Parameter value rejected: Constraint violated: MaximalInclusive(120.0)"),
    ("Thermostat.Calibrate", {"ReferenceTemperature": 90.0},
     "DefinedExecutionError: CalibrationOutOfRange"),
])
def test_sila_errors_fail_the_command(rig, cfg, command_type, payload, expect):
    cid = issue(cfg, command_type, payload)
    failed = final_of(cfg, cid)
    assert failed.TYPE == "lab.command.CommandFailed", failed
    assert failed.error.startswith(expect), failed.error


@pytest.mark.parametrize("command_type, payload, code, text, by", [
    ("Thermostat.Explode", {}, "unknown_command_type", "no command 'Thermostat.Explode'",
     "bridge"),
    ("Thermostat.SetTemperature", {"Target": 30}, "invalid_payload",
     "missing ['TargetTemperature'], unknown ['Target']", "bridge"),
    ("Thermostat.SetTemperature", "[1, 2]", "bad_payload", "must be a JSON object",
     "processor"),  # never dispatched: the bridge never sees it
])
def test_commands_it_cannot_map_are_rejected(rig, cfg, command_type, payload, code, text, by):
    sim, _ = rig
    before = sim.total_executions()
    cid = issue(cfg, command_type, payload)
    rejected = final_of(cfg, cid)
    assert rejected.TYPE == "lab.command.CommandRejected", rejected
    assert rejected.reason_code == code and text in rejected.reason, rejected.reason
    expected = ["CommandDispatched", "CommandRejected"] if by == "bridge" else ["CommandRejected"]
    assert kinds(cfg, cid) == expected
    assert sim.total_executions() == before


def test_a_command_id_is_never_executed_twice(rig, cfg):
    sim, bridge = rig
    # a command already final, issued again: nothing happens
    done_cid = issue(cfg, "SetTemperature", {"TargetTemperature": 25.0}, key="twice")
    assert final_of(cfg, done_cid).TYPE == "lab.command.CommandCompleted"
    before = sim.total_executions()
    issue(cfg, "SetTemperature", {"TargetTemperature": 25.0}, key="twice")
    # a slow one, and the bridge killed while the server runs it
    slow = issue(cfg, "SetTemperature", {"TargetTemperature": 60.0})
    wait_for(lambda: any(e.TYPE.endswith("CommandProgress") for e in command_events(cfg, slow)),
             20, "the slow command to progress")
    assert sim.total_executions() == before + 1
    bridge.kill9()
    bridge.start()
    # the restarted bridge first waits out the killed member's session (10 s) to get its
    # partitions back; on a loaded machine with TLS that took over 30 s once
    failed = final_of(cfg, slow, timeout=90)
    assert failed.TYPE == "lab.command.CommandFailed" and failed.error.startswith(
        "interrupted"), failed
    # after the restart, the completed one dispatched again (as the lifecycle processor does
    # when it crashed before recording the dispatch): the bridge remembers it, still nothing
    issue(cfg, "SetTemperature", {"TargetTemperature": 25.0}, key="twice", as_dispatched=True)
    marker = issue(cfg, "Calibrate", {"ReferenceTemperature": 500.0},  # handled after the above
                   as_dispatched=True)
    final_of(cfg, marker, timeout=90)
    assert sim.total_executions() == before + 1
    assert len([e for e in command_events(cfg, done_cid)
                if e.TYPE.endswith("CommandCompleted")]) == 1
    assert len([e for e in command_events(cfg, slow) if e.TYPE.endswith("Failed")]) == 1


def test_server_down_is_offline_and_back_is_online(rig, cfg):
    sim, _ = rig

    def statuses():  # as the bridge reports them
        return [e.status for e in events_of(cfg, DEVICE_STATUS)
                if e.TYPE.endswith("StatusChanged") and e.envelope.source != "devices"]

    wait_for(lambda: statuses()[-1:] == ["ONLINE"], 30, "ONLINE")
    time.sleep(0.5)
    sim.stop()
    wait_for(lambda: statuses()[-1:] == ["OFFLINE"], 15, "OFFLINE")
    offline_at = len(statuses()) - 1
    offline = [e for e in events_of(cfg, DEVICE_STATUS) if e.TYPE.endswith("StatusChanged")
               and e.envelope.source != "devices"][-1]
    assert f"127.0.0.1:{sim.port}" in offline.reason
    sim.start()
    wait_for(lambda: statuses()[-1:] == ["ONLINE"], 20, "ONLINE again")
    time.sleep(1)
    assert statuses()[offline_at:] == ["OFFLINE", "ONLINE"]  # no flapping
    n = len(events_of(cfg, MEASUREMENTS_RECORDED))
    wait_for(lambda: len(events_of(cfg, MEASUREMENTS_RECORDED)) > n + 3, 15,
             "readings after the restart")
