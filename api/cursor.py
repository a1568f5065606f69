"""Opaque pagination cursors: base64url of a small JSON list of sort-key values."""

from __future__ import annotations

import base64
import json

from fastapi import HTTPException


def encode(*values) -> str:
    return base64.urlsafe_b64encode(json.dumps(values, default=str).encode()).decode().rstrip("=")


def decode(cursor: str, arity: int) -> list:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(values, list) or len(values) != arity:
            raise ValueError("wrong shape")
        return values
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(422, f"invalid cursor {cursor!r}: pass the next_cursor of a "
                                 "previous page unchanged") from exc
