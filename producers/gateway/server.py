"""The gRPC instrument gateway (`labbus gateway grpc`): an agent that publishes what devices
send and relays commands to them.

- Identity: mutual TLS against the device CA (labbus.events.pki); the caller's
  certificate subject CN is its id, its OU its role (`device` or `operator`). A device acts only
  as itself: anything else is PERMISSION_DENIED and a DeviceRejected event with the reason.
- StreamData: each reading, heartbeat, status report and command update becomes one event,
  handed to the kernel's idempotent acks=all producer; its sequence is acknowledged on the stream
  only once the broker acknowledged the event. Event ids derive from (device, sequence), so a
  message re-sent after a reconnect is the same event and consumers drop it.
- Flow control: at most LABBUS_GATEWAY_MAX_INFLIGHT messages per stream wait for the broker or
  for their acknowledgement to be written; at the limit the gateway stops reading that stream,
  and gRPC's flow control stops the device.
- Commands: the gateway follows lab.commands (and lab.devices, for registrations) and sends each
  open CommandDispatched (a CommandIssued the device-lifecycle processor accepted; a rejected
  one never reaches a device) down its device's stream, again after every reconnect until it is
  final. A device may report on a command only once it was dispatched to it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiokafka import TopicPartition
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import Gauge

from labbus.events import kafka, metrics, pki
from labbus.events.codec import DecodeError
from labbus.events.config import Config
from labbus.events.devices import (  # noqa: F401 - re-exported for callers of the gateway
    is_loopback,
    reading_id,
    registration_events,
)
from labbus.events.model import (
    COMMAND_FINAL,
    CommandAccepted,
    CommandCompleted,
    CommandDispatched,
    CommandFailed,
    CommandIssued,
    CommandRejected,
    CommandStarted,
    DeviceHeartbeat,
    DeviceRegistered,
    DeviceRejected,
    DeviceStatusChanged,
    MeasurementRecorded,
    command_id_for,
    derived_id,
    utcnow,
)
from labbus.events.runtime import Backoff, Deliveries, Outgoing, Record, Step, retrying
from labbus.events.topics import (
    COMMANDS,
    DEVICE_STATUS,
    DEVICES,
    MEASUREMENTS_RECORDED,
    topic_name,
)
from labbus.producers.gateway import gctune
from labbus.producers.gateway import labbus_gateway_pb2 as pb
from labbus.producers.gateway import labbus_gateway_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

PROCESS = "gateway-grpc"
SERVICE = "labbus.gateway.v1.Gateway"
STREAMS = Gauge("labbus_gateway_streams", "Device streams open on this gateway")

STATES = {pb.ONLINE: "ONLINE", pb.OFFLINE: "OFFLINE", pb.MAINTENANCE: "MAINTENANCE",
          pb.ERROR: "ERROR"}


def _us(when) -> int:
    return int(when.timestamp() * 1_000_000)


def _now_us() -> int:
    return time.time_ns() // 1000


class Refused(Exception):
    """A request the gateway refuses: a gRPC status and a DeviceRejected event."""

    def __init__(self, code: grpc.StatusCode, reason_code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason_code = reason_code
        self.reason = reason


@dataclass
class DeviceEntry:
    device_id: str
    device_type: str
    model: str
    location: str
    attributes: dict[str, str]
    specs: list[dict]
    spec_version: int
    reported_status: str = "ONLINE"
    reported_reason: str = ""
    last_acked: int = 0
    last_seen_us: int = 0

    def describe(self, device_type: str, model: str, location: str, attributes: dict[str, str],
                 specs: list[dict], spec_version: int) -> None:
        """A new registration of the device, in place: an open stream holds this entry and
        keeps counting its acks on it."""
        self.device_type, self.model, self.location = device_type, model, location
        self.attributes, self.specs, self.spec_version = attributes, specs, spec_version


@dataclass
class DeviceStream:
    device_id: str
    context: Any
    slots: asyncio.Semaphore
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # (GatewayMessage, slots to free)
    # (sequence, the broker's delivery future, topic), in the order read from the stream
    pending: collections.deque = field(default_factory=collections.deque)
    failed: asyncio.Future | None = None  # set to the error when the broker refuses a message
    sent_commands: set = field(default_factory=set)
    task: asyncio.Task | None = None  # the call's handler
    entry: DeviceEntry | None = None

    def send_command(self, cmd: pb.Command) -> None:
        if cmd.command_id not in self.sent_commands:
            self.sent_commands.add(cmd.command_id)
            self.out.put_nowait((pb.GatewayMessage(command=cmd), 0))

    def delivered(self, _future: asyncio.Future | None = None) -> None:
        """A delivery future finished: acknowledge, in stream order, every message at the head
        whose event the broker has acknowledged, in one Ack. A done callback rather than a task
        awaiting each delivery: at thousands of readings/s the per-message task switches and
        gathers were a good part of the gateway's CPU."""
        done = []
        pending = self.pending
        while pending and pending[0][1].done():
            seq, fut, topic = pending[0]
            if fut.cancelled() or fut.exception() is not None:
                if self.failed is not None and not self.failed.done():
                    self.failed.set_result(fut.exception() if not fut.cancelled()
                                           else asyncio.CancelledError())
                break  # never acknowledged; the stream ends and the device re-sends it
            pending.popleft()
            done.append(seq)
            _events_out(topic).inc()
        if done:
            if self.entry is not None:
                self.entry.last_acked = max(self.entry.last_acked, done[-1])
            self.out.put_nowait((pb.GatewayMessage(ack=pb.Ack(sequences=done)), len(done)))


