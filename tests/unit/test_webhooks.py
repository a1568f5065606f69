"""Outbound webhooks without Kafka (processors/webhooks.py): the signature against the Standard
Webhooks reference library, the backoff, the body, the configuration's errors, and the handler
against a real HTTP receiver on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from labbus.events.config import ConfigError
from labbus.events.model import (
    AccessDenied,
    Actor,
    AnomalyDetected,
    CommandRejected,
    DeadLetter,
    WebhookDeadLettered,
    WebhookDelivered,
    WebhookDeliveryAttempted,
)
from labbus.events.runtime import Record
from labbus.events.topics import ALERTS, COMMANDS
from labbus.processors import webhooks as wh
from tests.support.webhook_receiver import Receiver, failing_first

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
KEY = wh.parse_secret(SECRET)


def anomaly(device: str = "dev-1", value: float = 41.5) -> AnomalyDetected:
    return AnomalyDetected.create(
        source="anomalies", subject=device, sequence=3,
        occurred_at=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        device_id=device, metric="temperature", value=value, unit="degC",
        measured_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), measurement_id=uuid.uuid4(),
        rule="zscore", score=7.25, threshold=4.0, window_mean=21.0, window_stddev=0.5,
        window_count=40)


# -- the signature ------------------------------------------------------------------------------

def test_the_signature_verifies_with_the_standard_webhooks_library():
    event = anomaly()
    body = wh.event_body(event)
    headers = wh.headers(KEY, event, body, int(time.time()), 1)
    assert Webhook(SECRET).verify(body, headers) == json.loads(body)
    assert headers["webhook-id"] == str(event.event_id)
    assert headers["labbus-event-type"] == "lab.quality.AnomalyDetected"


def test_the_signature_is_the_libraries_own():
    ts = 1614265330
    theirs = Webhook(SECRET).sign("msg_p5jXN8AQM9LWM0D4loKWxJek",
                                  datetime.fromtimestamp(ts, UTC), '{"test": 2432232314}')
    assert wh.signature(KEY, "msg_p5jXN8AQM9LWM0D4loKWxJek", ts,
                        b'{"test": 2432232314}') == theirs


def test_verify_refuses_a_changed_body_another_secret_an_old_timestamp_missing_headers():
    event = anomaly()
    body = wh.event_body(event)
    now = int(time.time())
    good = wh.headers(KEY, event, body, now, 1)
    assert wh.verify(SECRET, good, body)
    assert not wh.verify(SECRET, good, body.replace(b"41.5", b"14.5"))
    other = wh.new_secret()
    assert not wh.verify(other, good, body)
    old = wh.headers(KEY, event, body, now - 301, 1)
    assert not wh.verify(SECRET, old, body)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body, old)
    assert not wh.verify(SECRET, {k: v for k, v in good.items() if k != "webhook-id"}, body)
    # another id under the same timestamp and body: the id is signed too
    assert not wh.verify(SECRET, {**good, "webhook-id": str(uuid.uuid4())}, body)
    # several signatures (a secret being rotated): one match is enough
    rotated = {**good, "webhook-signature": "v1,AAAA " + good["webhook-signature"]}
    assert wh.verify(SECRET, rotated, body)


def test_secrets():
    assert len(wh.parse_secret(wh.new_secret())) == 32
    for bad, why in [("abc", "must start with whsec_"), ("whsec_%%%", "base64"),
                     ("whsec_" + base64.b64encode(b"short").decode(), "24 to 64 bytes")]:
        with pytest.raises(ValueError, match=why):
            wh.parse_secret(bad)


# -- the backoff --------------------------------------------------------------------------------

def test_backoff_doubles_up_to_the_cap_with_jitter_between_half_and_all():
    ceilings = [1, 2, 4, 8, 16, 30, 30]
    for attempt, ceiling in enumerate(ceilings, start=1):
        assert wh.backoff_delay(attempt, 1.0, 30.0, 0.0) == ceiling / 2
        assert wh.backoff_delay(attempt, 1.0, 30.0, 0.999999) == pytest.approx(ceiling, rel=1e-5)
        assert wh.backoff_delay(attempt, 1.0, 30.0, 0.5) == 0.75 * ceiling
    lows = [wh.backoff_delay(n, 0.2, 5.0, 0.0) for n in range(1, 10)]
    assert lows == sorted(lows) and max(lows) == 2.5


def test_worst_case_of_a_target():
    t = wh.Target("t", "https://x.example/h", KEY, ("lab.quality.AnomalyDetected",),
                  max_attempts=4, backoff_initial_s=1.0, backoff_max_s=3.0, timeout_s=10.0)
    assert t.worst_case_s() == 4 * 10 + (1 + 2 + 3)


# -- the body -----------------------------------------------------------------------------------

def test_body_is_the_envelope_and_the_payload_with_strings_for_uuids_and_times():
    event = anomaly()
    doc = json.loads(wh.event_body(event))
    assert doc["format"] == "labbus.webhook.v1"
    env, payload = doc["envelope"], doc["payload"]
    assert list(env) == ["event_id", "event_type", "schema_version", "occurred_at",
                         "recorded_at", "source", "subject", "correlation_id", "causation_id",
                         "sequence", "actor"]
    assert env["event_id"] == str(event.event_id)
    assert env["event_type"] == "lab.quality.AnomalyDetected"
    assert env["occurred_at"] == "2026-01-02T03:04:05.000006Z"
    assert env["actor"] is None
    assert payload["measurement_id"] == str(event.measurement_id)
    assert payload["measured_at"] == "2026-01-02T03:04:05.000000Z"
    assert payload["value"] == 41.5 and payload["window_count"] == 40
    assert wh.event_body(event) == wh.event_body(event)  # the same bytes on every attempt


def test_body_of_bytes_actor_and_not_finite_numbers():
    letter = DeadLetter.create(source="x", subject="t/0/1", sequence=1, source_topic="t",
                               source_partition=0, source_offset=1, original_key=b"k",
                               original_value=b"\xc3\x01junk", error_type="corrupt_payload",
                               error="bad", failed_by="x")
    payload = json.loads(wh.event_body(letter))["payload"]
    assert base64.b64decode(payload["original_value"]) == b"\xc3\x01junk"
    denied = AccessDenied.create(source="gw", subject="u", sequence=0, user_id="u",
                                 permission="command:send", request="POST /commands",
                                 reason="no", actor=Actor("u", ("student",), "10.0.0.9"))
    actor = json.loads(wh.event_body(denied))["envelope"]["actor"]
    assert actor == {"user_id": "u", "roles": ["student"], "client_ip": "10.0.0.9",
                     "user_agent": None, "token_id": None}
    assert json.loads(wh.event_body(anomaly(value=float("nan"))))["payload"]["value"] is None


# -- configuration -------------------------------------------------------------------------------

def write(tmp_path: Path, text: str, name: str = "hooks.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = f"""
max_attempts = 4
timeout_s = 5

