"""The commands read side as plain code: status ranks (Python, migration 0005, API models), the
statements a CommandDispatched and a CommandProgress become, and what `command send --wait`
shows of a command's events."""

from __future__ import annotations

import json
import re
import typing
from datetime import UTC, datetime, timedelta

from aiokafka import TopicPartition

from labbus.api import models
from labbus.deploy import commands as cmds
from labbus.events.codec import default_codec
from labbus.events.model import (
    CommandAccepted,
    CommandCompleted,
    CommandDispatched,
    CommandIssued,
    CommandProgress,
    CommandRejected,
    CommandStarted,
)
from labbus.events.runtime import Positioned
from labbus.events.topics import COMMANDS
from labbus.projections import postgres_devices as pd
from labbus.projections.migrate import MIGRATIONS

T0 = datetime(2026, 3, 1, tzinfo=UTC)
CID, DEVICE = "cmd-1", "dev-1"


def _e(cls, seconds: float, **fields):
    return cls.create(source="t", subject=DEVICE, sequence=0,
                      occurred_at=T0 + timedelta(seconds=seconds), command_id=CID,
                      device_id=DEVICE, **fields)


COPY = dict(idempotency_key="k", command_type="tare", payload_json='{"zero": true}',
            expires_at=T0 + timedelta(seconds=30), issued_by="alice")


def test_dispatched_ranks_between_issued_and_accepted_everywhere():
    rank = pd.COMMAND_RANK
    assert rank["ISSUED"] < rank["DISPATCHED"] < rank["ACCEPTED"] < rank["STARTED"]
    assert min(rank[s] for s in pd.COMMAND_FINAL) > rank["STARTED"]
    # migration 0005 sets the stored ranks from the status names: the same numbers
    sql = (MIGRATIONS / "0005_command_dispatched_progress.sql").read_text()
    cases = re.findall(r"SET status_rank = CASE status(.*?)END;", sql, re.S)
    assert len(cases) == 2
    for case in cases:
        assert {s: int(n) for s, n in re.findall(r"WHEN '(\w+)' THEN (\d+)", case)} == rank
    # every event of the commands topic has a status; the API knows each status and event
    assert set(pd.COMMAND_STATUS) == set(COMMANDS.event_types)
    assert set(typing.get_args(models.CommandStatus)) == set(rank)
    assert typing.get_args(models.CommandEventType) == COMMANDS.event_types


def _args(event) -> dict:
    codec = default_codec()
    plain = codec.decode_record(codec.encode(event), plain=True)
    [(sql, args)] = pd.DEVICE_SQL[event.TYPE](Positioned(TopicPartition("t", 0), 0, *plain))
    names = ("event_id", "command_id", "device_id", "status", "rank", "at", "source", "detail",
             "idempotency_key", "command_type", "payload", "issued_by", "issued_at",
             "expires_at", "progress", "result", "error", "reason_code", "reason", "event_type",
             "remaining_s", "intermediate", "progress_at", "progress_event_id")
    assert len(args) == len(names) == max(int(n) for n in re.findall(r"\$(\d+)", sql))
    return dict(zip(names, args, strict=True))


def test_a_progress_report_is_a_started_entry_and_the_rows_latest_report():
    progress = _e(CommandProgress, 2.5, progress=0.8, remaining_s=1.5,
                  intermediate_json='{"mass_g": 10.0}')
    a = _args(progress)
    assert (a["status"], a["rank"], a["event_type"]) == ("STARTED", 4, CommandProgress.TYPE)
    assert (a["progress"], a["remaining_s"], a["intermediate"]) == (0.8, 1.5, '{"mass_g": 10.0}')
    assert a["progress_at"] == a["at"] == T0 + timedelta(seconds=2.5)
    assert a["progress_event_id"] == str(progress.event_id)
    assert json.loads(a["detail"]) == {"progress": 0.8, "remaining_s": 1.5,
                                       "intermediate": {"mass_g": 10.0}}
    # a CommandStarted reports progress only when it says how far
    assert _args(_e(CommandStarted, 2, progress=0.0))["progress_at"] is not None
    silent = _args(_e(CommandStarted, 2))
    assert silent["progress_at"] is None and silent["progress_event_id"] is None
    # an intermediate response that is not JSON is kept as a JSON string
    assert _args(_e(CommandProgress, 3, intermediate_json="warming"))["intermediate"] == \
        '"warming"'


def test_a_dispatch_is_a_copy_of_the_command_without_the_issue_time():
    a = _args(_e(CommandDispatched, 0.5, **COPY))
    assert (a["status"], a["rank"], a["event_type"]) == ("DISPATCHED", 2,
                                                         CommandDispatched.TYPE)
    assert (a["command_type"], a["payload"], a["issued_by"]) == ("tare", '{"zero": true}',
                                                                 "alice")
    assert a["issued_at"] is None and a["progress_at"] is None
    assert _args(_e(CommandIssued, 0, **COPY))["issued_at"] == T0


def test_the_wait_display_follows_the_steps_and_the_progress():
    display = cmds.Display()
    shown = []
    for event in (_e(CommandIssued, 0, **COPY), _e(CommandDispatched, 0.5, **COPY),
                  _e(CommandAccepted, 1), _e(CommandStarted, 2),
                  _e(CommandProgress, 2.2, progress=0.25, remaining_s=6.2),
                  _e(CommandAccepted, 1),  # late: shows nothing
                  _e(CommandProgress, 2.5, progress=0.75, remaining_s=1.5,
                     intermediate_json='{"mass_g": 10.0}'),
                  _e(CommandStarted, 2),  # repeated: shows nothing
                  _e(CommandCompleted, 3, result_json='{"mass_g": 12.5}')):
        shown.append((display.see(event), display.position))
    assert shown == [
        (None, 0), ("dispatched", 100), ("accepted", 200), ("started", 300),
        ("running 25%, ~6 s left", 325), (None, 325),
        ('running 75%, ~2 s left: {"mass_g": 10.0}', 375), (None, 375),
        ('completed: {"mass_g": 12.5}', 400)]
    assert display.position_end == 400


def test_the_wait_display_without_dispatch_or_start():
    display = cmds.Display()
    # progress before its CommandStarted was seen moves the display to the running step
    assert display.see(_e(CommandProgress, 2, progress=0.5)) == "running 50%"
    assert display.position == 350
    rejected = cmds.Display()
    assert rejected.see(_e(CommandRejected, 1, reason_code="device_offline",
                           reason="no heartbeat")) == "rejected (device_offline): no heartbeat"
    assert rejected.position == rejected.position_end
    long = cmds.describe(_e(CommandProgress, 2, intermediate_json=json.dumps({"x": "y" * 100})))
    assert long.startswith('running: {"x": "yyy') and long.endswith("…") and len(long) == 69
