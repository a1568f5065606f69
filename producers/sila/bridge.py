"""The SiLA 2 bridge (`labbus agent sila2 --server HOST:PORT --device-id ID`): one SiLA 2 server
as one labbus device.

- Connects with the `sila2` client, over TLS trusting `--ca` (default: the labbus CA,
  LABBUS_PKI_DIR/ca.pem); plain text (`--insecure`) only to a loopback address.
- Registers the device (DeviceRegistered v2): one measurement spec per numeric observable
  property of the server's features (metric `Feature.Property`, unit from its SiLA Unit
  constraint, valid range from its Minimal/Maximal constraints); versioned like the gateway's
  registrations (events/devices.py `registration_events`).
- Subscribes to those properties: every value is a MeasurementRecorded; heartbeats while the
  server answers; DeviceStatusChanged OFFLINE when it stops answering (a failed heartbeat or a
  broken subscription), ONLINE when it answers again. Event ids derive from (device, sequence)
  (`reading_id`); the sequence is max(previous + 1, clock in µs), so it increases across
  restarts.
- Commands: the kernel's `run_consumer` on lab.commands (its own consumer group per device; the
  input offset is committed only after the outputs are acknowledged). A CommandDispatched for
  this device (a CommandIssued the device-lifecycle processor accepted) becomes a SiLA command
  execution: see `Commands`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

from labbus.events import kafka
from labbus.events.codec import DecodeError
from labbus.events.config import Config
from labbus.events.devices import (
    commands_horizon_ms,
    is_loopback,
    key_partition,
    reading_id,
    registration_events,
    registrations,
)
from labbus.events.model import (
    COMMAND_FINAL,
    CommandAccepted,
    CommandCompleted,
    CommandDispatched,
    CommandFailed,
    CommandProgress,
    CommandRejected,
    CommandStarted,
    DeviceHeartbeat,
    DeviceStatusChanged,
    Event,
    MeasurementRecorded,
    derived_id,
    utcnow,
)
from labbus.events.runtime import Backoff, Deliveries, Step, retrying, run_consumer
from labbus.events.topics import COMMANDS, topic_name
from labbus.producers.sila import load_sila2

log = logging.getLogger(__name__)

PROCESS = "agent-sila2"
STARTED_OR_LATER = (CommandAccepted.TYPE, CommandStarted.TYPE, CommandProgress.TYPE)


class BridgeError(ValueError):
    """A bad setting; the message names it."""


class Stopping(BaseException):  # noqa: N818 - not an error: leaves run_consumer uncommitted
    """The bridge stops while a command waits for the device: nothing is committed, so the
    command is handled again after the restart."""


def parse_server(value: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT) or BridgeError naming --server."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BridgeError(f"--server {value!r}: expected HOST:PORT, e.g. 127.0.0.1:50052")
    return host, int(port)


@dataclass(frozen=True)
class Settings:
    device_id: str
    host: str
    port: int
    insecure: bool = False
    ca: Path | None = None  # PEM: the CA (or certificate) the server's certificate chains to
    heartbeat_s: float = 1.0
    expected_interval_s: float = 1.0
    device_type: str | None = None  # default: the server's SiLA ServerType
    location: str = ""
    connect_timeout_s: float = 5.0

    def check(self) -> None:
        if not self.device_id:
            raise BridgeError("--device-id is empty")
        if self.insecure and not is_loopback(self.host):
            raise BridgeError(
                f"refusing --insecure to {self.host}: plain text is allowed only to a loopback "
                "address (127.0.0.1, ::1, localhost); give the server's CA with --ca instead")
        if not self.insecure:
            if self.ca is None:
                raise BridgeError("no CA for the SiLA server's certificate: give --ca PEM "
                                  "(or create the labbus CA with `labbus devices init-ca`)")
            if not Path(self.ca).is_file():
                raise BridgeError(f"--ca {self.ca}: no such file (the PEM certificate of the CA "
                                  "that signed the SiLA server's certificate)")
        for name in ("heartbeat_s", "expected_interval_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise BridgeError(f"--{name[:-2].replace('_', '-')} must be a positive number of "
                                  f"seconds, got {v}")


# -- what a SiLA server offers -----------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    feature: str
    prop: str
    name: str  # Feature.Property
    unit: str


@dataclass(frozen=True)
class SilaCommand:
    feature: str
    name: str
    observable: bool
    parameters: tuple[str, ...]


@dataclass
class Description:
    meta: dict
    specs: list[dict]
    metrics: list[Metric]
    commands: dict[str, SilaCommand]  # "Feature.Command" -> command


def _number_type(data_type) -> tuple[bool, str | None, float | None, float | None]:
    """(numeric, unit label, min, max) of a SiLA data type."""
    from sila2.framework.constraints.maximal_exclusive import MaximalExclusive
    from sila2.framework.constraints.maximal_inclusive import MaximalInclusive
    from sila2.framework.constraints.minimal_exclusive import MinimalExclusive
    from sila2.framework.constraints.minimal_inclusive import MinimalInclusive
    from sila2.framework.constraints.unit import Unit
    from sila2.framework.data_types.constrained import Constrained
    from sila2.framework.data_types.integer import Integer
    from sila2.framework.data_types.real import Real

    unit = low = high = None
    if isinstance(data_type, Constrained):
        for c in data_type.constraints:
            if isinstance(c, Unit):
                unit = c.label
            elif isinstance(c, (MinimalInclusive, MinimalExclusive)):
                low = float(c.reference_value)
            elif isinstance(c, (MaximalInclusive, MaximalExclusive)):
                high = float(c.reference_value)
        data_type = data_type.base_type
    return isinstance(data_type, (Real, Integer)), unit, low, high


def describe(client, settings: Settings) -> Description:
    """The device a connected SilaClient is: its metadata, measurement specs and commands."""
    service = client.SiLAService
    server_type, name = service.ServerType.get(), service.ServerName.get()
    features = {fid: f for fid, f in client._features.items() if fid != "SiLAService"}  # noqa: SLF001
    metrics, specs, commands = [], [], {}
    for fid, feature in sorted(features.items()):
        for pid, prop in sorted(feature._observable_properties.items()):  # noqa: SLF001
            numeric, unit, low, high = _number_type(prop.data_type)
            if not numeric:
                log.info("observable property is not a number; not a measurement",
                         extra={"property": f"{fid}.{pid}"})
                continue
            m = Metric(fid, pid, f"{fid}.{pid}", unit or "1")
            metrics.append(m)
            specs.append({"metric": m.name, "unit": m.unit, "min": low, "max": high,
                          "expected_interval_s": settings.expected_interval_s})
        for observable, table in ((False, feature._unobservable_commands),  # noqa: SLF001
                                  (True, feature._observable_commands)):  # noqa: SLF001
            for cid, cmd in table.items():
                commands[f"{fid}.{cid}"] = SilaCommand(
                    fid, cid, observable, tuple(p._identifier for p in cmd.parameters))  # noqa: SLF001
    meta = dict(device_type=settings.device_type or server_type,
                model=f"{server_type} {service.ServerVersion.get()}",
                location=settings.location,
                attributes={"protocol": "sila2", "sila_server_name": name,
                            "sila_server_uuid": service.ServerUUID.get(),
                            "sila_vendor_url": service.ServerVendorURL.get(),
                            "sila_features": ",".join(
                                str(f.fully_qualified_identifier)
                                for _, f in sorted(features.items()))})
    return Description(meta, specs, metrics, commands)


def connect(settings: Settings):
    """A SilaClient (blocking; raises when the server does not answer)."""
    load_sila2()
    from sila2.client import SilaClient

    if settings.insecure:
        return SilaClient(settings.host, settings.port, insecure=True)
    return SilaClient(settings.host, settings.port, root_certs=Path(settings.ca).read_bytes())


# -- the bridge ---------------------------------------------------------------------------------

@dataclass
class _Link:
    """The current connection: a client, what it offers, its subscriptions."""

    client: Any
    description: Description
    subscriptions: list = field(default_factory=list)
    broken: asyncio.Event = field(default_factory=asyncio.Event)
    why: str = ""


class Bridge:
    def __init__(self, cfg: Config, settings: Settings) -> None:
        settings.check()
        self.cfg = cfg
        self.s = settings
        self.device_id = settings.device_id
        self.source = f"sila2/{settings.device_id}"
        self.step = Step(cfg, PROCESS)
        self.producer = None
        self.backoff = Backoff(PROCESS, "kafka")
        self.link: _Link | None = None
        self.online = asyncio.Event()
        self.status: str | None = None
        self.known: dict | None = None  # the latest DeviceRegistered of this device
        self.first_registered_ms: int | None = None
        self._last_seq = 0
        self.readings: asyncio.Queue = asyncio.Queue()
        self.published_readings = 0

    def sequence(self) -> int:
        self._last_seq = max(self._last_seq + 1, time.time_ns() // 1000)
        return self._last_seq

    def _ids(self) -> dict:
        seq = self.sequence()
        return dict(source=self.source, subject=self.device_id, sequence=seq,
                    event_id=uuid.UUID(reading_id(self.device_id, seq)))

    async def publish(self, events: list[Event], stop: asyncio.Event) -> None:
        """Hand the events to the idempotent acks=all producer and wait for the broker; a broker
        outage is retried (the same events: the same ids)."""
        outs = [self.step.encode(e) for e in events]

        async def send() -> None:
            sent = Deliveries(self.producer, PROCESS)
            for out in outs:
                await sent.send(out)
            await sent.acked()

        await retrying(send, self.backoff, stop)

    # -- registration ------------------------------------------------------------------------
    async def load_registration(self) -> None:
        """The device's latest DeviceRegistered, from its partition of lab.devices."""
        found = (await registrations(self.cfg, [self.device_id])).get(self.device_id)
        if found is not None:
            self.known, self.first_registered_ms = found.latest, found.first_ms
        log.info("registration loaded", extra={
            "device": self.device_id,
            "spec_version": self.known["spec_version"] if self.known else None})

    async def register(self, d: Description, stop: asyncio.Event) -> None:
        k = self.known
        if k is not None and k["specs"] == d.specs and all(
                (dict(k[key]) if key == "attributes" else k[key]) == v
                for key, v in d.meta.items()):
            return
        version, events = registration_events(
            source=self.source, device_id=self.device_id, meta=d.meta, specs=d.specs,
            known_specs=k["specs"] if k else None, known_version=k["spec_version"] if k else None)
        await self.publish(events, stop)
        self.known = dict(d.meta, device_id=self.device_id, specs=d.specs, spec_version=version)
        log.info("registered", extra={"device": self.device_id, "spec_version": version,
                                      "metrics": [s["metric"] for s in d.specs]})

    async def set_status(self, status: str, reason: str, stop: asyncio.Event) -> None:
        if status == self.status:
            return
        await self.publish([DeviceStatusChanged.create(
            **self._ids(), device_id=self.device_id, status=status, reason=reason)], stop)
        self.status = status
        log.warning("device %s", status, extra={"device": self.device_id, "reason": reason})

    # -- the connection ----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        await retrying(lambda: kafka.ensure_topics(self.cfg), self.backoff, stop)
        self.producer = kafka.producer(self.cfg)
        await retrying(self.producer.start, self.backoff, stop)
        commands = Commands(self, stop)
        try:
            await self.load_registration()
            since_ms = commands_horizon_ms(self.cfg, self.first_registered_ms)
            await commands.look_back(since_ms)
            readings = asyncio.create_task(self.publish_readings(stop))
            workers = [asyncio.create_task(self.supervise(stop)),
                       asyncio.create_task(run_consumer(
                           self.cfg, f"{PROCESS}.{self.device_id}", [COMMANDS], commands, stop,
                           accepts=commands.accepts, max_records=1,
                           first_run_since_ms=since_ms))]
            stopped = asyncio.create_task(stop.wait())
            try:
                done, _ = await asyncio.wait([*workers, readings, stopped],
                                             return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t is not stopped and not t.cancelled() and t.exception() is not None:
                        raise t.exception()
            finally:
                stop.set()
                # the workers finish what they do (a running command, its commit) and return
                results = await asyncio.gather(*workers, return_exceptions=True)
                readings.cancel()
                await asyncio.gather(readings, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                    raise r
        finally:
            await self.disconnect()
            await self.producer.stop()

    async def supervise(self, stop: asyncio.Event) -> None:
        """Connect, register, subscribe, heartbeat; OFFLINE when the server stops answering,
        ONLINE when it answers again."""
        delay = 0.2
        lost = ""  # why the last link broke
        while not stop.is_set():
            try:
                client = await asyncio.wait_for(asyncio.to_thread(connect, self.s),
                                                self.s.connect_timeout_s)
                description = await asyncio.to_thread(describe, client, self.s)
            except Exception as exc:  # noqa: BLE001 - any failure to connect: retry
                # OFFLINE only once a reconnect failed too: a server that ends its streams and
                # answers again at once (a restart of its feature, a proxy) does not flap
                reason = (f"SiLA server {self.s.host}:{self.s.port} does not answer: "
                          f"{_short(exc)}")
                await self.set_status("OFFLINE", f"{lost}; {reason}" if lost else reason, stop)
                await _sleep(stop, delay)
                delay = min(delay * 2, 2.0)
                continue
            delay, lost = 0.2, ""
            link = _Link(client, description)
            await self.register(description, stop)
            self.link = link
            self.subscribe(link)
            await self.set_status("ONLINE", f"SiLA server {self.s.host}:{self.s.port} answers",
                                  stop)
            self.online.set()
            try:
                await self.heartbeat(link, stop)
            finally:
                self.online.clear()
                await self.disconnect()
            lost = link.why
            log.info("link to the SiLA server broke; reconnecting", extra={"reason": lost})

    async def heartbeat(self, link: _Link, stop: asyncio.Event) -> None:
        """A DeviceHeartbeat every heartbeat_s while the server answers; returns when it does
        not (link.why says why) or at stop."""
        ping = link.client.SiLAService.ServerUUID.get
        while not stop.is_set() and not link.broken.is_set():
            try:
                await asyncio.wait_for(asyncio.to_thread(ping), max(self.s.heartbeat_s, 2.0))
            except Exception as exc:  # noqa: BLE001 - unreachable, timed out, refused
                link.why = f"SiLA server {self.s.host}:{self.s.port} stopped answering: " \
                           f"{_short(exc)}"
                return
            await self.publish([DeviceHeartbeat.create(**self._ids(), device_id=self.device_id,
                                                       gateway="sila2-bridge")], stop)
            waits = [asyncio.create_task(stop.wait()), asyncio.create_task(link.broken.wait())]
            await asyncio.wait(waits, timeout=self.s.heartbeat_s,
                               return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()

    def subscribe(self, link: _Link) -> None:
        """One thread per observable property: each value into the readings queue; a broken
        subscription breaks the link."""
        loop = asyncio.get_running_loop()
        for m in link.description.metrics:
            prop = getattr(getattr(link.client, m.feature), m.prop)
            sub = prop.subscribe()
            link.subscriptions.append(sub)

            def pump(sub=sub, m=m) -> None:
                try:
                    for value in sub:
                        loop.call_soon_threadsafe(self.readings.put_nowait,
                                                  (m, float(value), time.time_ns() // 1000))
                except Exception as exc:  # noqa: BLE001 - the stream broke
                    why = (f"SiLA server {self.s.host}:{self.s.port}: subscription to "
                           f"{m.name} ended: {_short(exc)}")
                    loop.call_soon_threadsafe(_break, link, why)
                else:
                    if not sub.is_cancelled:
                        loop.call_soon_threadsafe(_break, link, f"subscription to {m.name} "
                                                                "ended by the server")

            threading.Thread(target=pump, name=f"sila-{m.name}", daemon=True).start()

    async def disconnect(self) -> None:
        link, self.link = self.link, None
        if link is None:
            return
        for sub in link.subscriptions:
            sub.cancel()
        try:
            await asyncio.to_thread(link.client.close)
        except Exception:  # noqa: BLE001 - closing a dead channel
            pass

    async def publish_readings(self, stop: asyncio.Event) -> None:
        """Values from the subscriptions as MeasurementRecorded, in batches, acknowledged."""
        while not stop.is_set():
            first = await self.readings.get()
            batch = [first]
            while not self.readings.empty() and len(batch) < 500:
                batch.append(self.readings.get_nowait())
            events = []
            for m, value, at_us in batch:
                ids = self._ids()
                events.append(MeasurementRecorded.create(
                    **ids, occurred_at=_from_us(at_us), device_id=self.device_id,
                    metric=m.name, value=value, unit=m.unit))
            await self.publish(events, stop)
            self.published_readings += len(events)


def _break(link: _Link, why: str) -> None:
    if not link.broken.is_set():
        link.why = why
        link.broken.set()


# -- commands -----------------------------------------------------------------------------------

class Commands:
    """The run_consumer handler for lab.commands.

    A CommandDispatched for this device (never a CommandIssued: a command the device-lifecycle
    processor rejected never reaches the instrument):
    - command type `Feature.Command` (or just `Command` when one feature has it) unknown to the
      server, or a payload that is not a JSON object with exactly the command's parameters →
      CommandRejected (unknown_command_type / invalid_payload), nothing executed;
    - expired → nothing (the timeout processor emits CommandTimedOut);
    - the server not connected → waits until it is, or the command expires;
    - an observable command → CommandAccepted (the server accepted the execution), CommandStarted
      (status running), CommandProgress (progress, estimated time left, each intermediate
      response), then CommandCompleted (the responses as a JSON object) or CommandFailed (the
      SiLA error: validation, defined or undefined execution error);
    - an unobservable command → CommandAccepted, CommandStarted, CommandCompleted / Failed.

    Never twice: the ids of commands already final in the log (and of those that began) are
    known from (1) a look-back over this device's partition of lab.commands at start (as far
    back as LABBUS_GATEWAY_COMMAND_LOOKBACK_S), (2) the runtime's `recall` hook — the range
    between the committed offset and the log end, where a crash leaves the events it sent for
    an input not yet committed — and (3) what this handler consumes. A command that began but
    has no final state was interrupted by a crash while the server ran it: it is not run again
    but failed, since the instrument may have acted on it.
    """

    def __init__(self, bridge: Bridge, stop: asyncio.Event) -> None:
        self.b = bridge
        self.stop = stop
        self.final: set[str] = set()
        self.begun: set[str] = set()
        self.accepts = {CommandDispatched.TYPE, *COMMAND_FINAL, *STARTED_OR_LATER}

    def _note(self, event_type: str, command_id: str) -> None:
        if event_type in COMMAND_FINAL:
            self.final.add(command_id)
        elif event_type in STARTED_OR_LATER:
            self.begun.add(command_id)

    def recall(self, event_type: str, record: dict) -> None:
        if record.get("device_id") == self.b.device_id and "command_id" in record:
            self._note(event_type, record["command_id"])

    async def look_back(self, since_ms: int) -> None:
        cfg = self.b.cfg
        tp = TopicPartition(topic_name(cfg, COMMANDS),
                            key_partition(self.b.device_id, COMMANDS.partitions))
        reader = kafka.consumer(cfg, group=None)
        await reader.start()
        try:
            found = (await reader.offsets_for_times({tp: since_ms})).get(tp)
        finally:
            await reader.stop()
        if found is None:
            return  # nothing that recent
        seen = 0
        async for r in kafka.read_ranges(cfg, {tp: found.offset}):
            try:
                kind, rec = self.b.step.codec.decode_record(r.value, plain=True)
            except DecodeError:
                continue
            if kind in self.accepts:
                self.recall(kind, rec)
                seen += 1
        log.info("looked back over lab.commands", extra={"records": seen,
                                                         "final": len(self.final)})

    async def __call__(self, event, _record) -> AsyncIterator[Event]:
        if event.device_id != self.b.device_id:
            return
        cid = event.command_id
        if event.TYPE != CommandDispatched.TYPE:
            self._note(event.TYPE, cid)
            return
        if cid in self.final:
            log.info("command already final; not executed again", extra={"command": cid})
            return
        if cid in self.begun:
            log.warning("command was interrupted while running; failing it, not re-running",
                        extra={"command": cid})
            yield self._event(CommandFailed, cid, "failed", error=(
                "interrupted: the SiLA 2 bridge stopped while the server ran this command; "
                "not run again (the instrument may have acted on it)"))
            self.final.add(cid)
            return
        async for out in self.execute(event):
            yield out

    def _event(self, cls, cid: str, purpose: str, **payload) -> Event:
        seq = self.b.sequence()
        self._note(cls.TYPE, cid)
        return cls.create(source=self.b.source, subject=self.b.device_id, sequence=seq,
                          event_id=uuid.UUID(derived_id(cid, purpose)), command_id=cid,
                          device_id=self.b.device_id, **payload)

    def _resolve(self, command_type: str, commands: dict[str, SilaCommand]) -> SilaCommand | None:
        if command_type in commands:
            return commands[command_type]
        matches = [c for key, c in commands.items() if key.split(".", 1)[1] == command_type]
        return matches[0] if len(matches) == 1 else None

    async def _wait_online(self, cmd: CommandDispatched) -> bool:
        """True once the server is connected; False when the command expired first. Raises
        Stopping when the bridge stops meanwhile (nothing committed: handled after restart)."""
        while not self.b.online.is_set():
            left = cmd.expires_at.timestamp() - time.time()
            if left <= 0:
                return False
            if self.stop.is_set():
                raise Stopping()
            log.info("command waits for the SiLA server", extra={"command": cmd.command_id})
            waits = [asyncio.create_task(self.b.online.wait()),
                     asyncio.create_task(self.stop.wait())]
            await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
        return True

    async def execute(self, cmd: CommandDispatched) -> AsyncIterator[Event]:
        cid = cmd.command_id
        if cmd.expires_at <= utcnow():
            log.info("command expired before it reached the device", extra={"command": cid})
            return
        if not await self._wait_online(cmd):
            log.info("command expired while the SiLA server was offline", extra={"command": cid})
            return
        link = self.b.link
        target = self._resolve(cmd.command_type, link.description.commands)
        if target is None:
            yield self._event(CommandRejected, cid, "rejected", reason_code="unknown_command_type",
                              reason=f"the SiLA server has no command {cmd.command_type!r}; it has "
                                     + ", ".join(sorted(link.description.commands)))
            return
        try:
            payload = json.loads(cmd.payload_json or "{}")
        except ValueError as exc:
            payload, problem = None, f"payload is not JSON: {exc}"
        else:
            problem = None if isinstance(payload, dict) else "payload must be a JSON object"
        if payload is not None and problem is None:
            missing = set(target.parameters) - set(payload)
            extra = set(payload) - set(target.parameters)
            if missing or extra:
                problem = (f"{target.feature}.{target.name} takes the parameters "
                           f"{list(target.parameters)}; missing {sorted(missing)}, unknown "
                           f"{sorted(extra)}")
        if problem is not None:
            yield self._event(CommandRejected, cid, "rejected", reason_code="invalid_payload",
                              reason=problem)
            return
        call = getattr(getattr(link.client, target.feature), target.name)
        log.info("executing", extra={"command": cid, "sila": f"{target.feature}.{target.name}"})
        if not target.observable:
            yield self._event(CommandAccepted, cid, "accepted")
            yield self._event(CommandStarted, cid, "started")
            try:
                responses = await asyncio.to_thread(call, **payload)
            except Exception as exc:  # noqa: BLE001 - a SiLA error, or the connection broke
                yield self._event(CommandFailed, cid, "failed", error=_sila_error(exc))
                return
            yield self._event(CommandCompleted, cid, "completed",
                              result_json=_result_json(responses))
            return
        try:
            instance = await asyncio.to_thread(call, **payload)
        except Exception as exc:  # noqa: BLE001 - ValidationError, CommandExecutionNotAccepted
            yield self._event(CommandFailed, cid, "failed", error=_sila_error(exc))
            return
        yield self._event(CommandAccepted, cid, "accepted")
        async for out in self._follow(cid, instance):
            yield out

    async def _follow(self, cid: str, instance) -> AsyncIterator[Event]:
        """Execution info and intermediate responses until the execution ends."""
        from sila2.framework.command.execution_info import CommandExecutionStatus

        intermediate: queue.Queue = queue.Queue()
        sub = None
        if hasattr(instance, "subscribe_to_intermediate_responses"):
            sub = await asyncio.to_thread(instance.subscribe_to_intermediate_responses)
            sub.add_callback(intermediate.put)
        started = False
        n = 0
        last_progress = None
        try:
            while True:
                status = instance.status
                if not started and status is not None and status != CommandExecutionStatus.waiting \
                        and status != CommandExecutionStatus.finishedWithError:
                    started = True
                    yield self._event(CommandStarted, cid, "started", progress=instance.progress)
                items = []
                while not intermediate.empty():
                    items.append(intermediate.get_nowait())
                progress = instance.progress
                if started and (items or (progress is not None and progress != last_progress)):
                    remaining = instance.estimated_remaining_time
                    for item in items or [None]:
                        n += 1
                        yield self._event(
                            CommandProgress, cid, f"progress/{n}", progress=progress,
                            remaining_s=remaining.total_seconds() if remaining else None,
                            intermediate_json=_result_json(item) if item is not None else None)
                    last_progress = progress
                if instance.done:
                    break
                await asyncio.sleep(0.1)
            try:
                responses = await asyncio.to_thread(instance.get_responses)
            except Exception as exc:  # noqa: BLE001 - the SiLA error of the execution
                yield self._event(CommandFailed, cid, "failed", error=_sila_error(exc))
                return
            if not started:
                yield self._event(CommandStarted, cid, "started", progress=None)
            yield self._event(CommandCompleted, cid, "completed",
                              result_json=_result_json(responses))
        finally:
            if sub is not None:
                sub.cancel()


# -- helpers ------------------------------------------------------------------------------------

def _result_json(responses) -> str:
    if responses is None:
        return "{}"
    value = responses._asdict() if hasattr(responses, "_asdict") else responses
    return json.dumps(value, default=str, sort_keys=True)


def _sila_error(exc: BaseException) -> str:
    """`ValidationError: ...`, `DefinedExecutionError: HeaterFault: ...` and so on."""
    return f"{type(exc).__name__}: {exc}"[:2000]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _from_us(us: int):
    from datetime import UTC, datetime, timedelta

    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


async def run(cfg: Config, stop: asyncio.Event, settings: Settings) -> None:
    """`labbus agent sila2`: until `stop`."""
    load_sila2()  # before anything else imports protobuf
    bridge = Bridge(cfg, settings)
    try:
        await bridge.run(stop)
    except Stopping:
        log.info("stopped while a command waited for the SiLA server; it is handled after the "
                 "restart")
