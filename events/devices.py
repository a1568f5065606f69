"""What every device ingress shares (the gRPC gateway, the SiLA 2 bridge): deterministic event
ids from (device, sequence), versioned registrations, and the
loopback rule for plain text."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass

from labbus.events.config import Config
from labbus.events.model import DeviceRegistered, DeviceSpecChanged, Event, derived_id


def reading_id(device_id: str, sequence: int) -> str:
    """The event id of a device's message: the same (device, sequence) is the same event."""
    return derived_id(f"device/{device_id}", f"seq/{sequence}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def registration_events(*, source: str, device_id: str, meta: dict, specs: list[dict],
                        known_specs: list[dict] | None, known_version: int | None,
                        ) -> tuple[int, list[Event]]:
    """(spec version, events) of a (re-)registration that changes something: the first is
    version 1; different specs are version n+1 with a DeviceSpecChanged before the new
    DeviceRegistered; the same specs with other metadata keep the version. `meta`: device_type,
    model, location, attributes. Ids derive from the device, version and content, so a retried
    registration is the same event. (The caller decides whether anything changed at all.)"""
    changed = known_specs is not None and known_specs != specs
    version = 1 if known_version is None else known_version + changed
    content = json.dumps([meta, specs], sort_keys=True).encode()
    digest = hashlib.sha1(content).hexdigest()[:16]
    events: list[Event] = []
    if changed:
        events.append(DeviceSpecChanged.create(
            source=source, subject=device_id, sequence=version,
            event_id=uuid.UUID(derived_id(f"device/{device_id}", f"spec/{version}/{digest}")),
            device_id=device_id, spec_version=version, previous_specs=known_specs, specs=specs))
    events.append(DeviceRegistered.create(
        source=source, subject=device_id, sequence=version,
        event_id=uuid.UUID(derived_id(f"device/{device_id}", f"registered/{version}/{digest}")),
        device_id=device_id, metrics=[s["metric"] for s in specs], specs=specs,
        spec_version=version, **meta))
    return version, events


def key_partition(key: str, partitions: int) -> int:
    """The partition the kernel's producer (Kafka's default partitioner) puts `key` in."""
    from aiokafka.partitioner import DefaultPartitioner

    return DefaultPartitioner()(key.encode(), list(range(partitions)), list(range(partitions)))


@dataclass
class Registration:
    first_ms: int  # the broker time of the device's first DeviceRegistered
    latest: dict  # its DeviceRegistered of the highest spec_version, as a plain record


async def registrations(cfg: Config, device_ids: Collection[str]) -> dict[str, Registration]:
    """The registrations of `device_ids` so far, read from their partitions of lab.devices."""
    from aiokafka import TopicPartition

    from labbus.events import kafka
    from labbus.events.codec import DecodeError, default_codec
    from labbus.events.topics import DEVICES, topic_name

    codec, wanted = default_codec(), set(device_ids)
    topic = topic_name(cfg, DEVICES)
    tps = {TopicPartition(topic, key_partition(d, DEVICES.partitions)): None for d in wanted}
    found: dict[str, Registration] = {}
    async for r in kafka.read_ranges(cfg, tps):
        try:
            kind, rec = codec.decode_record(r.value, plain=True)
        except DecodeError:
            continue
        device = rec.get("device_id") if kind == DeviceRegistered.TYPE else None
        if device not in wanted:
            continue
        known = found.get(device)
        if known is None:
            found[device] = Registration(r.timestamp, rec)
            continue
        known.first_ms = min(known.first_ms, r.timestamp)
        if rec["spec_version"] >= known.latest["spec_version"]:
            known.latest = rec
    return found


def commands_horizon_ms(cfg: Config, first_registered_ms: int | None) -> int:
    """Where a device agent's first run starts reading lab.commands (run_consumer's
    first_run_since_ms), instead of the topic's whole history: no command is dispatched to a
    device before it is registered, nor is one older than LABBUS_GATEWAY_COMMAND_LOOKBACK_S
    still to run. A device never registered starts now: call this before registering it."""
    now_ms = int(time.time() * 1000)
    return max(now_ms - cfg.gateway_command_lookback_s * 1000, first_registered_ms or now_ms)
