"""The one cursor codec of the query API: what a route issues reads back typed, anything else is
InvalidCursor with a message naming the route's key."""

import base64
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from labbus.api import cursor
from labbus.api.cursor import InvalidCursor, Key

MEASUREMENTS = Key.of(measured_at=datetime, measurement_id=uuid.UUID)
DEVICES = Key.of(device_id=str)
COMMANDS = Key.of(index=int)


def raw(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def test_what_a_route_issues_reads_back_typed():
    row = {"measured_at": datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC),
           "measurement_id": uuid.uuid4(), "ignored": 1}
    issued = MEASUREMENTS.encode(row)
    assert set(issued) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert MEASUREMENTS.decode(issued) == (row["measured_at"], row["measurement_id"])
    assert DEVICES.decode(DEVICES.encode({"device_id": "dev/ü 1"})) == ("dev/ü 1",)
    assert COMMANDS.decode(COMMANDS.encode({"index": 41})) == (41,)


def test_timestamps_read_back_in_utc():
    local = datetime(2026, 3, 1, 13, tzinfo=timezone(timedelta(hours=1)))
    (t, _) = MEASUREMENTS.decode(cursor.encode(local, uuid.UUID(int=1)))
    assert t == local and t.utcoffset() == timedelta(0)


@pytest.mark.parametrize("key,value,phrase", [
    # the reported 500: an integer where the uuid belongs
    (MEASUREMENTS, cursor.encode("2024-01-01T00:00:00+00:00", 5), "measurement_id must be a uuid"),
    (MEASUREMENTS, cursor.encode("2024-01-01T00:00:00", str(uuid.UUID(int=1))),
     "measured_at must be a date-time"),  # naive: not what the route issues
    (MEASUREMENTS, cursor.encode("0001-01-01T00:00:00+05:00", str(uuid.UUID(int=1))),
     "measured_at"),  # before year 1 in UTC
    (MEASUREMENTS, cursor.encode("yesterday", "x"), "measured_at"),
    (MEASUREMENTS, cursor.encode("2024-01-01T00:00:00+00:00"), "hold [measured_at (date-time), "
                                                               "measurement_id (uuid)]"),
    # the reported acceptance of any JSON by /devices
    (DEVICES, raw('{"a": [1, {"b": null}]}'), "hold [device_id (string)]"),
    (DEVICES, raw('[["x"]]'), "device_id must be a string"),
    (DEVICES, raw("[null]"), "device_id must be a string"),
    (DEVICES, raw('["a\\u0000b"]'), "device_id must be a string"),
    (DEVICES, raw("[[[[[[[[[[1]]]]]]]]]]"), "device_id"),
    (COMMANDS, raw("[true]"), "index must be an integer"),
    (COMMANDS, raw("[1.0]"), "index must be an integer"),
    (COMMANDS, raw("[NaN]"), "index must be an integer"),
    (COMMANDS, "not-a-cursor", "not a cursor of this API"),
    (COMMANDS, "%%%", "not a cursor of this API"),
    (COMMANDS, raw("[1]") + "=", "not a cursor of this API"),  # padding is not issued
    (COMMANDS, base64.urlsafe_b64encode(b"\xff\xfe").decode(), "not a cursor of this API"),
    (COMMANDS, "A" * (cursor.MAX_LENGTH + 4), "not a cursor of this API"),
])
def test_anything_else_is_refused_with_the_expected_shape(key, value, phrase):
    with pytest.raises(InvalidCursor) as refused:
        key.decode(value)
    assert phrase in str(refused.value)
    assert len(str(refused.value)) < 400  # the cursor is quoted, cut short


def test_a_key_holds_only_types_it_can_read_back():
    with pytest.raises(TypeError):
        Key.of(value=float)
