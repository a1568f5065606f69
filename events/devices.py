"""What every device ingress shares (the gRPC gateway, the SiLA 2 bridge): deterministic event
ids from (device, sequence), versioned registrations, and the
loopback rule for plain text."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import uuid

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
