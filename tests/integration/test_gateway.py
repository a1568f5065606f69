"""The gRPC gateway against the real broker, over loopback with real mutual TLS: a gateway
process started as a user starts it (`labbus gateway grpc`), devices in this process."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid

import grpc
import pytest

from labbus.deploy.demo import LABBUS
from labbus.events import pki
from labbus.events.codec import DecodeError, default_codec
from labbus.events.model import DeviceStatusChanged
from labbus.events.topics import (
    COMMANDS,
    DEVICE_REJECTED,
    DEVICE_STATUS,
    DEVICES,
    MEASUREMENTS_RECORDED,
    topic_name,
)
from labbus.producers.gateway import devices as dev
from labbus.producers.gateway import labbus_gateway_pb2 as pb
from labbus.producers.gateway import labbus_gateway_pb2_grpc as pb_grpc
from labbus.producers.gateway.server import reading_id
from tests.conftest import Processes, free_port, read_topic
from tests.support.gateway import Gateway

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def gateway(env, pki_dir, tmp_path_factory):
    gw = Gateway(env, pki_dir, tmp_path_factory.mktemp("gwlogs"))
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def lifecycle(env, tmp_path_factory):
    """The device-lifecycle processor: it dispatches (or rejects) what SendCommand issues."""
    procs = Processes(env, tmp_path_factory.mktemp("lifecycle"))
    procs.start("process", "devices")
    yield
    procs.stop_all()


def _channel(gw: Gateway, name: str, role: str = "device") -> grpc.aio.Channel:
    pki.issue_cert(gw.pki_dir, name, role=role)
    return grpc.aio.secure_channel(gw.target, dev.credentials(gw.pki_dir, name))


def _reg(device_id: str) -> pb.RegisterDeviceRequest:
    return dev.registration(device_id, "thermometer")


async def _decoded(cfg, spec) -> list:
    codec = default_codec()
    out = []
    for r in await read_topic(cfg, topic_name(cfg, spec)):
        try:
            out.append(codec.decode(r.value))
        except DecodeError:
            continue  # other tests of the session put junk on the shared topics
    return out


async def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await predicate()
        if found:
            return found
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


async def test_register_stream_and_ack_only_after_the_broker_acked(gateway, cfg):
    device = f"therm-{uuid.uuid4().hex[:6]}"
    async with _channel(gateway, device) as ch:
        stub = pb_grpc.GatewayStub(ch)
        r = await stub.RegisterDevice(_reg(device))
        assert r.spec_version == 1 and r.changed
        again = await stub.RegisterDevice(_reg(device))  # the same registration: no new version
        assert again.spec_version == 1 and not again.changed
        changed = _reg(device)
        changed.specs[0].max = 1000.0
        assert (await stub.RegisterDevice(changed)).spec_version == 2

        call = stub.StreamData()
        await call.write(pb.DeviceMessage(open=pb.Open(device_id=device)))
        base = 1000
        for i in range(1, 21):
            await call.write(pb.DeviceMessage(sequence=base + i, reading=pb.Reading(
                metric="temperature", unit="degC", value=20 + i / 10)))
        await call.write(pb.DeviceMessage(sequence=base + 21, heartbeat=pb.Heartbeat()))
        acked: set[int] = set()
        async for resp in call:
            acked.update(resp.ack.sequences)
            # every acknowledged reading is already on the broker
            on_topic = {e.event_id for e in await _decoded(cfg, MEASUREMENTS_RECORDED)}
            for seq in resp.ack.sequences:
                if seq <= base + 20:
                    assert uuid.UUID(reading_id(device, seq)) in on_topic, seq
            if len(acked) == 21:
                break
        await call.done_writing()
        assert acked == set(range(base + 1, base + 22))
        readings = [e for e in await _decoded(cfg, MEASUREMENTS_RECORDED)
                    if e.device_id == device]
        assert sorted(e.envelope.sequence for e in readings) == list(range(base + 1, base + 21))
        assert readings[0].unit == "degC"

    regs = [e for e in await _decoded(cfg, DEVICES) if e.device_id == device]
    assert [e.spec_version for e in regs] == [1, 2]
    assert regs[1].specs[0]["max"] == 1000.0 and regs[1].specs[0]["metric"] == "temperature"
    async with _channel(gateway, "operator-1", "operator") as ch:
        status = await pb_grpc.GatewayStub(ch).GetDeviceStatus(
            pb.GetDeviceStatusRequest(device_id=device))
        assert status.spec_version == 2 and status.last_acked_sequence == base + 21


async def test_a_device_certificate_cannot_act_as_another_device(gateway, cfg):
    me, other = f"bal-{uuid.uuid4().hex[:6]}", f"bal-{uuid.uuid4().hex[:6]}"
    async with _channel(gateway, other) as ch:  # the other device exists and is registered
        await pb_grpc.GatewayStub(ch).RegisterDevice(_reg(other))
    async with _channel(gateway, me) as ch:
        stub = pb_grpc.GatewayStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RegisterDevice(_reg(other))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"{me!r} may not act as {other!r}" in info.value.details()
        call = stub.StreamData()
        await call.write(pb.DeviceMessage(open=pb.Open(device_id=other)))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as info:  # a device is not an operator
            await stub.SendCommand(pb.SendCommandRequest(device_id=other, command_type="tare"))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED

    rejected = [e for e in await _decoded(cfg, DEVICE_REJECTED) if e.identity == me]
    assert sorted((e.rpc.rsplit("/", 1)[1], e.reason_code, e.device_id) for e in rejected) == [
        ("RegisterDevice", "identity_mismatch", other),
        ("SendCommand", "not_an_operator", other),
        ("StreamData", "identity_mismatch", other)]
    assert all(e.reason and e.peer.startswith("ipv4:127.0.0.1") for e in rejected)
    assert not [e for e in await _decoded(cfg, MEASUREMENTS_RECORDED) if e.device_id == other]


async def test_a_certificate_from_another_ca_is_refused_at_the_handshake(gateway, tmp_path):
    pki.init_ca(tmp_path)  # a CA the gateway does not trust, with a device of the same name
    name = f"rogue-{uuid.uuid4().hex[:6]}"
    pki.issue_cert(tmp_path, name)
    theirs = grpc.ssl_channel_credentials(
        root_certificates=pki.paths(gateway.pki_dir).ca_cert.read_bytes(),
        private_key=pki.paths(tmp_path).client_key(name).read_bytes(),
        certificate_chain=pki.paths(tmp_path).client_cert(name).read_bytes())
    no_cert = grpc.ssl_channel_credentials(
        root_certificates=pki.paths(gateway.pki_dir).ca_cert.read_bytes())
    for creds in (theirs, no_cert):
        async with grpc.aio.secure_channel(gateway.target, creds) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.GatewayStub(ch).RegisterDevice(_reg(name), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # no TLS session
    # and a device does not trust a gateway from another CA either
    bad_server = grpc.ssl_channel_credentials(
        root_certificates=pki.paths(tmp_path).ca_cert.read_bytes(),
        private_key=pki.paths(tmp_path).client_key(name).read_bytes(),
        certificate_chain=pki.paths(tmp_path).client_cert(name).read_bytes())
    async with grpc.aio.secure_channel(gateway.target, bad_server) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.GatewayStub(ch).RegisterDevice(_reg(name), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_garbage_and_malformed_streams_get_a_status_and_others_keep_streaming(gateway,
                                                                                   cfg):
    stats = dev.Stats()
    good = dev.SimDevice(f"good-{uuid.uuid4().hex[:6]}", "ph-meter", 20.0, stats)
    stop = asyncio.Event()
    pki.issue_cert(gateway.pki_dir, good.device_id)
    runner = asyncio.create_task(good.run(gateway.target, gateway.pki_dir, stop))
    await asyncio.wait_for(good.connected.wait(), 15)

    bad = f"junk-{uuid.uuid4().hex[:6]}"
    async with _channel(gateway, bad) as ch:
        await pb_grpc.GatewayStub(ch).RegisterDevice(_reg(bad))
        raw = ch.stream_stream("/labbus.gateway.v1.Gateway/StreamData",
                               request_serializer=None, response_deserializer=None)
        outcomes = {}
        for label, messages in {
            "garbage": [b"\xff\xff\xff\xff\xff garbage"],
            "no_open": [pb.DeviceMessage(sequence=1, heartbeat=pb.Heartbeat())
                        .SerializeToString()],
            "zero_sequence": [pb.DeviceMessage(open=pb.Open(device_id=bad)).SerializeToString(),
                              pb.DeviceMessage(sequence=0, reading=pb.Reading(
                                  metric="ph", unit="pH", value=7)).SerializeToString()],
            "empty_body": [pb.DeviceMessage(open=pb.Open(device_id=bad)).SerializeToString(),
                           pb.DeviceMessage(sequence=5).SerializeToString()],
            "unknown_command": [
                pb.DeviceMessage(open=pb.Open(device_id=bad)).SerializeToString(),
                pb.DeviceMessage(sequence=6, command_update=pb.CommandUpdate(
                    command_id="nope", state=pb.COMPLETED)).SerializeToString()],
        }.items():
            call = raw(iter(messages))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
            outcomes[label] = (info.value.code(), info.value.details())
    assert outcomes["garbage"][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a labbus.gateway.v1.DeviceMessage" in outcomes["garbage"][1]
    assert outcomes["no_open"] == (grpc.StatusCode.INVALID_ARGUMENT,
                                   "the first message of a stream must be `open`")
    assert "sequence must be positive" in outcomes["zero_sequence"][1]
    assert "has no body" in outcomes["empty_body"][1]
    assert outcomes["unknown_command"][0] == grpc.StatusCode.NOT_FOUND

    # an unregistered device may not stream
    name = f"unreg-{uuid.uuid4().hex[:6]}"
    async with _channel(gateway, name) as ch:
        call = pb_grpc.GatewayStub(ch).StreamData()
        await call.write(pb.DeviceMessage(open=pb.Open(device_id=name)))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not registered" in info.value.details()

    before = stats.acked
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.wait_for(runner, 15)
    assert stats.acked > before and not stats.errors, stats.errors  # never disturbed
    rejected = [e for e in await _decoded(cfg, DEVICE_REJECTED) if e.identity in (bad, name)]
    codes = sorted(e.reason_code for e in rejected)
    assert codes == ["malformed"] * 4 + ["unknown_command", "unregistered"], codes
    assert any("not a labbus.gateway.v1.DeviceMessage" in e.reason for e in rejected)


async def test_a_command_reaches_its_device_and_its_statuses_are_events(gateway, lifecycle, cfg):
    """Dispatched by the lifecycle processor, relayed by the gateway, answered by the device;
    a command the processor rejects (its payload breaks the command's schema) never reaches the
    device."""
    stats = dev.Stats()
    device = dev.SimDevice(f"spec-{uuid.uuid4().hex[:6]}", "spectrophotometer", 2.0, stats)
    stop = asyncio.Event()
    pki.issue_cert(gateway.pki_dir, device.device_id)
    runner = asyncio.create_task(device.run(gateway.target, gateway.pki_dir, stop))
    await asyncio.wait_for(device.connected.wait(), 15)

    async def online():
        return any(e.TYPE == DeviceStatusChanged.TYPE and e.device_id == device.device_id
                   and e.status == "ONLINE" for e in await _decoded(cfg, DEVICE_STATUS))

    await _wait_for(online, 60, f"{device.device_id} ONLINE")
    async with _channel(gateway, "operator-1", "operator") as ch:
        stub = pb_grpc.GatewayStub(ch)
        bad = await stub.SendCommand(pb.SendCommandRequest(
            device_id=device.device_id, command_type="measure",
            payload_json='{"wavelength_nm": 5}', timeout_s=30))
        req = pb.SendCommandRequest(device_id=device.device_id, command_type="measure",
                                    payload_json='{"wavelength_nm": 600}', timeout_s=30,
                                    idempotency_key="k-1")
        sent = await stub.SendCommand(req)
        assert (await stub.SendCommand(req)).command_id == sent.command_id  # same key, same one
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SendCommand(pb.SendCommandRequest(device_id=device.device_id,
                                                         command_type="x", payload_json="[1"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    async def of(command_id):
        return [e for e in await _decoded(cfg, COMMANDS)
                if getattr(e, "command_id", None) == command_id]

    async def completed():
        # the same key sent again before the gateway's follower saw the first may publish the
        # same event again (consumers drop it by id): each event id once
        seen = {e.event_id: type(e).__name__ for e in await of(sent.command_id)}
        types = list(seen.values())
        return types if "CommandCompleted" in types else None

    types = await _wait_for(completed, 30, "CommandCompleted")
    assert types == ["CommandIssued", "CommandDispatched", "CommandAccepted", "CommandStarted",
                     "CommandCompleted"]
    assert stats.commands_completed == 1
    completed_event = (await of(sent.command_id))[-1]
    assert '"wavelength_nm": 600' in completed_event.result_json
    assert completed_event.envelope.subject == device.device_id  # keyed by device
    # the refused one was issued before, on the same partition: the device never got it
    refused = await of(bad.command_id)
    assert [type(e).__name__ for e in refused] == ["CommandIssued", "CommandRejected"]
    assert refused[-1].reason_code == "bad_payload"
    assert bad.command_id not in device.handled_commands
    assert device.handled_commands == {sent.command_id}
    stop.set()
    await asyncio.wait_for(runner, 15)


def test_plain_text_is_refused_off_loopback(env):
    r = subprocess.run([LABBUS, "gateway", "grpc", "--insecure", "--host", "0.0.0.0",
                        "--metrics-port", "-1"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert "plain text is allowed only on a loopback address" in r.stderr


def test_a_gateway_without_its_certificates_names_the_command(env, tmp_path):
    r = subprocess.run([LABBUS, "gateway", "grpc", "--port", str(free_port()),
                        "--metrics-port", "-1"], env={**env, "LABBUS_PKI_DIR": str(tmp_path)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "labbus devices init-ca" in r.stderr

