"""The broker goes away for 15 s and comes back: an agent and a projector on the runtime ride
through it and resume by themselves; nothing is lost or doubled."""

from __future__ import annotations

import time
import uuid

import pytest

from labbus.deploy.local import services
from labbus.events.topics import COLOUR_READINGS, ROBOT_RUNS
from tests.conftest import run, wait_for
from tests.integration import test_view_contract as views  # not its classes: no re-run
from tests.integration.test_runtime_contract import (
    SPECS,
    encoded,
    inputs,
    output_ids,
    publish,
)

READER = next(s for s in SPECS if s.process == "agent-reader")
assert (READER.source, READER.sink) == (ROBOT_RUNS, COLOUR_READINGS)


def test_agent_and_projector_ride_through_a_broker_outage(cfg, processes):
    if cfg.explicitly_set("kafka_bootstrap"):
        pytest.skip("Kafka is external (LABBUS_KAFKA_BOOTSTRAP); not stopped here")
    tag = f"outage-{uuid.uuid4().hex[:6]}"
    view = views.TestPostgresView()
    before = inputs(READER, tag, 20)
    run(publish(cfg, READER, encoded(before)))
    run(views.publish(cfg, views.stream(tag + "-before", 500)))
    reader = processes.start("agent", "reader")
    projector = processes.start("project", "postgres")
    wait_for(lambda: {READER.output_id(e) for e in before} <= set(output_ids(cfg, READER)), 60,
             "readings before the outage")
    wait_for(lambda: view.rows(cfg, tag + "-before") >= 500, 60, "rows before the outage")

    services.down(cfg, only=["kafka"])
    time.sleep(15)
    assert reader.poll() is None and projector.poll() is None, "a process exited"
    services.up(cfg, only=["kafka"])

    after = inputs(READER, tag, 20, start=20)
    run(publish(cfg, READER, encoded(after)))
    run(views.publish(cfg, views.stream(tag + "-after", 500)))
    wanted = {READER.output_id(e) for e in before + after}
    wait_for(lambda: wanted <= set(output_ids(cfg, READER)), 120, "readings after the outage")
    wait_for(lambda: view.rows(cfg, tag + "-after") >= 500, 120, "rows after the outage")
    assert view.rows(cfg, tag + "-before") == 500 and view.rows(cfg, tag + "-after") == 500
    assert reader.poll() is None and projector.poll() is None
