"""The query API and the command gateway keep their OpenAPI contracts: schemathesis (`st run
--checks all`) against the real apps, started as `labbus gateway http` (with its built-in
issuer) and `labbus api` on a session's read models with devices, readings, a finished colour
campaign and a finished service request (with its reports in GridFS) in them. Every request
carries an admin's token signed by the gateway's built-in issuer; the query API verifies it as
in production, through the gateway's discovery document and JWKS (and schemathesis's
`ignored_auth` check sends requests without it).

schemathesis lives in its own virtualenv (`.venv-schemathesis`, made by `make setup`): it needs
jsonschema>=4.18, which the main environment cannot have (opentrons pins jsonschema<4.18).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from aiokafka import TopicPartition
from pymongo import MongoClient

from labbus.api.testing import MEDIA_TYPES
from labbus.events.artifacts import GridFSStore
from labbus.events.codec import default_codec
from labbus.events.model import (
    AnomalyDetected,
    CommandAccepted,
    CommandCompleted,
    CommandDispatched,
    CommandIssued,
    CommandProgress,
    DeviceHeartbeat,
    DeviceRegistered,
    DeviceStatusChanged,
    MeasurementValidated,
    SampleRegistered,
)
from labbus.events.runtime import Positioned
from labbus.producers.http_gateway import keys
from labbus.producers.http_gateway.issuer import Issuer
from labbus.projections.mongo import MongoProjection
from labbus.projections.postgres import PostgresProjection
from tests.conftest import REPO, free_port, http_server, run
from tests.integration.test_experiment_read_models import campaign_events
from tests.support.testing_events import as_positioned, report_generated, service_request_events

ST = REPO / ".venv-schemathesis" / "bin" / "st"
PIN = REPO / "tests" / "schemathesis-requirements.txt"  # the version this suite was tested with
CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = 200  # per operation and phase: ~5,000 cases with a token (~7,700 at 300, 91 s)
GATEWAY_EXAMPLES = 100  # each POST /commands answered 202 is a publish; /auth/token an Argon2 hash
SEED = 20260301  # fixed, so a failure reproduces (`st run ... --seed`)
XID = "contract-campaign"
REQUEST = "contract-request"
DEVICES = {"contract-ph-1": "ph-meter", "contract-tc-2": "thermocouple"}
T0 = datetime(2026, 3, 1, tzinfo=UTC)
# fake topic names: the seeded positions must not steer the session's real projectors
TOPICS = {"devices": "contract-test.devices", "validated": "contract-test.validated",
          "experiments": "contract-test.experiments", "runs": "contract-test.runs",
          "readings": "contract-test.readings", "status": "contract-test.status",
          "commands": "contract-test.commands", "alerts": "contract-test.alerts"}
MONGO = ("devices", "validated", "experiments", "runs", "readings")  # the Mongo view's topics


def seed_batches() -> list[list[Positioned]]:
    """Two devices with their status, 40 readings of the first (several per timestamp), two
    commands (one dispatched, progressing and completed), two alerts, one finished campaign."""
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
        "status": [e for device in DEVICES for e in (
            DeviceStatusChanged.create(**t, subject=device, sequence=1, device_id=device,
                                       status="ONLINE", reason="registered"),
            DeviceHeartbeat.create(**t, subject=device, sequence=2, device_id=device,
                                   gateway="gw"))],
        "commands": [e for i, cid in enumerate(("contract-cmd-1", "contract-cmd-2")) for e in (
            CommandIssued.create(**t, subject="contract-ph-1", sequence=i, command_id=cid,
                                 device_id="contract-ph-1", idempotency_key=cid,
                                 command_type="calibrate", payload_json='{"points": [4, 7]}',
                                 expires_at=T0 + timedelta(seconds=30), issued_by="operator"),
            CommandAccepted.create(**t, subject="contract-ph-1", sequence=i, command_id=cid,
                                   device_id="contract-ph-1"))][:3] + [
            CommandDispatched.create(**t, subject="contract-ph-1", sequence=5,
                                     command_id="contract-cmd-1", device_id="contract-ph-1",
                                     idempotency_key="contract-cmd-1", command_type="calibrate",
                                     payload_json='{"points": [4, 7]}', issued_by="operator",
                                     expires_at=T0 + timedelta(seconds=30)),
            CommandProgress.create(**t, subject="contract-ph-1", sequence=6,
                                   command_id="contract-cmd-1", device_id="contract-ph-1",
                                   progress=0.5, remaining_s=2.5,
                                   intermediate_json='{"reading": 4.01}'),
            CommandCompleted.create(**t, subject="contract-ph-1", sequence=9,
                                    command_id="contract-cmd-1", device_id="contract-ph-1",
                                    result_json='{"slope": 0.99}')],
        "alerts": [AnomalyDetected.create(
            **t, subject="contract-ph-1", sequence=i, occurred_at=T0 + timedelta(seconds=i),
            device_id="contract-ph-1", metric="ph", value=13.0, unit="pH", measured_at=T0,
            measurement_id=uuid.uuid4(), rule="zscore", score=9.0, threshold=4.0,
            window_mean=7.0, window_stddev=0.1, window_count=40) for i in range(2)],
        **campaign_events(XID)}
    codec = default_codec()
    return [[Positioned(TopicPartition(TOPICS[alias], 0), offset,
                        *codec.decode_record(codec.encode(e), plain=True))
             for offset, e in enumerate(events)] for alias, events in by_topic.items()]


def service_request_batches(cfg) -> list[list[Positioned]]:
    """A finished service request (two executions, one failing with a non-conformance) of two
    registered samples, with its three reports stored in the session's GridFS."""
    request = service_request_events(REQUEST, T0)
    client = MongoClient(cfg.mongo_url)
    store = GridFSStore(client[cfg.mongo_db])
    reports = [report_generated(REQUEST, fmt, store.put(f"{REQUEST}.{fmt}", media,
                                                        f"contract {fmt}".encode()),
                                T0 + timedelta(hours=1))
               for fmt, media in MEDIA_TYPES.items()]
    client.close()
    submitted = request["requests"][0]
    samples = [SampleRegistered.create(
        source="gateway-http", subject=sample, sequence=0, occurred_at=T0, sample_id=sample,
        lims_ref=f"LIMS-{n}", customer=submitted.customer, module_type=submitted.module_type,
        module_area_m2=submitted.module_area_m2, serial_number=f"SN-{n}", received_at=T0,
        registered_by="lims@lab.example") for n, sample in enumerate(submitted.sample_ids)]
    return [as_positioned("contract-test.samples", samples),
            as_positioned("contract-test.requests", request["requests"] + reports),
            as_positioned("contract-test.executions", request["executions"])]