_EVENTS_OUT: dict[str, Any] = {}


def _events_out(topic: str):
    child = _EVENTS_OUT.get(topic)
    if child is None:
        child = _EVENTS_OUT[topic] = metrics.EVENTS_OUT.labels(PROCESS, topic)
    return child


def _spec_dict(s: pb.MeasurementSpec) -> dict:
    return {"metric": s.metric, "unit": s.unit,
            "min": s.min if s.HasField("min") else None,
            "max": s.max if s.HasField("max") else None,
            "expected_interval_s": s.expected_interval_s}


def _spec_pb(d: dict) -> pb.MeasurementSpec:
    s = pb.MeasurementSpec(metric=d["metric"], unit=d["unit"],
                           expected_interval_s=d["expected_interval_s"])
    if d.get("min") is not None:
        s.min = d["min"]
    if d.get("max") is not None:
        s.max = d["max"]
    return s


def check_registration(req: pb.RegisterDeviceRequest) -> list[dict]:
    """The request's specs, or Refused(INVALID_ARGUMENT) naming what is wrong."""
    def bad(reason: str) -> Refused:
        return Refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed", reason)

    if not req.device_type.strip():
        raise bad("device_type is empty")
    specs, seen = [], set()
    for s in req.specs:
        d = _spec_dict(s)
        if not s.metric or not s.unit:
            raise bad(f"spec {len(specs)}: metric and unit are required")
        if s.metric in seen:
            raise bad(f"metric {s.metric!r} has two specs")
        seen.add(s.metric)
        if not (math.isfinite(s.expected_interval_s) and s.expected_interval_s > 0):
            raise bad(f"{s.metric}: expected_interval_s must be a positive number")
        for bound in ("min", "max"):
            if d[bound] is not None and not math.isfinite(d[bound]):
                raise bad(f"{s.metric}: {bound} must be finite")
        if d["min"] is not None and d["max"] is not None and d["min"] > d["max"]:
            raise bad(f"{s.metric}: min {d['min']} is above max {d['max']}")
        specs.append(d)
    if not specs:
        raise bad("a device needs at least one measurement spec")
    return specs


