"""The device-lifecycle processor (`labbus process devices`) against real Kafka: a test-side
device publishes registrations, heartbeats and command updates straight to the topics, operators
use `labbus command send`, and the processor's decisions are read back from the topics."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from labbus.events import kafka
from labbus.events.codec import default_codec
from labbus.events.model import (
    CommandAccepted,
    CommandCompleted,
    CommandDispatched,
    CommandFailed,
    CommandProgress,
    CommandStarted,
    DeviceHeartbeat,
    DeviceRegistered,
    command_id_for,
)
from labbus.events.runtime import Step
from labbus.events.topics import COMMANDS, DEVICE_STATUS, topic_name
from tests.conftest import LABBUS, REPO, Processes, read_topic, run, wait_for

INTERVAL_S = 0.4  # heartbeat interval the test devices register; offline after 3 of them


@pytest.fixture(scope="module")
def devices(env, tmp_path_factory):
    # a static name (LABBUS_GROUP_INSTANCE_ID): the processor restarted after a kill -9
    # (test_a_restart_keeps_state_from_the_changelog) takes its partitions back at once
    procs = Processes({**env, "LABBUS_OFFLINE_AFTER_INTERVALS": "3",
                       "LABBUS_GROUP_INSTANCE_ID": "devices-0"},
                      tmp_path_factory.mktemp("devices"))
    proc = procs.start("process", "devices")
    yield procs, proc
    procs.stop_all()


async def publish(cfg, *events) -> None:
    await kafka.ensure_topics(cfg)
    producer = kafka.producer(cfg)
    await producer.start()
    try:
        step = Step(cfg, "test")
        outs = [step.encode(e) for e in events]
        await asyncio.gather(*[await producer.send(o.topic, o.value, key=o.key) for o in outs])
    finally:
        await producer.stop()


def register(cfg, device: str, dtype: str = "spectrophotometer",
             interval: float | None = INTERVAL_S) -> None:
    attrs = {"heartbeat_interval_s": str(interval)} if interval else {}
    run(publish(cfg, DeviceRegistered.create(
        source="test", subject=device, sequence=1, device_id=device, device_type=dtype,
        model="m", location="lab", metrics=[], attributes=attrs, specs=[], spec_version=1)))


def heartbeat(cfg, device: str) -> None:
    run(publish(cfg, DeviceHeartbeat.create(source="test", subject=device,
                                            sequence=time.time_ns() // 1000, device_id=device,
                                            gateway="test")))


def events_of(cfg, spec, device: str) -> list:
    codec = default_codec()
    out = []
    for r in run(read_topic(cfg, topic_name(cfg, spec))):
        if r.key == device.encode():
            out.append(codec.decode(r.value))
    return out


def statuses(cfg, device: str) -> list[str]:
    return [e.status for e in events_of(cfg, DEVICE_STATUS, device)
            if e.TYPE == "lab.device.DeviceStatusChanged"]


def command_events(cfg, device: str, command_id: str | None = None) -> list:
    return [e for e in events_of(cfg, COMMANDS, device)
            if command_id is None or e.command_id == command_id]


def online_device(cfg, prefix: str = "spec", interval: float | None = INTERVAL_S) -> str:
    device = f"{prefix}-{uuid.uuid4().hex[:6]}"
    register(cfg, device, interval=interval)
    heartbeat(cfg, device)
    wait_for(lambda: statuses(cfg, device) == ["ONLINE"], 60, f"{device} ONLINE")
    return device


def send(env, device, ctype, payload, *more, wait=True) -> subprocess.Popen:
    args = [LABBUS, "command", "send", device, ctype, "--payload", json.dumps(payload), *more]
    return subprocess.Popen(args + (["--wait"] if wait else []), env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def answer(cfg, device: str, command_id: str, final) -> None:
    common = dict(source="test", subject=device, command_id=command_id, device_id=device)
    run(publish(cfg, CommandAccepted.create(sequence=1, **common),
                CommandStarted.create(sequence=2, progress=0.5, **common),
                final.create(sequence=3, **common, **(
                    {"result_json": '{"absorbance": 0.8}'} if final is CommandCompleted
                    else {"error": "lamp failure"}))))


def test_online_offline_online(cfg, devices):
    device = online_device(cfg)
    beat_until = time.monotonic() + 2  # heartbeats on time: stays ONLINE
    while time.monotonic() < beat_until:
        heartbeat(cfg, device)
        time.sleep(INTERVAL_S / 2)
    assert statuses(cfg, device) == ["ONLINE"]
    stopped = time.monotonic()
    wait_for(lambda: statuses(cfg, device) == ["ONLINE", "OFFLINE"], 15, "OFFLINE")
    took = time.monotonic() - stopped
    assert took >= 3 * INTERVAL_S * 0.8, took
    heartbeat(cfg, device)
    wait_for(lambda: statuses(cfg, device) == ["ONLINE", "OFFLINE", "ONLINE"], 15, "ONLINE again")
    time.sleep(1.5)  # the OFFLINE decision is one event, not one per tick
    assert statuses(cfg, device)[:3] == ["ONLINE", "OFFLINE", "ONLINE"]
    off = [e for e in events_of(cfg, DEVICE_STATUS, device)
           if getattr(e, "status", None) == "OFFLINE"]
    # (the device may be OFFLINE again by now: silent since the last heartbeat; that is
    # another decision, on another heartbeat)
    first = [e for e in off if e.envelope.causation_id == off[0].envelope.causation_id]
    assert len(first) == 1 and "no heartbeat" in off[0].reason


def _keep_alive(cfg, device, seconds):
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        heartbeat(cfg, device)
        time.sleep(INTERVAL_S / 2)


def test_command_happy_path_failure_timeout_with_command_send(cfg, env, devices):
    device = online_device(cfg, interval=None)  # never times out: no heartbeats needed
    ok = send(env, device, "measure", {"wavelength_nm": 600}, "--idempotency-key", "ok")
    fail = send(env, device, "measure", {"wavelength_nm": 650}, "--idempotency-key", "fail")
    late = send(env, device, "measure", {"wavelength_nm": 700}, "--idempotency-key", "late",
                "--timeout", "1s")
    ok_id, fail_id = command_id_for(device, "ok"), command_id_for(device, "fail")
    wait_for(lambda: {ok_id, fail_id} <= {e.command_id for e in command_events(cfg, device)},
             60, "the commands issued")
    answer(cfg, device, ok_id, CommandCompleted)
    answer(cfg, device, fail_id, CommandFailed)
    out, err = ok.communicate(timeout=60)
    assert ok.returncode == 0, err
    assert out.splitlines()[0] == ok_id and "completed" in out
    out, err = fail.communicate(timeout=60)
    assert fail.returncode == 1 and "failed: lamp failure" in out
    out, err = late.communicate(timeout=60)
    assert late.returncode == 1 and "timed out" in out
    late_events = [type(e).__name__ for e in command_events(cfg, device,
                                                             command_id_for(device, "late"))]
    assert late_events == ["CommandIssued", "CommandDispatched", "CommandTimedOut"]
    time.sleep(1.5)  # a completed command is never timed out
    assert "CommandTimedOut" not in {type(e).__name__ for e in command_events(cfg, device, ok_id)}


def test_rejections_and_idempotency(cfg, env, devices):
    device = online_device(cfg, interval=None)
    silent = f"spec-{uuid.uuid4().hex[:6]}"
    register(cfg, silent)  # registered, never heard from
    cases = {
        "unknown": send(env, f"ghost-{uuid.uuid4().hex[:6]}", "measure", {"wavelength_nm": 600}),
        "offline": send(env, silent, "measure", {"wavelength_nm": 600}),
        "bad": send(env, device, "measure", {"wavelength_nm": 5}),
        "type": send(env, device, "explode", {}),
    }
    results = {k: p.communicate(timeout=60) + (p.returncode,) for k, p in cases.items()}
    for name, code in [("unknown", "unknown_device"), ("offline", "device_offline"),
                       ("bad", "bad_payload"), ("type", "unknown_command_type")]:
        out, err, rc = results[name]
        assert rc == 1 and f"rejected ({code})" in out, (name, out, err)
    assert "wavelength_nm" in results["bad"][0]
    # the same key twice: one command; the same key with another payload: refused
    first = send(env, device, "measure", {"wavelength_nm": 600}, "--idempotency-key", "dup",
                 wait=False)
    assert first.wait(60) == 0
    again = send(env, device, "measure", {"wavelength_nm": 600}, "--idempotency-key", "dup",
                 wait=False)
    assert again.wait(60) == 0
    other = send(env, device, "measure", {"wavelength_nm": 900}, "--idempotency-key", "dup")
    out, err = other.communicate(timeout=60)
    assert other.returncode == 1 and "rejected (idempotency_conflict)" in out, (out, err)
    cid = command_id_for(device, "dup")
    answer(cfg, device, cid, CommandCompleted)
    wait_for(lambda: any(isinstance(e, CommandCompleted)
                         for e in command_events(cfg, device, cid)), 30, "completion")
    kinds = [type(e).__name__ for e in command_events(cfg, device, cid)]
    # three requests under one command id (the refused one too), dispatched once, one
    # execution, no rejection
    assert kinds.count("CommandIssued") == 3 and "CommandRejected" not in kinds, kinds
    assert kinds.count("CommandDispatched") == 1, kinds
    assert kinds.count("CommandCompleted") == 1


def test_a_restart_keeps_state_from_the_changelog(cfg, env, devices):
    procs, proc = devices
    device = online_device(cfg, interval=None)
    waiting = send(env, device, "measure", {"wavelength_nm": 600}, "--idempotency-key", "r",
                   "--timeout", "6s", wait=False)
    assert waiting.wait(60) == 0
    cid = command_id_for(device, "r")
    time.sleep(2)  # handled and committed
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    restarted = procs.start("process", "devices")
    try:
        # the open command (state from the changelog, input already committed) times out once
        wait_for(lambda: [type(e).__name__ for e in command_events(cfg, device, cid)]
                 == ["CommandIssued", "CommandDispatched", "CommandTimedOut"], 60,
                 "the timeout after the restart")
        # and the device is still known ONLINE: a new command is not refused as offline
        ok = send(env, device, "measure", {"wavelength_nm": 610}, "--idempotency-key", "r2",
                  "--timeout", "3s")
        out, _ = ok.communicate(timeout=60)
        assert "timed out" in out, out  # not rejected: nobody answers it
    finally:
        assert restarted.poll() is None


def test_command_send_wait_shows_dispatch_and_progress(cfg, env, devices):
    """`command send --wait` (stderr not a terminal: a line per step) shows each step once, in
    order, and each progress report while the command runs. The test publishes the dispatch
    itself, as the device processor does; a second dispatch or a late acceptance shows
    nothing."""
    device = online_device(cfg, interval=None)
    proc = send(env, device, "measure", {"wavelength_nm": 600}, "--idempotency-key", "steps")
    cid = command_id_for(device, "steps")
    wait_for(lambda: cid in {e.command_id for e in command_events(cfg, device)}, 60,
             "the command issued")
    common = dict(source="test", subject=device, command_id=cid, device_id=device)
    dispatched = CommandDispatched.create(
        sequence=0, idempotency_key="steps", command_type="measure",
        payload_json='{"wavelength_nm":600}', expires_at=datetime.now(UTC) + timedelta(
            seconds=30), issued_by="test", **common)
    run(publish(cfg, dispatched, CommandAccepted.create(sequence=1, **common),
                CommandStarted.create(sequence=2, **common),
                CommandProgress.create(sequence=3, progress=0.25, remaining_s=3.2, **common),
                dispatched, CommandAccepted.create(sequence=4, **common),
                CommandProgress.create(sequence=5, progress=0.75, remaining_s=1.0,
                                       intermediate_json='{"absorbance": 0.4}', **common),
                CommandCompleted.create(sequence=6, result_json='{"absorbance": 0.8}',
                                        **common)))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.splitlines() == [cid, 'completed: {"absorbance": 0.8}']
    prefix = f"measure on {device}: "
    assert [line.removeprefix(prefix) for line in err.splitlines()
            if line.startswith(prefix)] == [
        "dispatched", "accepted", "started", "running 25%, ~3 s left",
        'running 75%, ~1 s left: {"absorbance": 0.4}', 'completed: {"absorbance": 0.8}'], err