[[targets]]
name = "qms"
url = "https://qms.example/hooks/labbus?token=abc"
secret = "{SECRET}"
event_types = ["lab.quality.AnomalyDetected", "lab.command.CommandRejected"]

[[targets]]
name = "lims"
url = "http://127.0.0.1:9/hooks"
secret_env = "LIMS_SECRET"
event_types = ["lab.experiment.ExperimentCompleted"]
max_attempts = 2
backoff_initial_s = 0.5
"""


def test_targets_from_toml_and_json(tmp_path):
    targets = wh.load_targets(write(tmp_path, GOOD), {"LIMS_SECRET": wh.new_secret()})
    qms, lims = targets
    assert (qms.name, qms.max_attempts, qms.timeout_s, qms.backoff_initial_s) == ("qms", 4, 5, 1.0)
    assert qms.secret == KEY and "secret" not in repr(qms).replace("secret=", "")
    assert qms.endpoint == "https://qms.example/hooks/labbus"  # the query may hold a token
    assert qms.topics() == [ALERTS, COMMANDS] and qms.process == "webhooks.qms"
    assert (lims.max_attempts, lims.backoff_initial_s, lims.timeout_s) == (2, 0.5, 5)
    as_json = {"targets": [{"name": "qms", "url": "https://q.example/", "secret": SECRET,
                            "event_types": ["lab.command.CommandRejected"]}]}
    (t,) = wh.load_targets(write(tmp_path, json.dumps(as_json), "hooks.json"), {})
    assert t.event_types == ("lab.command.CommandRejected",) and t.max_attempts == 5


def _target(**changes) -> str:
    t = {"name": "qms", "url": "https://q.example/", "secret": SECRET,
         "event_types": ["lab.quality.AnomalyDetected"], **changes}
    return json.dumps({"targets": [{k: v for k, v in t.items() if v is not None}]})


@pytest.mark.parametrize("text, message", [
    ("{", "cannot read it"),
    ('{"targets": []}', "targets: expected a non-empty list"),
    ('{"targets": [], "retries": 3}', "unknown key\\(s\\) retries"),
    ('{"max_attempts": 0, "targets": []}', "max_attempts: 0 must be between 1 and 100"),
    (_target(name="QMS!"), r"targets\[0\].name: 'QMS!'"),
    (_target(url="ftp://q.example/"), r"targets\[0\] \(qms\).url: 'ftp://q.example/'"),
    (_target(url="http://qms.lab/hooks"), "http:// only on a loopback address"),
    (_target(secret="s3cret"), r"\(qms\).secret: must start with whsec_"),
    (_target(secret=None), "give either secret or secret_env"),
    (_target(secret=None, secret_env="NOPE"), "the environment variable 'NOPE' is not set"),
    (_target(event_types=[]), "event_types: expected a non-empty list"),
    (_target(event_types=["AnomalyDetected"]),
     "'AnomalyDetected' is no event type of labbus \\(did you mean lab.quality.AnomalyDetected"),
    (_target(event_types=["lab.webhook.WebhookDelivered"]), "the webhooks' own events"),
    (_target(event_types=["lab.user.UserRegistered"]),
     "is on lab.users, which the 'webhooks' principal may not read"),
    (_target(timeout_s="10"), r"\(qms\): timeout_s: expected a number"),
    (_target(max_attempts=2.5), "max_attempts: expected an integer"),
    (_target(backoff_initial_s=5, backoff_max_s=1), "backoff_max_s: 1 is below"),
    (_target(max_attempts=25, timeout_s=10, backoff_max_s=1), "could take 274 s"),
    (_target(colour="red"), r"targets\[0\]: unknown key\(s\) colour; expected allow_http"),
])
def test_bad_configuration_names_the_variable_and_the_field(tmp_path, text, message):
    path = write(tmp_path, text, "hooks.json")
    with pytest.raises(ConfigError, match=message) as err:
        wh.load_targets(path, {})
    assert str(err.value).startswith(f"LABBUS_WEBHOOKS_CONFIG='{path}'")


def test_duplicate_names_and_no_file(tmp_path):
    one = json.loads(_target())["targets"][0]
    with pytest.raises(ConfigError, match="the name 'qms' is used twice"):
        wh.load_targets(write(tmp_path, json.dumps({"targets": [one, one]}), "h.json"), {})
    with pytest.raises(ConfigError, match="LABBUS_WEBHOOKS_CONFIG is not set"):
        wh.load_targets(None, {})


# -- the handler, against a real receiver on loopback --------------------------------------------

def _target_for(url: str, attempts: int = 3) -> wh.Target:
    return wh.Target("qms", url, KEY, ("lab.quality.AnomalyDetected",), max_attempts=attempts,
                     backoff_initial_s=0.05, backoff_max_s=0.1, timeout_s=5.0)


async def _drain(forwarder: wh.Forwarder, event, record) -> list:
    return [e async for e in forwarder(event, record)]


RECORD = Record("ns.lab.alerts", 2, 17, b"dev-1", b"")


def test_two_refusals_then_accepted():
    receiver = Receiver(failing_first(2, lambda r: True, status=503))
    try:
        event = anomaly()
        forwarder = wh.Forwarder(_target_for(receiver.url))
        out = asyncio.run(_drain(forwarder, event, RECORD))
        asyncio.run(forwarder.aclose())
    finally:
        receiver.close()
    attempts = [e for e in out if isinstance(e, WebhookDeliveryAttempted)]
    assert [(a.attempt, a.status_code) for a in attempts] == [(1, 503), (2, 503), (3, 200)]
    assert attempts[0].error == "HTTP 503" and attempts[2].error is None
    assert attempts[0].retry_in_ms is not None and attempts[2].retry_in_ms is None
    (done,) = [e for e in out if isinstance(e, WebhookDelivered)]
    assert type(out[-1]) is WebhookDelivered and done.attempts == 3
    assert done.forwarded_event_id == event.event_id and done.envelope.subject == "qms"
    assert done.envelope.causation_id == event.event_id
    # the same body and id three times, a valid signature each time
    assert len({r.body for r in receiver.requests}) == 1
    assert {r.event_id for r in receiver.requests} == {str(event.event_id)}
    for r in receiver.requests:
        Webhook(SECRET).verify(r.body, r.headers)
    assert [r.headers["labbus-delivery-attempt"] for r in receiver.requests] == ["1", "2", "3"]


def test_a_receiver_that_is_down_ends_in_a_dead_letter_with_the_reason():
    receiver = Receiver()
    url = receiver.url
    receiver.close()  # nothing listens there any more
    event = CommandRejected.create(source="devices", subject="d", sequence=1, command_id="c",
                                   device_id="d", reason_code="expired", reason="too late")
    target = wh.Target("tracker", url, KEY, (event.TYPE,), max_attempts=2,
                       backoff_initial_s=0.01, backoff_max_s=0.01)
    out = asyncio.run(_drain(wh.Forwarder(target), event, RECORD))
    assert [type(e) for e in out] == [WebhookDeliveryAttempted, WebhookDeliveryAttempted,
                                      WebhookDeadLettered]
    assert out[0].status_code is None and "ConnectError" in out[0].error
    assert "ConnectionRefusedError" in out[0].error  # the cause, not only httpx's summary
    dead = out[-1]
    assert dead.attempts == 2 and dead.reason == out[1].error and dead.last_status_code is None
    assert (dead.source_topic, dead.source_partition, dead.source_offset) == (
        "ns.lab.alerts", 2, 17)
    assert json.loads(dead.body)["envelope"]["event_id"] == str(event.event_id)


def test_stop_during_a_backoff_abandons_the_delivery_uncommitted():
    receiver = Receiver(lambda r: 500)

    async def go():
        stop = asyncio.Event()
        target = wh.Target("qms", receiver.url, KEY, ("lab.quality.AnomalyDetected",),
                           max_attempts=5, backoff_initial_s=30, backoff_max_s=30)
        seen = []
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, stop.set)
        t0 = time.monotonic()
        with pytest.raises(wh.Stopped):
            async for e in wh.Forwarder(target, stop)(anomaly(), RECORD):
                seen.append(e)
        return seen, time.monotonic() - t0

    try:
        seen, took = asyncio.run(go())
    finally:
        receiver.close()
    assert [e.attempt for e in seen] == [1] and took < 5