class Gateway:
    """The service; `serve()` runs it until `stop`."""

    def __init__(self, cfg: Config, *, insecure: bool = False, name: str = "gateway-0") -> None:
        self.cfg = cfg
        self.insecure = insecure
        self.name = name
        self.step = Step(cfg, PROCESS)
        self.codec = self.step.codec
        self.producer = None
        self.devices: dict[str, DeviceEntry] = {}
        self.locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self.streams: dict[str, DeviceStream] = {}
        self.open_commands: dict[str, dict[str, pb.Command]] = collections.defaultdict(dict)
        self.command_device: dict[str, tuple[str, int]] = {}  # command id -> (device, expires)
        self.dispatched: set[str] = set()  # command ids dispatched (the device may report on)
        self.ready = asyncio.Event()
        self.pool = None
        self.readings_topic = topic_name(cfg, MEASUREMENTS_RECORDED)
        self.status_topic = topic_name(cfg, DEVICE_STATUS)
        self.health = HealthServicer()

    # -- identity -------------------------------------------------------------------------------
    def identity(self, context) -> pki.Identity | None:
        if self.insecure:  # loopback only: the caller states who it is
            md = dict(context.invocation_metadata() or ())
            name = md.get("x-labbus-identity")
            return pki.Identity(name, md.get("x-labbus-role", "device")) if name else None
        pem = (context.auth_context() or {}).get("x509_pem_cert")
        return pki.identity_of_pem(pem[0]) if pem else None

    def acting_as(self, context, device_id: str) -> pki.Identity:
        """The caller, when it may act as `device_id`; else Refused(PERMISSION_DENIED)."""
        who = self.identity(context)
        if who is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "no_identity",
                          "no client certificate (or x-labbus-identity in plain-text mode)")
        if who.role != "device":
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, "not_a_device",
                          f"{who.name!r} holds a {who.role or 'role-less'} certificate, "
                          "not a device certificate")
        if who.name != device_id:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, "identity_mismatch",
                          f"certificate of device {who.name!r} may not act as {device_id!r}")
        return who

    def operator_or_self(self, context, device_id: str | None) -> pki.Identity:
        who = self.identity(context)
        if who is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "no_identity", "no client identity")
        if who.role == "operator" or (device_id is not None and who.name == device_id):
            return who
        raise Refused(grpc.StatusCode.PERMISSION_DENIED, "not_an_operator",
                      f"{who.name!r} ({who.role}) may only ask about itself; "
                      "this needs an operator certificate")

    async def refuse(self, context, rpc: str, device_id: str, exc: Refused) -> None:
        """Publish a DeviceRejected (waiting for the broker) and end the call with the status."""
        who = self.identity(context)
        event = DeviceRejected.create(
            source=f"{PROCESS}/{self.name}", subject=device_id or (who.name if who else ""),
            sequence=0, device_id=device_id or (who.name if who else ""),
            identity=who.name if who else None, rpc=f"/{SERVICE}/{rpc}",
            reason_code=exc.reason_code, reason=exc.reason, peer=context.peer() or "")
        log.warning("refused", extra={"rpc": rpc, "device": device_id, "code": exc.code.name,
                                      "reason": exc.reason})
        metrics.EVENTS_REJECTED.labels(PROCESS, exc.reason_code).inc()
        try:
            await self.publish([self.step.encode(event)])
        except Exception:  # noqa: BLE001 - the caller still gets its status
            log.exception("could not publish DeviceRejected")
        await context.abort(exc.code, exc.reason)

    async def publish(self, outgoing: list[Outgoing]) -> None:
        sent = Deliveries(self.producer, PROCESS)
        for out in outgoing:
            await sent.send(out)
        await sent.acked()

    # -- unary calls ----------------------------------------------------------------------------
    async def RegisterDevice(self, req: pb.RegisterDeviceRequest, context):
        try:
            self.acting_as(context, req.device_id)
            specs = check_registration(req)
        except Refused as exc:
            await self.refuse(context, "RegisterDevice", req.device_id, exc)
        await self.ready.wait()
        async with self.locks[req.device_id]:
            known = self.devices.get(req.device_id)
            meta = dict(device_type=req.device_type, model=req.model, location=req.location,
                        attributes=dict(req.attributes))
            if known is not None and known.specs == specs and all(
                    getattr(known, k) == v for k, v in meta.items()):
                return pb.RegisterDeviceResponse(device_id=req.device_id,
                                                 spec_version=known.spec_version, changed=False)
            version, events = registration_events(
                source=f"{PROCESS}/{self.name}", device_id=req.device_id, meta=meta, specs=specs,
                known_specs=known.specs if known is not None else None,
                known_version=known.spec_version if known is not None else None)
            await self.publish([self.step.encode(e) for e in events])
            if known is not None:
                known.describe(specs=specs, spec_version=version, **meta)
            else:
                self.devices[req.device_id] = DeviceEntry(req.device_id, specs=specs,
                                                          spec_version=version, **meta)
            log.info("registered", extra={"device": req.device_id, "spec_version": version})
            return pb.RegisterDeviceResponse(device_id=req.device_id, spec_version=version,
                                             changed=True)

    def _status(self, d: DeviceEntry) -> pb.DeviceStatus:
        return pb.DeviceStatus(
            device_id=d.device_id, device_type=d.device_type, spec_version=d.spec_version,
            specs=[_spec_pb(s) for s in d.specs], connected=d.device_id in self.streams,
            reported_status=d.reported_status, reported_reason=d.reported_reason,
            last_acked_sequence=d.last_acked, last_seen_unix_us=d.last_seen_us)

    async def GetDeviceStatus(self, req: pb.GetDeviceStatusRequest, context):
        try:
            self.operator_or_self(context, req.device_id)
        except Refused as exc:
            await self.refuse(context, "GetDeviceStatus", req.device_id, exc)
        d = self.devices.get(req.device_id)
        if d is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"device {req.device_id!r} is not registered")
        return self._status(d)

    async def ListDevices(self, req: pb.ListDevicesRequest, context):
        try:
            self.operator_or_self(context, None)
        except Refused as exc:
            await self.refuse(context, "ListDevices", "", exc)
        limit = req.limit or 100
        if not 1 <= limit <= 1000:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit must be 1 to 1000")
        ids = sorted(i for i in self.devices if i > req.after
                     and (not req.connected_only or i in self.streams))
        page = ids[:limit]
        return pb.ListDevicesResponse(
            devices=[self._status(self.devices[i]) for i in page],
            next_after=page[-1] if len(ids) > limit else "")

    async def SendCommand(self, req: pb.SendCommandRequest, context):
        try:
            who = self.operator_or_self(context, None)
        except Refused as exc:
            await self.refuse(context, "SendCommand", req.device_id, exc)
        if req.device_id not in self.devices:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"device {req.device_id!r} is not registered")
        if not req.command_type:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "command_type is empty")
        try:
            payload = json.loads(req.payload_json or "{}")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"payload_json is not JSON: {exc}")
        if not isinstance(payload, dict):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "payload_json must be a JSON object")
        timeout = req.timeout_s or 30.0
        if not (math.isfinite(timeout) and 0 < timeout <= 86400):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "timeout_s must be within (0, 86400]")
        key = req.idempotency_key or str(uuid.uuid4())
        command_id = command_id_for(req.device_id, key)
        known = self.command_device.get(command_id)
        if known is not None:  # the same key again: the same command, not a second execution
            return pb.SendCommandResponse(command_id=command_id, expires_at_unix_us=known[1])
        expires = utcnow().timestamp() + timeout
        event = CommandIssued.create(
            source=f"{PROCESS}/{self.name}", subject=req.device_id, sequence=0,
            event_id=uuid.UUID(derived_id(command_id, "issued")), command_id=command_id,
            device_id=req.device_id, idempotency_key=key, command_type=req.command_type,
            payload_json=json.dumps(payload), issued_by=who.name,
            expires_at=_from_us(int(expires * 1_000_000)))
        await self.publish([self.step.encode(event)])
        return pb.SendCommandResponse(command_id=command_id,
                                      expires_at_unix_us=_us(event.expires_at))

    async def GetMeasurements(self, req: pb.GetMeasurementsRequest, context):
        try:
            self.operator_or_self(context, req.device_id)
        except Refused as exc:
            await self.refuse(context, "GetMeasurements", req.device_id, exc)
        limit = req.limit or 100
        if not 1 <= limit <= 10000:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit must be 1 to 10000")
        if self.pool is None:
            from labbus.events.db import connect_pool

            self.pool = await connect_pool(self.cfg.postgres_api_dsn, "LABBUS_POSTGRES_API_DSN")
        start = _from_us(req.from_unix_us) if req.from_unix_us else None
        end = _from_us(req.to_unix_us) if req.to_unix_us else None
        rows = await self.pool.fetch(
            """SELECT measurement_id, metric, value, unit, measured_at FROM measurements
               WHERE device_id = $1 AND ($2 = '' OR metric = $2)
                 AND ($3::timestamptz IS NULL OR measured_at >= $3)
                 AND ($4::timestamptz IS NULL OR measured_at < $4)
               ORDER BY measured_at, measurement_id LIMIT $5""",
            req.device_id, req.metric, start, end, limit)
        return pb.GetMeasurementsResponse(measurements=[
            pb.Measurement(measurement_id=str(r["measurement_id"]), metric=r["metric"],
                           value=r["value"], unit=r["unit"],
                           measured_at_unix_us=_us(r["measured_at"])) for r in rows])

    # -- the device stream ----------------------------------------------------------------------
    async def StreamData(self, request_iterator, context):
        """Messages arrive as bytes (the handler parses them), so garbage is refused here with
        a clear status and a DeviceRejected event rather than by grpc's deserializer."""
        device_id = ""
        stream = None
        tasks: list[asyncio.Task] = []
        try:
            first = await context.read()
            if first is grpc.aio.EOF:
                return
            opening = _parse(first)
            if opening.WhichOneof("body") != "open":
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                              "the first message of a stream must be `open`")
            device_id = opening.open.device_id
            self.acting_as(context, device_id)
            await self.ready.wait()
            entry = self.devices.get(device_id)
            if entry is None:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "unregistered",
                              f"device {device_id!r} is not registered; call RegisterDevice "
                              "first")
            stream = DeviceStream(device_id, context,
                                  asyncio.Semaphore(self.cfg.gateway_max_inflight),
                                  failed=asyncio.get_running_loop().create_future(),
                                  task=asyncio.current_task(), entry=entry)
            previous = self.streams.get(device_id)
            self.streams[device_id] = stream
            STREAMS.set(len(self.streams))
            if previous is not None and previous.task is not None:
                previous.task.cancel()  # the device reconnected before we noticed it left
            tasks = [asyncio.create_task(self._write(stream)), stream.failed]
            for cmd in list(self.open_commands.get(device_id, {}).values()):
                if cmd.expires_at_unix_us > _now_us():
                    stream.send_command(cmd)
            reader = asyncio.create_task(self._read(stream, entry))
            tasks.append(reader)
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                reader.result()  # raises Refused
                # the device closed its side: finish acknowledging what it sent
                while (stream.pending or not stream.out.empty()) and not any(
                        t.done() for t in tasks[:2]):
                    await asyncio.sleep(0.01)
            writer, failed = tasks[:2]
            failure = None
            if failed.done() and not failed.cancelled():
                failure = failed.result()  # the broker refused a message of this stream
            elif writer.done() and not writer.cancelled():
                failure = writer.exception()
            if failure is not None:
                log.warning("stream ended by an error", extra={"device": device_id,
                                                               "error": repr(failure)})
                raise Refused(grpc.StatusCode.UNAVAILABLE, "broker_unavailable",
                              f"the broker did not acknowledge: {failure!r}; re-send what "
                              "was not acknowledged")
        except Refused as exc:
            await self.refuse(context, "StreamData", device_id, exc)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                try:
                    await t
                except BaseException:  # noqa: BLE001 - cancelled, or the error is logged
                    pass
            if stream is not None and self.streams.get(device_id) is stream:
                del self.streams[device_id]
                STREAMS.set(len(self.streams))

    async def _read(self, stream: DeviceStream, entry: DeviceEntry) -> None:
        """Read, publish, queue for acknowledgement; never more than the in-flight limit."""
        context, device_id = stream.context, stream.device_id
        events_in = metrics.EVENTS_IN.labels(PROCESS, "grpc")
        while True:
            await stream.slots.acquire()  # at the limit: stop reading (back-pressure)
            raw = await context.read()
            if raw is grpc.aio.EOF:
                stream.slots.release()
                return
            msg = _parse(raw)
            entry.last_seen_us = _now_us()
            out = self._outgoing(device_id, msg)
            future = await self.producer.send(out.topic, out.value, key=out.key)
            stream.pending.append((msg.sequence, future, out.topic))
            future.add_done_callback(stream.delivered)
            events_in.inc()

    def _outgoing(self, device_id: str, msg: pb.DeviceMessage) -> Outgoing:
        """The event a stream message becomes (plain records: the hot path), or Refused."""
        kind = msg.WhichOneof("body")
        if msg.sequence <= 0:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                          f"{kind or 'message'}: sequence must be positive, got {msg.sequence}")
        now = _now_us()
        envelope = {"event_id": reading_id(device_id, msg.sequence), "schema_version": 1,
                    "recorded_at": now, "source": f"grpc/{device_id}", "subject": device_id,
                    "correlation_id": None, "causation_id": None, "sequence": msg.sequence}
        key = device_id.encode()
        if kind == "reading":
            r = msg.reading
            if not r.metric or not r.unit:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                              f"reading {msg.sequence}: metric and unit are required")
            record = dict(envelope, event_type=MeasurementRecorded.TYPE,
                          occurred_at=r.measured_at_unix_us or now, device_id=device_id,
                          metric=r.metric, value=r.value, unit=r.unit)
            return Outgoing(self.readings_topic, key,
                            self.codec.encode_plain(MeasurementRecorded.TYPE, record))
        if kind == "heartbeat":
            record = dict(envelope, event_type=DeviceHeartbeat.TYPE,
                          occurred_at=msg.heartbeat.sent_at_unix_us or now, device_id=device_id,
                          gateway=self.name)
            return Outgoing(self.status_topic, key,
                            self.codec.encode_plain(DeviceHeartbeat.TYPE, record))
        if kind == "status":
            status = STATES.get(msg.status.status)
            if status is None:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                              f"status {msg.sequence}: status is unspecified")
            entry = self.devices[device_id]
            entry.reported_status, entry.reported_reason = status, msg.status.reason
            record = dict(envelope, event_type=DeviceStatusChanged.TYPE, occurred_at=now,
                          device_id=device_id, status=status, reason=msg.status.reason)
            return Outgoing(self.status_topic, key,
                            self.codec.encode_plain(DeviceStatusChanged.TYPE, record))
        if kind == "command_update":
            return self._command_update(device_id, msg)
        if kind == "open":
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                          "`open` may only be the first message of a stream")
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                      f"message {msg.sequence} has no body (reading, heartbeat, status or "
                      "command_update)")

    def _command_update(self, device_id: str, msg: pb.DeviceMessage) -> Outgoing:
        u = msg.command_update
        owner = self.command_device.get(u.command_id)
        if owner is None or u.command_id not in self.dispatched:
            raise Refused(grpc.StatusCode.NOT_FOUND, "unknown_command",
                          f"command {u.command_id!r} is unknown to this gateway")
        if owner[0] != device_id:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, "identity_mismatch",
                          f"command {u.command_id!r} was sent to {owner[0]!r}, not to "
                          f"{device_id!r}")
        common = dict(source=f"grpc/{device_id}", subject=device_id, sequence=msg.sequence,
                      event_id=uuid.UUID(derived_id(u.command_id,
                                                    pb.CommandState.Name(u.state).lower())),
                      command_id=u.command_id, device_id=device_id)
        if u.state == pb.ACCEPTED:
            event = CommandAccepted.create(**common)
        elif u.state == pb.STARTED:
            event = CommandStarted.create(
                progress=u.progress if u.HasField("progress") else None, **common)
        elif u.state == pb.COMPLETED:
            try:
                json.loads(u.result_json or "null")
            except ValueError as exc:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                              f"command {u.command_id}: result_json is not JSON: {exc}") from None
            event = CommandCompleted.create(result_json=u.result_json or "null", **common)
        elif u.state == pb.FAILED:
            event = CommandFailed.create(error=u.error, **common)
        elif u.state == pb.REJECTED:
            event = CommandRejected.create(reason_code="refused_by_device", reason=u.error,
                                           **common)
        else:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                          f"command {u.command_id}: state is unspecified")
        return self.step.encode(event)

    @staticmethod
    async def _write(stream: DeviceStream) -> None:
        """The stream's only writer; frees the slots of acknowledged messages once written."""
        while True:
            message, slots = await stream.out.get()
            await stream.context.write(message)
            for _ in range(slots):
                stream.slots.release()

    # -- following lab.devices and lab.commands -------------------------------------------------
    async def follow(self, stop: asyncio.Event) -> None:
        """Registrations (from the beginning) and open commands (from the lookback) into memory;
        `ready` once lab.devices has been read to its end."""
        devices, commands = topic_name(self.cfg, DEVICES), topic_name(self.cfg, COMMANDS)
        consumer = kafka.consumer(self.cfg, group=None)
        await retrying(consumer.start, Backoff(PROCESS, "kafka"), stop)
        try:
            await consumer._client.force_metadata_update()  # noqa: SLF001 - fresh topics
            tps = [TopicPartition(t, p) for t in (devices, commands)
                   for p in sorted(consumer.partitions_for_topic(t) or ())]
            consumer.assign(tps)
            since_ms = int((time.time() - self.cfg.gateway_command_lookback_s) * 1000)
            device_tps = [tp for tp in tps if tp.topic == devices]
            command_tps = [tp for tp in tps if tp.topic == commands]
            await consumer.seek_to_beginning(*device_tps)
            found = await consumer.offsets_for_times({tp: since_ms for tp in command_tps})
            for tp in command_tps:
                if found.get(tp) is None:
                    await consumer.seek_to_end(tp)
                else:
                    consumer.seek(tp, found[tp].offset)
            ends = await consumer.end_offsets(device_tps)
            left = {tp for tp in device_tps if ends[tp] > 0}
            if not left:
                self.ready.set()
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=200, max_records=2000)
                for tp, records in batch.items():
                    for r in records:
                        self._followed(Record.of(r))
                    if tp in left and records[-1].offset + 1 >= ends[tp]:
                        left.discard(tp)
                        if not left:
                            self.ready.set()
                            log.info("registrations loaded", extra={"devices": len(self.devices)})
        finally:
            await consumer.stop()

    def _followed(self, rec: Record) -> None:
        try:
            kind, r = self.codec.decode_record(rec.value, plain=True)
        except DecodeError:
            return  # not ours to dead-letter: the topics' consumers do
        if kind == DeviceRegistered.TYPE:
            known = self.devices.get(r["device_id"])
            described = (r["device_type"], r["model"], r["location"], dict(r["attributes"]),
                         list(r["specs"]), r["spec_version"])
            if known is None:
                self.devices[r["device_id"]] = DeviceEntry(r["device_id"], *described)
            elif r["spec_version"] >= known.spec_version:
                known.describe(*described)
        elif kind == CommandIssued.TYPE:
            self.command_device.setdefault(r["command_id"], (r["device_id"], r["expires_at"]))
        elif kind == CommandDispatched.TYPE:
            expires = r["expires_at"]
            self.command_device.setdefault(r["command_id"], (r["device_id"], expires))
            self.dispatched.add(r["command_id"])
            if expires <= _now_us():
                return
            cmd = pb.Command(command_id=r["command_id"], command_type=r["command_type"],
                             payload_json=r["payload_json"], expires_at_unix_us=expires,
                             idempotency_key=r["idempotency_key"], issued_by=r["issued_by"])
            self.open_commands[r["device_id"]][r["command_id"]] = cmd
            stream = self.streams.get(r["device_id"])
            if stream is not None:
                stream.send_command(cmd)
        elif kind in COMMAND_FINAL:
            self.open_commands.get(r["device_id"], {}).pop(r["command_id"], None)

    async def prune(self, stop: asyncio.Event) -> None:
        """Forget commands that expired longer ago than the lookback."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 60)
            except TimeoutError:
                pass
            now = _now_us()
            horizon = now - self.cfg.gateway_command_lookback_s * 1_000_000
            for cid, (_device, expires) in list(self.command_device.items()):
                if expires < horizon:
                    del self.command_device[cid]
                    self.dispatched.discard(cid)
            for cmds in list(self.open_commands.values()):
                for cid, cmd in list(cmds.items()):
                    if cmd.expires_at_unix_us <= now:
                        del cmds[cid]


def _from_us(us: int):
    from datetime import UTC, datetime, timedelta

    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


def _parse(raw: bytes) -> pb.DeviceMessage:
    try:
        return pb.DeviceMessage.FromString(raw)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                      f"not a labbus.gateway.v1.DeviceMessage ({len(raw)} bytes): {exc}") from None


def handlers(gw: Gateway) -> grpc.GenericRpcHandler:
    """The service's method handlers: the generated ones, except that StreamData takes raw
    bytes so that the gateway parses (and refuses) them itself."""
    unary = {
        "RegisterDevice": (gw.RegisterDevice, pb.RegisterDeviceRequest, pb.RegisterDeviceResponse),
        "GetDeviceStatus": (gw.GetDeviceStatus, pb.GetDeviceStatusRequest, pb.DeviceStatus),
        "ListDevices": (gw.ListDevices, pb.ListDevicesRequest, pb.ListDevicesResponse),
        "SendCommand": (gw.SendCommand, pb.SendCommandRequest, pb.SendCommandResponse),
        "GetMeasurements": (gw.GetMeasurements, pb.GetMeasurementsRequest,
                            pb.GetMeasurementsResponse),
    }
    methods = {name: grpc.unary_unary_rpc_method_handler(
        fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString)
        for name, (fn, req, resp) in unary.items()}
    methods["StreamData"] = grpc.stream_stream_rpc_method_handler(
        gw.StreamData, request_deserializer=None,
        response_serializer=pb.GatewayMessage.SerializeToString)
    assert set(methods) == set(pb.DESCRIPTOR.services_by_name["Gateway"].methods_by_name)
    assert pb_grpc.GatewayServicer  # the generated stubs are the clients' interface
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def server_credentials(cfg: Config) -> grpc.ServerCredentials:
    p = pki.paths(cfg.pki_dir)
    for path in (p.ca_cert, p.server_cert, p.server_key):
        if not path.exists():
            raise pki.PkiError(f"{path} is missing; create the CA and the gateway certificate "
                               "with `labbus devices init-ca` (LABBUS_PKI_DIR="
                               f"{cfg.pki_dir})")
    return grpc.ssl_server_credentials(
        [(p.server_key.read_bytes(), p.server_cert.read_bytes())],
        root_certificates=p.ca_cert.read_bytes(), require_client_auth=True)


SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),  # notice a vanished device within ~30 s
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 1 << 20),
]


async def serve(cfg: Config, stop: asyncio.Event, *, insecure: bool = False,
                host: str | None = None, port: int | None = None,
                name: str = "gateway-0", started: asyncio.Event | None = None) -> None:
    """Run the gateway until `stop`."""
    host = host or cfg.gateway_host
    port = cfg.gateway_port if port is None else port
    if insecure and not is_loopback(host):
        raise pki.PkiError(f"refusing plain text on {host}: without TLS the gateway binds only a "
                           "loopback address (LABBUS_GATEWAY_HOST=127.0.0.1)")
    creds = None if insecure else server_credentials(cfg)
    await retrying(lambda: kafka.ensure_topics(cfg), Backoff(PROCESS, "kafka"), stop)
    gw = Gateway(cfg, insecure=insecure, name=name)
    gw.producer = kafka.producer(cfg)
    await retrying(gw.producer.start, Backoff(PROCESS, "kafka"), stop)
    follower = asyncio.create_task(gw.follow(stop))
    pruner = asyncio.create_task(gw.prune(stop))
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handlers(gw),))
    health_pb2_grpc.add_HealthServicer_to_server(gw.health, server)
    address = f"{host}:{port}"
    bound = (server.add_insecure_port(address) if insecure
             else server.add_secure_port(address, creds))
    if not bound:
        raise OSError(f"cannot bind the gateway to {address}")
    await server.start()
    gctune.tune()
    ready = asyncio.create_task(gw.ready.wait())
    await asyncio.wait([ready, follower], return_when=asyncio.FIRST_COMPLETED)
    if follower.done():
        follower.result()  # raise what stopped it
    for svc in ("", SERVICE):
        await gw.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving", extra={"address": f"{host}:{bound}", "tls": not insecure})
    if started is not None:
        started.port = bound
        started.set()
    try:
        await stop.wait()
    finally:
        await gw.health.enter_graceful_shutdown()
        await server.stop(grace=5)
        follower.cancel()
        pruner.cancel()
        await asyncio.gather(follower, pruner, return_exceptions=True)
        await gw.producer.stop()
        if gw.pool is not None:
            await gw.pool.close()
        log.info("stopped")
