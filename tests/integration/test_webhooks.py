"""Outbound webhooks on the real broker: `labbus webhooks` (as its own principal) against real
HTTP receivers on loopback. A receiver that refuses twice gets the event a third time, signed,
and the three attempts are events on lab.webhooks; a receiver that is down ends in a
WebhookDeadLettered after its attempts while another target of the same event is served at
once; `kill -9` in the middle of a request sends the same event id again (at least once)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid

import pytest
from standardwebhooks import Webhook

from labbus.events import kafka
from labbus.events.codec import default_codec
from labbus.events.model import (
    CommandRejected,
    ExperimentCompleted,
    WebhookDeadLettered,
    WebhookDelivered,
    WebhookDeliveryAttempted,
)
from labbus.events.topics import WEBHOOKS, topic_name
from labbus.processors.webhooks import new_secret
from tests.conftest import free_port, read_topic, run, wait_for
from tests.support.webhook_receiver import Receiver, anomaly, failing_first

TAG = uuid.uuid4().hex[:6]
SECRET = new_secret()


@pytest.fixture
def cfg(own_cfg):
    """A namespace of the test's own: a new target starts at the beginning of its topics, and
    the session's would hold every other test's events of the types it forwards."""
    return own_cfg


def start(processes, tmp_path, targets: list[dict], **defaults):
    path = tmp_path / f"webhooks-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps({**defaults, "targets": targets}))
    return processes.start("webhooks", extra_env={"LABBUS_WEBHOOKS_CONFIG": str(path)})


def target(name: str, url: str, *types: str, **options) -> dict:
    return {"name": f"{name}-{TAG}", "url": url, "secret": SECRET, "event_types": list(types),
            **options}


def deliveries(cfg, event_id) -> list:
    """The lab.webhooks events about one forwarded event, in log order."""
    codec = default_codec()
    out = []
    for r in run(read_topic(cfg, topic_name(cfg, WEBHOOKS))):
        e = codec.decode(r.value)
        if e.forwarded_event_id == event_id:
            out.append(e)
    return out


def alive(proc) -> None:
    if proc.poll() is not None:
        with open(proc.log_path) as f:
            raise AssertionError(f"labbus webhooks exited with {proc.returncode}: "
                                 f"{f.read()[-3000:]}")


def test_refused_twice_then_accepted_once_signed_and_every_attempt_an_event(
        cfg, processes, tmp_path):
    event = anomaly(f"wh-{TAG}")
    mine = str(event.event_id)
    receiver = Receiver(failing_first(2, lambda r: r.event_id == mine, status=500))
    try:
        proc = start(processes, tmp_path, [target("qms", receiver.url, event.TYPE)],
                     backoff_initial_s=0.2, backoff_max_s=1.0)
        run(kafka.publish(cfg, event))

        def accepted():
            alive(proc)
            return [r for r in receiver.of(mine) if r.status == 200]

        wait_for(accepted, 90, "the receiver to accept the event")
        outcome = wait_for(lambda: [e for e in deliveries(cfg, event.event_id)
                                    if isinstance(e, WebhookDelivered)], 30,
                           "WebhookDelivered on lab.webhooks")
        time.sleep(1.0)  # nothing more comes for it
        got = receiver.of(mine)
    finally:
        receiver.close()
    assert [r.status for r in got] == [500, 500, 200]
    assert len({r.body for r in got}) == 1
    for r in got:  # the reference library verifies each (the timestamp differs per attempt)
        doc = Webhook(SECRET).verify(r.body, r.headers)
        assert r.headers["labbus-event-type"] == "lab.quality.AnomalyDetected"
    assert doc["envelope"]["event_id"] == mine and doc["payload"]["value"] == 48.5
    assert doc["payload"]["measurement_id"] == str(event.measurement_id)
    events = deliveries(cfg, event.event_id)
    attempts = [e for e in events if isinstance(e, WebhookDeliveryAttempted)]
    assert [(a.attempt, a.status_code) for a in attempts] == [(1, 500), (2, 500), (3, 200)]
    assert [a.error for a in attempts] == ["HTTP 500", "HTTP 500", None]
    assert all(a.duration_ms > 0 and a.target == f"qms-{TAG}" for a in attempts)
    assert [a.envelope.actor for a in attempts] == [None, None, None]
    (delivered,) = outcome
    assert delivered.attempts == 3 and delivered.status_code == 200
    assert isinstance(events[-1], WebhookDelivered)  # after its attempts (keyed by target)


def test_a_receiver_that_is_down_is_dead_lettered_and_blocks_no_other_target(
        cfg, processes, tmp_path):
    down_url = f"http://127.0.0.1:{free_port()}/hooks"  # nothing listens there
    receiver = Receiver()
    first, second = (CommandRejected.create(
        source="test", subject=f"wh-dev-{TAG}", sequence=n, command_id=f"c{n}-{TAG}",
        device_id=f"wh-dev-{TAG}", reason_code="expired", reason="expired before dispatch")
        for n in (1, 2))
    try:
        proc = start(processes, tmp_path, [
            target("tracker-down", down_url, first.TYPE, max_attempts=3, backoff_initial_s=4.0,
                   backoff_max_s=8.0),
            target("tracker-up", receiver.url, first.TYPE)])
        run(kafka.publish(cfg, first))

        def dead():
            alive(proc)
            return [e for e in deliveries(cfg, first.event_id)
                    if isinstance(e, WebhookDeadLettered)]

        (letter,) = wait_for(dead, 90, "WebhookDeadLettered for the target that is down")
        run(kafka.publish(cfg, second))  # the target's stream moves on past the dead letter

        def tried_second():
            alive(proc)
            return [e for e in deliveries(cfg, second.event_id)
                    if isinstance(e, WebhookDeliveryAttempted)
                    and e.target == f"tracker-down-{TAG}"]

        wait_for(tried_second, 60, "the down target to try the next event")
        served = receiver.of(str(first.event_id))
    finally:
        receiver.close()
    events = deliveries(cfg, first.event_id)
    down = [e for e in events if e.target == f"tracker-down-{TAG}"]
    attempts = [e for e in down if isinstance(e, WebhookDeliveryAttempted)]
    assert [a.attempt for a in attempts] == [1, 2, 3]
    assert all(a.status_code is None and "ConnectError" in a.error for a in attempts)
    assert [a.retry_in_ms is None for a in attempts] == [False, False, True]
    assert 2000 <= attempts[0].retry_in_ms <= 4000 and 4000 <= attempts[1].retry_in_ms <= 8000
    assert letter.attempts == 3 and letter.reason == attempts[-1].error
    assert letter.last_status_code is None and letter.endpoint == down_url
    assert letter.source_topic.endswith("lab.commands") and letter.source_offset >= 0
    # the body kept for a manual re-delivery is the one the other target was sent
    assert [r.status for r in served] == [204] and served[0].body == letter.body.encode()
    (up,) = [e for e in events if isinstance(e, WebhookDelivered)]
    assert up.target == f"tracker-up-{TAG}" and up.attempts == 1
    # the target that was up was served long before the other one gave up
    assert up.envelope.recorded_at < letter.envelope.recorded_at


def test_kill_9_in_the_middle_of_a_request_sends_the_same_event_id_again(
        cfg, processes, tmp_path):
    event = ExperimentCompleted.create(
        source="test", subject=f"wh-x-{TAG}", sequence=9, experiment_id=f"wh-x-{TAG}",
        best_well="B3", best_volumes={"red": 60.0, "water": 140.0}, best_de=1.25,
        wells_used=24, reason="confirmed")
    mine = str(event.event_id)
    release = threading.Event()

    def answer(r):
        if r.event_id == mine and len(receiver.of(mine)) == 1:
            release.wait(60)  # the first request hangs until the sender was killed
        return 200

    receiver = Receiver(answer)
    options = dict(timeout_s=45.0, max_attempts=3)
    try:
        config = [target("lims", receiver.url, event.TYPE, **options)]
        first = start(processes, tmp_path, config)
        run(kafka.publish(cfg, event))

        def in_flight():
            alive(first)
            return receiver.of(mine)

        wait_for(in_flight, 90, "the first request to arrive")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        release.set()
        second = start(processes, tmp_path, config)

        def accepted():
            alive(second)
            return [r for r in receiver.of(mine)[1:] if r.status == 200]

        wait_for(accepted, 90, "the restarted process to send the event again")
        delivered = wait_for(lambda: [e for e in deliveries(cfg, event.event_id)
                                      if isinstance(e, WebhookDelivered)], 30,
                             "WebhookDelivered on lab.webhooks")
        time.sleep(1.0)
        got = receiver.of(mine)
    finally:
        release.set()
        receiver.close()
    assert len(got) == 2, [r.status for r in got]
    assert got[0].event_id == got[1].event_id == mine  # what a receiver deduplicates by
    assert got[0].body == got[1].body
    for r in got:
        Webhook(SECRET).verify(r.body, r.headers)
    # the killed process recorded no attempt (it died waiting for the answer); the restarted
    # one recorded its own and the outcome
    attempts = [e for e in deliveries(cfg, event.event_id)
                if isinstance(e, WebhookDeliveryAttempted)]
    assert [(a.attempt, a.status_code) for a in attempts] == [(1, 200)]
    assert len(delivered) == 1 and delivered[0].attempts == 1


@pytest.mark.parametrize("content, message", [
    ("{}", "targets: expected a non-empty list"),
    ('{"targets": [{"name": "x", "url": "https://x.example/", "secret": "plain",'
     ' "event_types": ["lab.quality.AnomalyDetected"]}]}', "(x).secret: must start with whsec_"),
])
def test_a_bad_configuration_stops_the_command_with_the_variable_and_field(
        env, tmp_path, content, message):
    import subprocess

    from labbus.deploy.demo import LABBUS

    path = tmp_path / "hooks.json"
    path.write_text(content)
    done = subprocess.run([LABBUS, "webhooks"], env={**env, "LABBUS_WEBHOOKS_CONFIG": str(path)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"LABBUS_WEBHOOKS_CONFIG='{path}'" in done.stderr and message in done.stderr
