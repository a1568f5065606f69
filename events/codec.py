"""Avro single-object encoding (0xC3 0x01 + 8-byte CRC-64-AVRO fingerprint + Avro binary).

Schemas come from the `schemas/` folder, so any Avro library holding those files can decode a
message without a registry server. Current schemas are the reader schemas; older versions kept in
`schemas/previous/<full name>/v<N>.avsc` are registered as writer schemas, so data written with
them still decodes (Avro schema resolution fills fields added since).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from labbus.events.model import ENVELOPE_FIELDS, EVENT_TYPES, Actor, Envelope, Event

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
SCHEMAS_DIR = Path(str(resources.files("labbus.schemas")))  # shipped as package data
VERSION_PROPERTY = "labbus.version"


class DecodeError(ValueError):
    """Bytes that cannot become an event; `kind` is the dead-letter error_type."""

    kind = "corrupt_payload"


class NotSingleObject(DecodeError):
    kind = "not_single_object"


class UnknownFingerprint(DecodeError):
    kind = "unknown_fingerprint"


@dataclass(frozen=True)
class SchemaEntry:
    name: str
    version: int
    parsed: Any
    fingerprint: bytes
    path: Path
    plain: Any  # the same schema without logical types: uuids stay str, timestamps int micros


def _strip_logical_types(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [_strip_logical_types(v) for v in node]
    return node


def _load(path: Path) -> tuple[dict, Any, bytes, Any]:
    raw = json.loads(path.read_text())
    parsed = parse_schema(raw)
    fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
    plain = parse_schema(_strip_logical_types(raw))
    return raw, parsed, fp, plain


class Codec:
    def __init__(self, schemas_dir: Path = SCHEMAS_DIR) -> None:
        self.current: dict[str, SchemaEntry] = {}
        self.writers: dict[bytes, SchemaEntry] = {}
        for path in sorted(schemas_dir.glob("*.avsc")):
            raw, parsed, fp, plain = _load(path)
            name = f"{raw['namespace']}.{raw['name']}"
            entry = SchemaEntry(name, int(raw.get(VERSION_PROPERTY, 1)), parsed, fp, path, plain)
            self.current[name] = entry
            self.writers[fp] = entry
        for path in sorted(schemas_dir.glob("previous/*/v*.avsc")):
            raw, parsed, fp, plain = _load(path)
            name = f"{raw['namespace']}.{raw['name']}"
            version = int(raw.get(VERSION_PROPERTY, path.stem[1:]))
            self.writers.setdefault(fp, SchemaEntry(name, version, parsed, fp, path, plain))
        self._payload_fields = {
            name: tuple(f.name for f in fields(cls) if f.name != "envelope")
            for name, cls in EVENT_TYPES.items()
        }

    def schema(self, event_type: str) -> SchemaEntry:
        try:
            return self.current[event_type]
        except KeyError:
            raise KeyError(f"no schema for event type {event_type!r} in {SCHEMAS_DIR}") from None

    def encode(self, event: Event) -> bytes:
        entry = self.schema(event.TYPE)
        record = {name: getattr(event.envelope, name) for name in ENVELOPE_FIELDS}
        record["schema_version"] = entry.version
        if event.envelope.actor is not None:
            record["actor"] = event.envelope.actor.to_record()
        for name in self._payload_fields[event.TYPE]:
            record[name] = getattr(event, name)
        return self._write(entry, entry.parsed, record)

    def encode_plain(self, event_type: str, record: dict) -> bytes:
        """Encode a plain record (uuids as str, timestamps as int micros): the hot-path form.
        Its schema_version is set to the current schema's."""
        entry = self.schema(event_type)
        record["schema_version"] = entry.version
        return self._write(entry, entry.plain, record)

    @staticmethod
    def _write(entry: SchemaEntry, schema: Any, record: dict) -> bytes:
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(entry.fingerprint)
        schemaless_writer(buf, schema, record)
        return buf.getvalue()

    def decode_record(self, data: bytes, plain: bool = False) -> tuple[str, dict]:
        """Decode to (event type, record dict) without building the dataclass. With plain=True
        logical types are not converted (uuids stay str, timestamps int micros): much faster."""
        if data is None or len(data) < HEADER_LEN or data[:2] != MAGIC:
            raise NotSingleObject("not Avro single-object encoded (missing 0xC3 0x01 header)")
        fp = bytes(data[2:HEADER_LEN])
        writer = self.writers.get(fp)
        if writer is None:
            raise UnknownFingerprint(f"unknown schema fingerprint {fp.hex()}")
        reader = self.current.get(writer.name, writer)
        if plain:
            schemas = (writer.plain, None if reader is writer else reader.plain)
        else:
            schemas = (writer.parsed, None if reader is writer else reader.parsed)
        try:
            record = schemaless_reader(io.BytesIO(data[HEADER_LEN:]), *schemas)
        except Exception as exc:  # fastavro raises several types for truncated or garbled data
            raise DecodeError(f"cannot decode {writer.name} v{writer.version}: {exc!r}") from exc
        return writer.name, record

    def decode(self, data: bytes) -> Event:
        name, record = self.decode_record(data)
        cls = EVENT_TYPES.get(name)
        if cls is None:
            raise UnknownFingerprint(f"schema {name} has no event class in this process")
        envelope = Envelope(**{f: record[f] for f in ENVELOPE_FIELDS})
        if envelope.actor is not None:
            envelope = replace(envelope, actor=Actor.from_record(envelope.actor))
        return cls(envelope, **{f: record[f] for f in self._payload_fields[name]})


_default: Codec | None = None


def default_codec() -> Codec:
    global _default
    if _default is None:
        _default = Codec()
    return _default
