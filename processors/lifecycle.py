"""Device status and command lifecycle: one faust processor, state per device.

Inputs (co-partitioned: key device_id, 6 partitions each): lab.devices.status (DeviceHeartbeat,
DeviceStatusChanged) and lab.commands (every command event). Registrations (lab.devices, 3
partitions, compacted) are a `View` every worker reads in full: device type and heartbeat
interval per device. State per device (JSON, faust Table `devices`):

    {"p": input partition, "status": ONLINE|OFFLINE|MAINTENANCE|ERROR|None, "by": who set it,
     "hb": {"id", "seq", "at" (log time ms), "dev_us" (device time)} | None,
     "pending": id of a status event emitted and not yet read back | None,
     "cmds": {command_id: {"k": idempotency key, "t": command type, "h": digest of type and
              payload, "exp": expires_at µs, "s": dispatched|accepted|started|<final>}}}

A CommandIssued is judged here once: refused → CommandRejected; acceptable → CommandDispatched,
a copy of the command, which is all the relays (gRPC gateway, SiLA 2 bridge) deliver to devices.
So a rejected command never reaches a device, and a repeated idempotency key is dispatched once.

Everything here is plain code: `handle` (one input event) and `tick` (the timer) are pure
functions of their arguments; the faust driver (events/faust_runtime.py) runs them.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from labbus.events.model import (
    CommandAccepted,
    CommandCompleted,
    CommandDispatched,
    CommandFailed,
    CommandIssued,
    CommandRejected,
    CommandStarted,
    CommandTimedOut,
    DeviceHeartbeat,
    DeviceRegistered,
    DeviceStatusChanged,
    Event,
    command_digest,
    derived_id,
    dispatched_id,
)

log = logging.getLogger(__name__)

PROCESS = "devices"
FINAL = {CommandCompleted.TYPE: "completed", CommandFailed.TYPE: "failed",
         CommandRejected.TYPE: "rejected", CommandTimedOut.TYPE: "timed_out"}
PROGRESS = {CommandAccepted.TYPE: "accepted", CommandStarted.TYPE: "started"}
ORDER = {"dispatched": 0, "accepted": 1, "started": 2}
FINAL_STATES = set(FINAL.values())
COMMAND_MEMORY_US = 24 * 3600 * 1_000_000  # final commands remembered this long past expiry
# Rejection reasons (CommandRejected.reason_code)
UNKNOWN_DEVICE = "unknown_device"
DEVICE_OFFLINE = "device_offline"
BAD_PAYLOAD = "bad_payload"
UNKNOWN_COMMAND_TYPE = "unknown_command_type"
IDEMPOTENCY_CONFLICT = "idempotency_conflict"


# -- registrations (the View over lab.devices) --------------------------------------------------

def heartbeat_interval(attributes: Mapping[str, str], specs: Iterable[Mapping]) -> float | None:
    """The interval a device promises to be heard in: its `heartbeat_interval_s` attribute, else
    the largest `expected_interval_s` of its measurement specs; None when it promises none."""
    raw = (attributes or {}).get("heartbeat_interval_s")
    if raw:
        try:
            value = float(raw)
            if value > 0:
                return value
        except ValueError:
            pass
    intervals = [float(s.get("expected_interval_s") or 0) for s in specs or ()]
    intervals = [i for i in intervals if i > 0]
    return max(intervals) if intervals else None


def registration(kind: str, record: dict) -> tuple[str, Any] | None:
    """View reader: DeviceRegistered → (device id, {"type", "interval_s", "v"})."""
    if kind != DeviceRegistered.TYPE:
        return None
    return record["device_id"], {
        "type": record["device_type"], "v": record.get("spec_version", 1),
        "interval_s": heartbeat_interval(record.get("attributes") or {},
                                         record.get("specs") or [])}


# -- command specs (JSON Schema per device type and command type) -------------------------------

DEFAULT_SPECS_DIR = Path(__file__).resolve().parent.parent / "schemas" / "commands"


@dataclass
class CommandSpecs:
    """`<dir>/<device type>/<command type>.json`, one JSON Schema per command. A device type
    with a directory accepts only the command types it has a schema for; a device type without
    one is not checked (any JSON object)."""

    root: Path = DEFAULT_SPECS_DIR
    _cache: dict = field(default_factory=dict)

    def check(self, device_type: str, command_type: str, payload: Any) -> tuple[str, str] | None:
        """None when the payload is acceptable, else (reason code, reason)."""
        validator = self._validator(device_type, command_type)
        if validator is None:
            return None
        if validator == "unknown":
            return (UNKNOWN_COMMAND_TYPE,
                    f"device type {device_type!r} has no command {command_type!r} "
                    f"(no {self.root / device_type / (command_type + '.json')})")
        errors = sorted(validator.iter_errors(payload), key=lambda e: list(e.path))
        if not errors:
            return None
        where = "/".join(str(p) for p in errors[0].path) or "(payload)"
        return BAD_PAYLOAD, (f"{command_type} payload breaks its schema at {where}: "
                             f"{errors[0].message}")

    def _validator(self, device_type: str, command_type: str) -> Any:
        key = (device_type, command_type)
        if key not in self._cache:
            self._cache[key] = self._load(device_type, command_type)
        return self._cache[key]

    def _load(self, device_type: str, command_type: str) -> Any:
        import jsonschema

        folder = self.root / device_type
        if not device_type or "/" in device_type or device_type.startswith(".") \
                or not folder.is_dir():
            return None
        path = folder / f"{command_type}.json"
        if "/" in command_type or command_type.startswith(".") or not path.is_file():
            return "unknown"
        schema = json.loads(path.read_text())
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        return cls(schema)


def _us(ts: datetime) -> int:
    return int(ts.timestamp() * 1_000_000) if isinstance(ts, datetime) else int(ts)


def _from_us(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, UTC)


# -- the handler --------------------------------------------------------------------------------

def _status(device: str, status: str, reason: str, event_id: str, cause: str) -> Event:
    return DeviceStatusChanged.create(
        source=PROCESS, subject=device, sequence=0, event_id=uuid.UUID(event_id),
        causation_id=uuid.UUID(cause), device_id=device, status=status, reason=reason)


def _rejected(cmd: CommandIssued, code: str, reason: str, command_id: str | None = None
              ) -> Event:
    return CommandRejected.create(
        source=PROCESS, subject=cmd.device_id, sequence=0,
        event_id=uuid.UUID(derived_id(cmd.event_id, "rejected")), causation_id=cmd.event_id,
        correlation_id=cmd.envelope.correlation_id, command_id=command_id or cmd.command_id,
        device_id=cmd.device_id, reason_code=code, reason=reason)


def _dispatched(cmd: CommandIssued) -> Event:
    return CommandDispatched.create(
        source=PROCESS, subject=cmd.device_id, sequence=0,
        event_id=uuid.UUID(dispatched_id(cmd.event_id)), causation_id=cmd.event_id,
        correlation_id=cmd.envelope.correlation_id, command_id=cmd.command_id,
        device_id=cmd.device_id, idempotency_key=cmd.idempotency_key,
        command_type=cmd.command_type, payload_json=cmd.payload_json,
        expires_at=cmd.expires_at, issued_by=cmd.issued_by)


def conflict_id(command_id: str, issued_event_id: Any) -> str:
    """The id a refused repetition of an idempotency key with another payload is rejected
    under (the original command keeps its id and its course)."""
    return derived_id(command_id, f"conflict/{issued_event_id}")


def new_state(partition: int) -> dict:
    return {"p": partition, "status": None, "by": None, "hb": None, "pending": None, "cmds": {}}


def handle(state: dict | None, event: Event, record: Any, registry: Any, *,
           specs: CommandSpecs) -> tuple[dict, list[Event]]:
    """One input event of one device → (new state, events)."""
    s = dict(state) if state else new_state(record.partition)
    s["p"] = record.partition
    out: list[Event] = []
    if isinstance(event, DeviceHeartbeat):
        hb = {"id": str(event.event_id), "seq": event.envelope.sequence,
              "at": record.timestamp, "dev_us": _us(event.envelope.occurred_at)}
        s["hb"] = hb
        if s["status"] in (None, "OFFLINE") and s["pending"] is None:
            eid = derived_id(hb["id"], "online")
            why = "first heartbeat" if s["status"] is None else "heartbeats resumed"
            out.append(_status(event.device_id, "ONLINE", why, eid, hb["id"]))
            s["pending"] = eid
    elif isinstance(event, DeviceStatusChanged):
        s["status"], s["by"] = event.status, event.envelope.source
        if s["pending"] == str(event.event_id):
            s["pending"] = None
        hb = s["hb"]
        if (event.status == "OFFLINE" and event.envelope.source == PROCESS and hb is not None
                and str(event.envelope.causation_id) != hb["id"] and s["pending"] is None):
            # decided on an older heartbeat than the latest: the device is alive after all
            eid = derived_id(hb["id"], "online")
            out.append(_status(event.device_id, "ONLINE", "heartbeats resumed", eid, hb["id"]))
            s["pending"] = eid
    elif isinstance(event, CommandIssued):
        out.extend(_issued(s, event, record, registry, specs))
    elif event.TYPE in FINAL or event.TYPE in PROGRESS:
        cmds = dict(s["cmds"])
        c = cmds.get(event.command_id)
        new = FINAL.get(event.TYPE) or PROGRESS[event.TYPE]
        if c is not None and c["s"] not in FINAL_STATES and (
                new in FINAL_STATES or ORDER[new] > ORDER.get(c["s"], -1)):
            cmds[event.command_id] = {**c, "s": new}
            s["cmds"] = cmds
    _forget(s, record.timestamp * 1000)
    return s, out


def _issued(s: dict, cmd: CommandIssued, record: Any, registry: Any, specs: CommandSpecs
            ) -> list[Event]:
    digest = command_digest(cmd.command_type, cmd.payload_json)
    known = s["cmds"].get(cmd.command_id)
    if known is not None:
        if known["h"] == digest:
            return []  # the same command again: it runs (or ran) once
        return [_rejected(cmd, IDEMPOTENCY_CONFLICT,
                          f"idempotency key {cmd.idempotency_key!r} was used for command "
                          f"{cmd.command_id} with another type or payload; that command "
                          "stands, this request is refused",
                          conflict_id(cmd.command_id, cmd.event_id))]
    entry = {"k": cmd.idempotency_key, "t": cmd.command_type, "h": digest,
             "exp": _us(cmd.expires_at), "s": "issued"}
    s["cmds"] = {**s["cmds"], cmd.command_id: entry}
    refusal = _refusal(s, cmd, registry, specs)
    if refusal is None:
        entry["s"] = "dispatched"
        return [_dispatched(cmd)]
    entry["s"] = "rejected"
    return [_rejected(cmd, *refusal)]


def _refusal(s: dict, cmd: CommandIssued, registry: Any, specs: CommandSpecs
             ) -> tuple[str, str] | None:
    reg = registry.get(cmd.device_id)
    if reg is None:
        return UNKNOWN_DEVICE, f"device {cmd.device_id!r} is not registered"
    if s["status"] == "OFFLINE":
        return DEVICE_OFFLINE, f"device {cmd.device_id!r} is offline"
    if s["status"] is None and s["hb"] is None:
        return DEVICE_OFFLINE, f"device {cmd.device_id!r} has not been heard from"
    try:
        payload = json.loads(cmd.payload_json or "{}")
    except ValueError as exc:
        return BAD_PAYLOAD, f"payload is not JSON: {exc}"
    if not isinstance(payload, dict):
        return BAD_PAYLOAD, "payload must be a JSON object"
    return specs.check(reg["type"], cmd.command_type, payload)


def _forget(s: dict, now_us: int) -> None:
    """Final commands are remembered (idempotency) until a day past their expiry."""
    old = [cid for cid, c in s["cmds"].items()
           if c["s"] in FINAL_STATES and c["exp"] + COMMAND_MEMORY_US < now_us]
    if old:
        s["cmds"] = {cid: c for cid, c in s["cmds"].items() if cid not in old}


# -- the timer ----------------------------------------------------------------------------------

def tick(states: Mapping[str, dict], now_ms: int, registry: Any, multiple: float,
         behind: Mapping[int, int] | None = None) -> list[Event]:
    """OFFLINE for devices not heard from within `multiple` × their interval; CommandTimedOut for
    open commands past expires_at. Ids derive from the state, so deciding twice is one event.
    `behind`: {partition: log time (ms) of the last record handled} where the worker has not
    read its inputs to the end; there that time is "now" (a heartbeat or a final state may be
    waiting unread: the silence is judged only as far as it was read)."""
    out: list[Event] = []
    for device, s in states.items():
        now_ms_here = (behind or {}).get(s.get("p"), now_ms)
        hb = s.get("hb")
        reg = registry.get(device)
        interval = reg.get("interval_s") if reg else None
        if (hb is not None and interval and s.get("status") != "OFFLINE"
                and now_ms_here - hb["at"] > multiple * interval * 1000):
            silent = (now_ms_here - hb["at"]) / 1000
            out.append(_status(device, "OFFLINE",
                               f"no heartbeat for {silent:.1f} s (expected every {interval:g} s, "
                               f"offline after {multiple:g} intervals)",
                               derived_id(hb["id"], "offline"), hb["id"]))
        for cid, c in s.get("cmds", {}).items():
            if c["s"] not in FINAL_STATES and c["exp"] <= now_ms_here * 1000:
                out.append(CommandTimedOut.create(
                    source=PROCESS, subject=device, sequence=0,
                    event_id=uuid.UUID(derived_id(cid, "timed_out")), command_id=cid,
                    device_id=device, expires_at=_from_us(c["exp"])))
    return out


class Ticker:
    """`tick` with the registry and the multiple bound, and a short memory of what it emitted
    (an event stays in the state's future until it is read back: not sent again meanwhile)."""

    def __init__(self, registry: Any, multiple: float, remember_s: float = 10.0) -> None:
        self.registry = registry
        self.multiple = multiple
        self.remember_ms = remember_s * 1000
        self.sent: dict[Any, int] = {}
        self.__name__ = "lifecycle"

    def __call__(self, states: Mapping[str, dict], now_ms: int,
                 behind: Mapping[int, int] | None = None) -> list[Event]:
        self.sent = {k: t for k, t in self.sent.items() if now_ms - t < self.remember_ms}
        out = [e for e in tick(states, now_ms, self.registry, self.multiple, behind)
               if e.event_id not in self.sent]
        for e in out:
            self.sent[e.event_id] = now_ms
        return out


# -- the faust app ------------------------------------------------------------------------------

def build_app(cfg: Any, *, tick_s: float = 1.0, **settings: Any) -> Any:
    import functools

    from labbus.events import faust_runtime
    from labbus.events.topics import COMMANDS, DEVICE_STATUS, DEVICES

    registry = faust_runtime.View(cfg, DEVICES, registration)
    specs = CommandSpecs(cfg.command_schemas or DEFAULT_SPECS_DIR)
    handler = functools.partial(_handle_with, specs=specs)
    ticker = Ticker(registry, cfg.offline_after_intervals)
    return faust_runtime.build_app(
        cfg, PROCESS, [DEVICE_STATUS, COMMANDS], handler, accepts=ACCEPTS, table="devices",
        view=registry, timers=[(tick_s, ticker)], **settings)


def _handle_with(state: Any, event: Event, record: Any, registry: Any, *,
                 specs: CommandSpecs) -> tuple[Any, list[Event]]:
    return handle(state, event, record, registry, specs=specs)


ACCEPTS = {DeviceHeartbeat.TYPE, DeviceStatusChanged.TYPE, CommandIssued.TYPE,
           CommandAccepted.TYPE, CommandStarted.TYPE, *FINAL}


def run(cfg: Any) -> None:
    """Run the device-lifecycle worker until SIGINT/SIGTERM; start more and they share the
    devices."""
    from labbus.events import faust_runtime

    faust_runtime.run(build_app(cfg), cfg)
