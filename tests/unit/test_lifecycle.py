"""The device-lifecycle processor's handler and timer as plain functions."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from labbus.events.config import ConfigError, load
from labbus.events.model import (
    CommandCompleted,
    CommandDispatched,
    CommandIssued,
    CommandRejected,
    CommandTimedOut,
    DeviceHeartbeat,
    DeviceStatusChanged,
    command_id_for,
)
from labbus.events.runtime import Record
from labbus.processors import lifecycle as lc

SPECS = lc.CommandSpecs()
REGISTRY = {"spec-1": {"type": "spectrophotometer", "interval_s": 1.0, "v": 1},
            "quiet-1": {"type": "balance", "interval_s": None, "v": 1}}


def rec(ts_ms: int, partition: int = 2) -> Record:
    return Record("t", partition, 0, b"k", b"", ts_ms)


def beat(device: str, seq: int) -> DeviceHeartbeat:
    return DeviceHeartbeat.create(source="gw", subject=device, sequence=seq, device_id=device,
                                  gateway="gw")


def issue(device: str, key: str, ctype: str = "measure", payload: dict | None = None,
          expires_in_s: float = 30) -> CommandIssued:
    return CommandIssued.create(
        source="t", subject=device, sequence=0, command_id=command_id_for(device, key),
        device_id=device, idempotency_key=key, command_type=ctype,
        payload_json=json.dumps({"wavelength_nm": 600} if payload is None else payload),
        expires_at=datetime.now(UTC) + timedelta(seconds=expires_in_s), issued_by="t")


def run(events, state=None, t0=1_000_000):
    out = []
    for i, e in enumerate(events):
        state, emitted = lc.handle(state, e, rec(t0 + i), REGISTRY, specs=SPECS)
        out += emitted
    return state, out


def test_online_offline_online_as_events_read_back():
    s, out = run([beat("spec-1", 1)])
    assert [(type(e).__name__, e.status) for e in out] == [("DeviceStatusChanged", "ONLINE")]
    online = out[0]
    s, again = run([beat("spec-1", 2)], s)  # ONLINE pending: not emitted twice
    assert again == []
    s, _ = run([online], s)
    assert s["status"] == "ONLINE" and s["pending"] is None
    hb_at = s["hb"]["at"]
    assert lc.tick({"spec-1": s}, hb_at + 2900, REGISTRY, 3.0) == []  # within 3 intervals
    off = lc.tick({"spec-1": s}, hb_at + 3100, REGISTRY, 3.0)
    assert [e.status for e in off] == ["OFFLINE"]
    assert off[0].event_id == lc.tick({"spec-1": s}, hb_at + 9000, REGISTRY, 3.0)[0].event_id
    s, _ = run([off[0]], s)
    assert s["status"] == "OFFLINE"
    assert lc.tick({"spec-1": s}, hb_at + 9000, REGISTRY, 3.0) == []
    s, back = run([beat("spec-1", 3)], s)
    assert [(e.status, e.reason) for e in back] == [("ONLINE", "heartbeats resumed")]


def test_an_offline_decided_on_an_older_heartbeat_is_corrected():
    s, out = run([beat("spec-1", 1)])
    s, _ = run([out[0]], s)
    off = lc.tick({"spec-1": s}, s["hb"]["at"] + 5000, REGISTRY, 3.0)
    s, _ = run([beat("spec-1", 2)], s)  # arrives before the OFFLINE is read back
    s, fixed = run([off[0]], s)
    assert [e.status for e in fixed] == ["ONLINE"]


def test_a_device_without_an_interval_is_never_timed_out():
    s, out = run([beat("quiet-1", 1)])
    s, _ = run([out[0]], s)
    assert lc.tick({"quiet-1": s}, s["hb"]["at"] + 10**9, REGISTRY, 3.0) == []


def test_the_device_reports_its_own_status():
    s, out = run([beat("spec-1", 1)])
    maint = DeviceStatusChanged.create(source="gw", subject="spec-1", sequence=5,
                                       device_id="spec-1", status="MAINTENANCE", reason="clean")
    s, out2 = run([out[0], maint, beat("spec-1", 6)], s)
    assert s["status"] == "MAINTENANCE" and out2 == []  # heartbeats do not override it


def online(device="spec-1"):
    s, out = run([beat(device, 1)])
    return run([out[0]], s)[0]


def rejections(out):
    return [(e.reason_code, e.command_id) for e in out if isinstance(e, CommandRejected)]


def test_commands_are_rejected_for_unknown_offline_and_bad_payloads():
    cmd = issue("nobody", "k")
    _, out = run([cmd])
    assert rejections(out) == [("unknown_device", cmd.command_id)]
    _, out = run([issue("spec-1", "k")])  # registered, never heard from
    assert rejections(out)[0][0] == "device_offline"
    s = online()
    for payload, ctype, code in [({"wavelength_nm": 5}, "measure", "bad_payload"),
                                 ({}, "measure", "bad_payload"),
                                 ({"wavelength_nm": 600, "x": 1}, "measure", "bad_payload"),
                                 ({}, "explode", "unknown_command_type")]:
        _, out = run([issue("spec-1", f"k-{code}-{len(payload)}", ctype, payload)], s)
        assert rejections(out)[0][0] == code, (payload, ctype)
        assert out[0].reason
        assert not any(isinstance(e, CommandDispatched) for e in out)  # never reaches a device
    good = issue("spec-1", "good")
    _, out = run([good], s)
    assert [type(e) for e in out] == [CommandDispatched]
    d = out[0]
    assert (d.command_id, d.device_id, d.command_type, d.payload_json, d.expires_at,
            d.idempotency_key, d.issued_by) == (
        good.command_id, good.device_id, good.command_type, good.payload_json, good.expires_at,
        good.idempotency_key, good.issued_by)
    assert d.envelope.causation_id == good.event_id


def test_a_repeated_key_is_one_command_and_another_payload_is_refused():
    s = online()
    first = issue("spec-1", "k1")
    s, out = run([first], s)
    assert [type(e) for e in out] == [CommandDispatched]
    s2, out = run([issue("spec-1", "k1")], s)  # same key and payload: nothing, not dispatched again
    assert out == [] and s2["cmds"] == s["cmds"]
    other = issue("spec-1", "k1", payload={"wavelength_nm": 700})
    s3, out = run([other], s)
    assert rejections(out) == [("idempotency_conflict", lc.conflict_id(first.command_id,
                                                                       other.event_id))]
    assert out[0].envelope.causation_id == other.event_id
    assert s3["cmds"][first.command_id]["s"] == "dispatched"  # the original stands


def test_open_commands_time_out_once_and_final_ones_do_not():
    s = online()
    slow, done = issue("spec-1", "slow", expires_in_s=1), issue("spec-1", "done", expires_in_s=1)
    finished = CommandCompleted.create(source="gw", subject="spec-1", sequence=9,
                                       command_id=done.command_id, device_id="spec-1",
                                       result_json="{}")
    s, _ = run([slow, done, finished], s)
    s["hb"] = {**s["hb"], "at": 10**15}  # keep the device online for this tick
    later = int((datetime.now(UTC) + timedelta(seconds=2)).timestamp() * 1000)
    out = [e for e in lc.tick({"spec-1": s}, later, REGISTRY, 3.0)
           if isinstance(e, CommandTimedOut)]
    assert [e.command_id for e in out] == [slow.command_id]
    s, _ = run(out, s)
    assert s["cmds"][slow.command_id]["s"] == "timed_out"
    assert not any(isinstance(e, CommandTimedOut)
                   for e in lc.tick({"spec-1": s}, later, REGISTRY, 3.0))


def test_ticker_does_not_resend_what_it_just_sent():
    s, out = run([beat("spec-1", 1)])
    s, _ = run([out[0]], s)
    ticker = lc.Ticker(REGISTRY, 3.0)
    at = s["hb"]["at"] + 5000
    assert len(ticker({"spec-1": s}, at)) == 1
    assert ticker({"spec-1": s}, at + 1000) == []
    assert len(ticker({"spec-1": s}, at + 20_000)) == 1


def test_heartbeat_interval_from_registration():
    assert lc.heartbeat_interval({"heartbeat_interval_s": "2"}, [{"expected_interval_s": 0.2}]) \
        == 2.0
    assert lc.heartbeat_interval({}, [{"expected_interval_s": 0.2},
                                      {"expected_interval_s": 5}]) == 5
    assert lc.heartbeat_interval({}, []) is None


@pytest.mark.parametrize("raw", ["0", "-1", "x", "inf"])
def test_offline_multiple_must_be_positive(raw):
    with pytest.raises(ConfigError, match="LABBUS_OFFLINE_AFTER_INTERVALS"):
        load({"LABBUS_OFFLINE_AFTER_INTERVALS": raw})
    assert load({}).offline_after_intervals == 3.0


def test_every_command_schema_is_a_valid_schema():
    import jsonschema

    files = sorted(lc.DEFAULT_SPECS_DIR.glob("*/*.json"))
    assert files
    for path in files:
        schema = json.loads(path.read_text())
        jsonschema.validators.validator_for(schema).check_schema(schema)


def test_a_worker_behind_on_its_inputs_judges_silence_only_as_far_as_it_read():
    s, out = run([beat("spec-1", 1)])
    s, _ = run(out, s)
    slow = issue("spec-1", "slow", expires_in_s=1)
    s, _ = run([slow], s)
    hb_at = s["hb"]["at"]
    wall = int((datetime.now(UTC) + timedelta(seconds=5)).timestamp() * 1000)
    assert hb_at + 3100 < wall
    # caught up on partition 2: silent for long enough, and the command expired
    caught_up = lc.tick({"spec-1": s}, wall, REGISTRY, 3.0)
    assert sorted(type(e).__name__ for e in caught_up) == ["CommandTimedOut",
                                                           "DeviceStatusChanged"]
    # behind on partition 2, having read up to hb_at + 500 ms: nothing decided yet
    assert lc.tick({"spec-1": s}, wall, REGISTRY, 3.0, {2: hb_at + 500}) == []
    # behind on another partition only: judged by the wall clock
    assert len(lc.tick({"spec-1": s}, wall, REGISTRY, 3.0, {4: hb_at})) == 2