def seed(cfg) -> None:
    async def write():
        pg, mongo = PostgresProjection(cfg), MongoProjection(cfg)
        mongo.aliases = {topic: alias for alias, topic in TOPICS.items() if alias in MONGO}
        await pg.start()
        await mongo.start()
        try:
            for batch in seed_batches() + service_request_batches(cfg):
                await pg.apply(batch, {})  # no positions: nothing to compare with later
                if batch[0].tp.topic in mongo.aliases:
                    await mongo.apply(batch, {batch[-1].tp: batch[-1].offset + 1})
        finally:
            await pg.stop()
            await mongo.stop()

    run(write())


@pytest.fixture(scope="module")
def live_gateway(cfg, env, tmp_path_factory):
    """`labbus gateway http` on a free port, its built-in issuer with a key of this module's;
    with the environment that makes other entry points trust it and an admin's token it signed
    (base URL, environment, token, log)."""
    seed(cfg)  # migrates, too: the gateway's users and credentials tables
    logs = tmp_path_factory.mktemp("gateway")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    genv = {**env, "LABBUS_HTTP_GATEWAY_PORT": str(port), "LABBUS_AUTH_ISSUER": "",
            "LABBUS_AUTH_JWKS_URL": "", "LABBUS_AUTH_KEYS_DIR": str(logs / "auth")}
    log_path = logs / "gateway-http.log"
    with http_server(["gateway", "http"], genv, log_path, f"{base}/health/ready"):
        key = keys.load_or_create(logs / "auth")
        token, _ = Issuer(base, cfg.auth_audience, 3600, key).mint("contract-admin", ("admin",))
        yield base, genv, token, log_path


@pytest.fixture(scope="module")
def live_api(live_gateway, tmp_path_factory):
    """`labbus api` on a free port, serving the seeded read models of this session, trusting
    the gateway's built-in issuer."""
    _, genv, token, _ = live_gateway
    port = free_port()
    log_path = tmp_path_factory.mktemp("api") / "api.log"
    base = f"http://127.0.0.1:{port}"
    with http_server(["api", "--port", str(port)], genv, log_path, f"{base}/health/ready"):
        yield base, log_path, token


