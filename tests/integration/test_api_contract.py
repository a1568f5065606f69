"""The query API keeps its own OpenAPI contract: schemathesis (`st run --checks all`) against the
real API, started as `labbus api` on a session's read models with devices, readings and a
finished colour campaign in them.

schemathesis lives in its own virtualenv (`.venv-schemathesis`, made by `make setup`): it needs
jsonschema>=4.18, which the main environment cannot have (opentrons pins jsonschema<4.18).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from aiokafka import TopicPartition

from labbus.deploy.demo import LABBUS
from labbus.events.codec import default_codec
from labbus.events.model import DeviceRegistered, MeasurementValidated
from labbus.projections.mongo import MongoProjection
from labbus.projections.postgres import PostgresProjection
from labbus.projections.runner import Positioned
from tests.conftest import REPO, free_port, run, wait_for
from tests.integration.test_experiment_read_models import campaign_events

ST = REPO / ".venv-schemathesis" / "bin" / "st"
CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = 30  # per operation and phase; the whole run takes about a minute on the dev machine
SEED = 20260301  # fixed, so a failure reproduces (`st run ... --seed`)
XID = "contract-campaign"
DEVICES = {"contract-ph-1": "ph-meter", "contract-tc-2": "thermocouple"}
T0 = datetime(2026, 3, 1, tzinfo=UTC)
# fake topic names: the seeded positions must not steer the session's real projectors
TOPICS = {"devices": "contract-test.devices", "validated": "contract-test.validated",
          "experiments": "contract-test.experiments", "runs": "contract-test.runs",
          "readings": "contract-test.readings"}


def seed_batches() -> list[list[Positioned]]:
    """Two devices, 40 readings of the first (several per timestamp), one finished campaign."""
    t = dict(source="contract-test")
    by_topic: dict[str, list] = {
        "devices": [DeviceRegistered.create(
            **t, subject=device, sequence=0, device_id=device, device_type=kind, model="m",
            location="bench", metrics=["ph", "temperature"]) for device, kind in DEVICES.items()],
        "validated": [MeasurementValidated.create(
            **t, subject="contract-ph-1", sequence=i, measurement_id=uuid.uuid4(),
            device_id="contract-ph-1", metric="ph" if i % 3 else "temperature", value=7.0,
            unit="pH" if i % 3 else "degC", measured_at=T0 + timedelta(seconds=i // 4))
            for i in range(40)],
        **campaign_events(XID)}
    codec = default_codec()
    return [[Positioned(TopicPartition(TOPICS[alias], 0), offset,
                        *codec.decode_record(codec.encode(e), plain=True))
             for offset, e in enumerate(events)] for alias, events in by_topic.items()]


def seed(cfg) -> None:
    async def write():
        pg, mongo = PostgresProjection(cfg), MongoProjection(cfg)
        mongo.aliases = {topic: alias for alias, topic in TOPICS.items()}
        await pg.start()
        await mongo.start()
        try:
            for batch in seed_batches():
                await pg.apply(batch, {})  # no positions: nothing to compare with later
                await mongo.apply(batch, {batch[-1].tp: batch[-1].offset + 1})
        finally:
            await pg.stop()
            await mongo.stop()

    run(write())


@pytest.fixture(scope="module")
def live_api(cfg, env, tmp_path_factory):
    """`labbus api` on a free port, serving the seeded read models of this session."""
    seed(cfg)
    port = free_port()
    log_path = tmp_path_factory.mktemp("api") / "api.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([LABBUS, "api", "--port", str(port)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO)
    base = f"http://127.0.0.1:{port}"

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"the API exited with {proc.returncode}: "
                                 f"{log_path.read_text()[-2000:]}")
        try:
            return httpx.get(f"{base}/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 60, "the API to be ready", interval=0.3)
        yield base, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def schemathesis(base: str, report: Path, *extra: str) -> subprocess.CompletedProcess:
    if not ST.exists():
        pytest.fail(f"{ST} is missing: `make setup` installs schemathesis into its own "
                    "virtualenv (it cannot share the main one, see this module's docstring)")
    return subprocess.run(
        [str(ST), "--config-file", str(CONFIG), "run", f"{base}/openapi.json",
         "--checks", "all", "--max-examples", str(EXAMPLES), "--seed", str(SEED),
         "--workers", "2", "--no-color", "--report", "ndjson", "--report-ndjson-path",
         str(report), *extra],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""})


def test_schemathesis_finds_no_server_error_and_no_conformance_failure(live_api, tmp_path):
    base, log_path = live_api
    started = time.monotonic()
    result = schemathesis(base, tmp_path / "events.ndjson")
    elapsed = time.monotonic() - started
    summary = result.stdout[-6000:]
    print(summary, f"\nschemathesis took {elapsed:.0f} s")
    assert result.returncode == 0, (summary + result.stderr[-2000:]
                                    + "\nAPI log:\n" + log_path.read_text()[-3000:])
    events = [json.loads(line) for line in (tmp_path / "events.ndjson").read_text().splitlines()]
    assert events, "schemathesis wrote no events"
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-3000:]
