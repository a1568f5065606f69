"""Simulated gRPC instruments (`labbus agent sim --grpc`): N device streams from one process over
mutual TLS, each registering, sending readings and heartbeats, answering commands (accept →
start → complete) and re-sending what the gateway has not acknowledged after a reconnect.

A device's sequence starts at the clock in microseconds when it starts, so it keeps increasing
across restarts of the simulator (the gateway derives event ids from (device, sequence)).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from labbus.events import pki
from labbus.events.config import Config
from labbus.producers.gateway import gctune
from labbus.producers.gateway import labbus_gateway_pb2 as pb
from labbus.producers.gateway import labbus_gateway_pb2_grpc as pb_grpc
from labbus.producers.sim import DEVICE_TYPES

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                   ("grpc.keepalive_permit_without_calls", 1)]


def credentials(pki_dir: Path, name: str) -> grpc.ChannelCredentials:
    """TLS with the device's own certificate, trusting only the device CA."""
    p = pki.paths(pki_dir)
    return grpc.ssl_channel_credentials(
        root_certificates=p.ca_cert.read_bytes(),
        private_key=p.client_key(name).read_bytes(),
        certificate_chain=p.client_cert(name).read_bytes())


def channel(target: str, pki_dir: Path | None, name: str, insecure: bool = False,
            creds: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    if insecure:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(target, creds or credentials(pki_dir, name),
                                   options=CHANNEL_OPTIONS)


def metadata(name: str, insecure: bool, role: str = "device") -> tuple:
    """Plain-text mode only: who the caller says it is."""
    return (("x-labbus-identity", name), ("x-labbus-role", role)) if insecure else ()


def registration(device_id: str, device_type: str, location: str = "lab-1",
                 interval_s: float = 1.0, heartbeat_s: float = 1.0) -> pb.RegisterDeviceRequest:
    model, channels = DEVICE_TYPES[device_type]
    return pb.RegisterDeviceRequest(
        device_id=device_id, device_type=device_type, model=model, location=location,
        attributes={"simulated": "true", "heartbeat_interval_s": f"{heartbeat_s:g}"},
        specs=[pb.MeasurementSpec(metric=m, unit=u, min=typ - 100 * noise,
                                  max=typ + 100 * noise, expected_interval_s=interval_s)
               for m, u, typ, noise in channels])


@dataclass
class Stats:
    """What the fleet sent and what the gateway acknowledged: the tests' ground truth."""

    readings: int = 0  # distinct readings sent (re-sends not counted)
    resent: int = 0
    acked: int = 0
    reconnects: int = 0
    commands_completed: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    latencies_s: list[float] = field(default_factory=list)  # first send -> its ack
    sent: dict[str, list[int]] = field(default_factory=lambda: collections.defaultdict(list))
    track: bool = False

    def unacked(self, devices: list[SimDevice]) -> int:
        return sum(len(d.unacked) for d in devices)


class SimDevice:
    def __init__(self, device_id: str, device_type: str, rate: float, stats: Stats,
                 heartbeat_s: float = 1.0, seed: int = 0) -> None:
        self.device_id = device_id
        self.device_type = device_type
        self.rate = rate
        self.heartbeat_s = heartbeat_s
        self.stats = stats
        self.rng = random.Random(f"{seed}/{device_id}")
        self.sequence = time.time_ns() // 1000
        self.unacked: collections.OrderedDict[int, tuple[pb.DeviceMessage, float]] = (
            collections.OrderedDict())
        self.handled_commands: set[str] = set()
        self.paused = False  # stop producing new readings (tests drain with this)
        self.readings_sent = 0
        self.connected = asyncio.Event()

    def _next(self, **body) -> pb.DeviceMessage:
        self.sequence += 1
        msg = pb.DeviceMessage(sequence=self.sequence, **body)
        self.unacked[self.sequence] = (msg, time.perf_counter())
        return msg

    def reading(self) -> pb.DeviceMessage:
        channels = DEVICE_TYPES[self.device_type][1]
        metric, unit, typical, noise = channels[self.readings_sent % len(channels)]
        self.readings_sent += 1
        msg = self._next(reading=pb.Reading(metric=metric, unit=unit,
                                            value=self.rng.gauss(typical, noise),
                                            measured_at_unix_us=time.time_ns() // 1000))
        self.stats.readings += 1
        if self.stats.track:
            self.stats.sent[self.device_id].append(msg.sequence)
        return msg

    async def run(self, target: str, pki_dir: Path | None, stop: asyncio.Event,
                  insecure: bool = False, creds=None) -> None:
        """Connect, stream, reconnect after any failure until `stop`."""
        backoff = 0.2
        while not stop.is_set():
            ch = channel(target, pki_dir, self.device_id, insecure, creds)
            try:
                await self._session(ch, stop, insecure)
                backoff = 0.2
            except Exception as exc:  # noqa: BLE001 - any broken session: reconnect
                code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(
                    exc).__name__
                self.stats.errors[code] += 1
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in (
                        grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.UNAUTHENTICATED):
                    log.error("refused by the gateway", extra={"device": self.device_id,
                                                               "error": exc.details()})
                    return
            finally:
                self.connected.clear()
                await ch.close(grace=None)
            if stop.is_set():
                break
            self.stats.reconnects += 1
            try:
                await asyncio.wait_for(stop.wait(), backoff * (0.5 + self.rng.random()))
            except TimeoutError:
                pass
            backoff = min(backoff * 2, 2.0)

    async def _session(self, ch, stop: asyncio.Event, insecure: bool) -> None:
        stub = pb_grpc.GatewayStub(ch)
        md = metadata(self.device_id, insecure)
        await stub.RegisterDevice(registration(self.device_id, self.device_type,
                                               interval_s=1.0 / self.rate if self.rate else 1.0,
                                               heartbeat_s=self.heartbeat_s),
                                  metadata=md, timeout=30, wait_for_ready=True)
        call = stub.StreamData(metadata=md)
        lock = asyncio.Lock()

        async def write(msg: pb.DeviceMessage) -> None:
            async with lock:
                await call.write(msg)

        await write(pb.DeviceMessage(open=pb.Open(device_id=self.device_id)))
        for msg, _ in list(self.unacked.values()):  # re-send what was not acknowledged
            await write(msg)
            self.stats.resent += 1
        self.connected.set()
        receiver = asyncio.create_task(self._receive(call, write))
        sender = asyncio.create_task(self._send(write))
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([receiver, sender, stopper], return_when=asyncio.FIRST_COMPLETED)
            for t in (receiver, sender):
                if t.done():
                    t.result()  # raises the call's error
        finally:
            for t in (stopper, sender):
                t.cancel()
            if not receiver.done():
                receiver.cancel()
                call.cancel()
            for t in (receiver, sender):
                try:
                    await t
                except (asyncio.CancelledError, grpc.aio.AioRpcError):
                    pass

    async def _send(self, write) -> None:
        """Readings at the device's rate and heartbeats, on a schedule that keeps its phase (a
        late tick is caught up, not skipped, unless it fell a second behind). One timer per
        device: at 1,000 devices, waiting on the receiver and the stop event in every round
        (asyncio.wait, two callbacks and a future per round) cost more than the sending."""
        interval = 1.0 / self.rate if self.rate else None
        now = time.monotonic()
        next_reading = now + (interval or 0) * self.rng.random()
        next_beat = now + self.heartbeat_s * self.rng.random()
        while True:
            now = time.monotonic()
            if interval and now >= next_reading and not self.paused:
                await write(self.reading())
                next_reading += interval
                if next_reading < now - 1.0:  # fell behind by more than a second
                    next_reading = now + interval
            if now >= next_beat:
                await write(self._next(heartbeat=pb.Heartbeat(
                    sent_at_unix_us=time.time_ns() // 1000)))
                next_beat = now + self.heartbeat_s
            wake = min(next_beat, next_reading if interval and not self.paused else next_beat)
            await asyncio.sleep(max(wake - time.monotonic(), 0))

    async def _receive(self, call, write) -> None:
        async for resp in call:
            kind = resp.WhichOneof("body")
            if kind == "ack":
                now = time.perf_counter()
                for seq in resp.ack.sequences:
                    entry = self.unacked.pop(seq, None)
                    if entry is not None:
                        self.stats.acked += 1
                        if entry[0].WhichOneof("body") == "reading":
                            self.stats.latencies_s.append(now - entry[1])
            elif kind == "command":
                cmd = resp.command
                if cmd.command_id in self.handled_commands:
                    continue  # sent again after a reconnect: never executed twice
                self.handled_commands.add(cmd.command_id)
                asyncio.create_task(self._execute(cmd, write))
        raise ConnectionError("the gateway ended the stream")

    async def _execute(self, cmd: pb.Command, write) -> None:
        """Accept, start, complete: each a message with its own sequence, re-sent like readings."""
        cid = cmd.command_id
        try:
            await write(self._next(command_update=pb.CommandUpdate(command_id=cid,
                                                                   state=pb.ACCEPTED)))
            await write(self._next(command_update=pb.CommandUpdate(
                command_id=cid, state=pb.STARTED, progress=0.0)))
            result = {"command_type": cmd.command_type, "device": self.device_id,
                      "payload": json.loads(cmd.payload_json or "{}")}
            await write(self._next(command_update=pb.CommandUpdate(
                command_id=cid, state=pb.COMPLETED, result_json=json.dumps(result))))
            self.stats.commands_completed += 1
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the stream broke: the updates are unacknowledged and re-sent on reconnect


def make_fleet(n: int, rate: float, stats: Stats, prefix: str = "grpc-sim",
               heartbeat_s: float = 1.0, seed: int = 0) -> list[SimDevice]:
    types = sorted(DEVICE_TYPES)
    return [SimDevice(f"{prefix}-{i:04d}", types[i % len(types)], rate, stats, heartbeat_s, seed)
            for i in range(n)]


def ensure_certs(pki_dir: Path, devices: list[SimDevice]) -> None:
    """Simulated devices get certificates from the local CA (real ones are issued one by one
    with `labbus devices issue-cert`)."""
    for d in devices:
        pki.issue_cert(pki_dir, d.device_id)


async def run_fleet(cfg: Config, devices: list[SimDevice], stop: asyncio.Event,
                    target: str | None = None, insecure: bool = False) -> None:
    target = target or f"{cfg.gateway_host}:{cfg.gateway_port}"
    if not insecure:
        ensure_certs(cfg.pki_dir, devices)
    creds = None if insecure else {d.device_id: credentials(cfg.pki_dir, d.device_id)
                                   for d in devices}
    gctune.tune()
    await asyncio.gather(*(d.run(target, cfg.pki_dir, stop, insecure,
                                 creds[d.device_id] if creds else None) for d in devices))