def schemathesis(location: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`st run` with the checks and budget of this suite; its output is in the result. It runs
    in `cwd`, where it keeps its caches (a crash cache would replay old failures)."""
    pinned = PIN.read_text().strip().split("==")[1]
    if not ST.exists():
        pytest.fail(f"{ST} is missing: `make setup` installs schemathesis into its own "
                    "virtualenv (it cannot share the main one, see this module's docstring)")
    version = subprocess.run([str(ST), "--version"], capture_output=True, text=True).stdout
    if pinned not in version:
        pytest.fail(f"{ST} is {version.strip()!r}, {PIN.name} pins {pinned}: run `make setup`")
    # one worker: with two, Hypothesis's lambda descriptions race in CPython 3.11's ast module
    # ("AST constructor recursion depth mismatch", a schemathesis runtime error, not an API fault)
    return subprocess.run(
        [str(ST), "--config-file", str(CONFIG), "run", location, "--checks", "all",
         "--seed", str(SEED), "--workers", "1", "--no-color", "--generation-database", "none",
         *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def generated(output: str) -> tuple[int, int]:
    """(test cases generated, passed) from schemathesis's summary."""
    m = re.search(r"Test cases:\s+(\d+) generated, (?:(\d+) passed)?", output)
    assert m, output[-3000:]
    return int(m[1]), int(m[2] or 0)


def test_schemathesis_finds_no_server_error_and_no_conformance_failure(live_api, tmp_path):
    base, log_path, token = live_api
    started = time.monotonic()
    result = schemathesis(f"{base}/openapi.json", "--max-examples", str(EXAMPLES),
                          "--header", f"Authorization: Bearer {token}", cwd=tmp_path)
    elapsed = time.monotonic() - started
    out = result.stdout
    print(out[-2500:], f"\nschemathesis took {elapsed:.0f} s")
    assert result.returncode == 0, (out[-8000:] + result.stderr[-2000:]
                                    + "\nAPI log:\n" + log_path.read_text()[-3000:])
    assert "No issues found" in out, out[-3000:]
    cases, passed = generated(out)
    assert cases == passed > 1000, out[-3000:]  # all passed, and thousands ran
    assert re.search(r"Operations:\s+(\d+) selected / \1 total", out), out[:2000]
    # the stateful phase followed every link, so the seeded ids were reached, not only 404s
    links = re.search(r"API Links:\s+(\d+) covered / (\d+) selected", out)
    assert links and links[1] == links[2] and int(links[1]) >= 8, out[:3000]
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-3000:]
    # and by the API's own count: thousands of requests answered, none with a 5xx
    by_status: dict[str, float] = {}
    for m in re.finditer(r'labbus_api_requests_total\{route="[^"]*",status="(\d+)"\} ([0-9.e+]+)',
                         httpx.get(f"{base}/metrics").text):
        by_status[m[1]] = by_status.get(m[1], 0) + float(m[2])
    assert sum(by_status.values()) > 1000, by_status
    assert not [s for s in by_status if s.startswith("5")], by_status


def test_the_contract_run_fails_when_the_api_breaks_its_schema(live_api, tmp_path):
    """The harness has teeth: the same run against a schema that leaves out GET /devices/{id}'s
    404 reports the undocumented status and exits non-zero."""
    base, _, token = live_api
    schema = httpx.get(f"{base}/openapi.json").json()
    del schema["paths"]["/devices/{device_id}"]["get"]["responses"]["404"]
    (tmp_path / "openapi.json").write_text(json.dumps(schema))
    result = schemathesis(str(tmp_path / "openapi.json"), "--url", base, "--max-examples", "5",
                          "--include-path", "/devices/{device_id}", "--phases", "coverage",
                          "--header", f"Authorization: Bearer {token}", cwd=tmp_path)
    assert result.returncode != 0, result.stdout[-3000:]
    assert "Undocumented status code" in result.stdout, result.stdout[-3000:]


def test_schemathesis_against_the_command_gateway_with_a_token(live_gateway, tmp_path):
    """The gateway's contract: its token issuer, keys, discovery, health and POST /commands
    (each accepted case publishes a command to the session's broker, hence fewer examples)."""
    base, _, token, log_path = live_gateway
    started = time.monotonic()
    result = schemathesis(f"{base}/openapi.json", "--max-examples", str(GATEWAY_EXAMPLES),
                          "--header", f"Authorization: Bearer {token}", cwd=tmp_path)
    out = result.stdout
    print(out[-2500:], f"\nschemathesis (gateway) took {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, (out[-8000:] + result.stderr[-2000:]
                                    + "\ngateway log:\n" + log_path.read_text()[-3000:])
    assert "No issues found" in out, out[-3000:]
    cases, passed = generated(out)
    assert cases == passed > 50, out[-3000:]
    assert re.search(r"Operations:\s+(\d+) selected / \1 total", out), out[:2000]
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-3000:]
