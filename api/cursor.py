"""Opaque pagination cursors: base64url (unpadded) of a JSON list of one page's last sort key.

Every paginated route declares the shape of its sort key once, as a `Key`, and both writes its
`next_cursor` and reads the `cursor` parameter through it. A cursor that does not decode to
exactly that shape (the right number of values, each of the right type) was not issued by this
route: `decode` raises `InvalidCursor`, which the app answers with 400 and a message naming the
expected shape.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

MAX_LENGTH = 1024  # far above any cursor this API issues
PATTERN = r"^[A-Za-z0-9_-]*$"  # the base64url alphabet, unpadded
_ALPHABET = re.compile(PATTERN)


class InvalidCursor(ValueError):
    """A cursor that this route did not issue."""


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot put {type(value).__name__} in a cursor")


def encode(*values: Any) -> str:
    """The cursor of the given sort-key values (str, int, datetime, UUID)."""
    text = json.dumps(values, default=_json_value, separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _text(value: Any) -> str:
    if not isinstance(value, str) or "\x00" in value:  # PostgreSQL text never holds NUL
        raise ValueError
    return value


def _integer(value: Any) -> int:
    if type(value) is not int:  # not bool, not float
        raise ValueError
    return value


def _timestamp(value: Any) -> datetime:
    parsed = datetime.fromisoformat(_text(value))
    if parsed.tzinfo is None:
        raise ValueError
    return parsed.astimezone(UTC)  # OverflowError at the ends of the calendar


def _uuid(value: Any) -> uuid.UUID:
    return uuid.UUID(_text(value))


# The types a sort key may have: how each is read back from JSON, and its name in messages.
_READERS: dict[type, tuple[Callable[[Any], Any], str]] = {
    str: (_text, "string"), int: (_integer, "integer"), datetime: (_timestamp, "date-time"),
    uuid.UUID: (_uuid, "uuid")}
_ARTICLES = {"integer": "an"}


@dataclass(frozen=True)
class Key:
    """A route's sort key: (column, type) pairs, in sort order."""

    fields: tuple[tuple[str, type], ...]

    @classmethod
    def of(cls, **fields: type) -> Key:
        for kind in fields.values():
            if kind not in _READERS:
                raise TypeError(f"a cursor cannot hold {kind.__name__}")
        return cls(tuple(fields.items()))

    def describe(self) -> str:
        return "[" + ", ".join(f"{name} ({_READERS[kind][1]})" for name, kind in self.fields) + "]"

    def encode(self, row: Mapping[str, Any]) -> str:
        """The cursor of the page that ends with `row`."""
        return encode(*(row[name] for name, _ in self.fields))

    def decode(self, cursor: str) -> tuple:
        """The sort-key values of `cursor`, typed; InvalidCursor for anything else."""
        problem = f"invalid cursor {cursor[:80]!r}"
        try:
            if len(cursor) > MAX_LENGTH or not _ALPHABET.match(cursor):
                raise ValueError
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            values = json.loads(raw)
        except (ValueError, binascii.Error, RecursionError) as exc:
            raise InvalidCursor(f"{problem}: not a cursor of this API; pass the next_cursor "
                                "of a previous page unchanged") from exc
        if not isinstance(values, list) or len(values) != len(self.fields):
            raise InvalidCursor(f"{problem}: this route's cursors hold {self.describe()}; pass "
                                "the next_cursor of a previous page of the same route unchanged")
        typed = []
        for value, (name, kind) in zip(values, self.fields, strict=True):
            try:
                typed.append(_READERS[kind][0](value))
            except (TypeError, ValueError, OverflowError) as exc:
                kind_name = _READERS[kind][1]
                raise InvalidCursor(
                    f"{problem}: {name} must be {_ARTICLES.get(kind_name, 'a')} {kind_name}, "
                    f"not {value!r:.60}; this route's cursors hold {self.describe()}") from exc
        return tuple(typed)
