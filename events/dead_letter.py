"""Dead letters: the original bytes, the error, and where the message came from."""

from __future__ import annotations

import uuid

from labbus.events.codec import DecodeError
from labbus.events.model import DeadLetter

_NAMESPACE = uuid.UUID("6f1c2a52-5d0e-4c43-9a55-0d3b5e1d7a10")


def dead_letter(*, topic: str, partition: int, offset: int, key: bytes | None,
                value: bytes | None, error: Exception, failed_by: str,
                error_type: str | None = None) -> DeadLetter:
    kind = error_type or (error.kind if isinstance(error, DecodeError) else "processing_error")
    return DeadLetter.create(
        event_id=uuid.uuid5(_NAMESPACE, f"{failed_by}:{topic}:{partition}:{offset}"),
        source=failed_by, subject=f"{topic}/{partition}/{offset}", sequence=offset,
        source_topic=topic, source_partition=partition, source_offset=offset,
        original_key=key, original_value=value, error_type=kind, error=str(error),
        failed_by=failed_by,
    )
