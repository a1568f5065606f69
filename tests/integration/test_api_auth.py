"""Tokens on both HTTP apps, against real PostgreSQL, Kafka and a stand-in OpenID provider on
loopback (tests/support/idp.py; the apps fetch its discovery document and JWKS over HTTP).

- The auth matrix, generated from the OpenAPI documents of the query API and the command
  gateway: every operation x {no token, expired, bad signature, wrong audience, wrong issuer, no
  labbus role, each role of identity.ROLES}. The expected answer comes from the operation's
  declared permissions (`x-labbus-permissions`, written from the route's guard): 401 for no or
  a bad token, 403 for roles that do not grant it, the operation's declared 2xx otherwise; a
  public operation answers every caller as it answers one without a token. Never a 5xx. Path
  parameters are ids of rows this module writes, owned by the matrix's user.
- Own experiments: a student lists and reads their own experiments and commands only; another
  student's are 404 (as an id that does not exist); an admin and a viewer read both.
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import TopicPartition
from fastapi.testclient import TestClient
from pymongo import MongoClient

from labbus.api.app import create_app
from labbus.api.testing import MEDIA_TYPES
from labbus.events.artifacts import GridFSStore
from labbus.events.codec import default_codec
from labbus.events.http_auth import PERMISSIONS_KEY, admitted
from labbus.events.identity import ROLES
from labbus.events.model import (
    CommandIssued,
    DeviceRegistered,
    ExecutionStarted,
    ProtocolAssigned,
    register_sample,
)
from labbus.events.runtime import Positioned
from labbus.producers.http_gateway.app import create_app as create_gateway
from labbus.projections.postgres import PostgresProjection
from tests.conftest import run
from tests.integration.test_experiment_read_models import campaign_events, positioned
from tests.support.idp import BAD_TOKENS
from tests.support.testing_events import as_positioned, report_generated, service_request_events

MATRIX_USER = "authm-user"
STUDENT_A, STUDENT_B = "authm-student-a", "authm-student-b"
DEVICE = "authm-dev"
OWNERS = {"authm-x": MATRIX_USER, "authm-a": STUDENT_A, "authm-b": STUDENT_B}
COMMANDS = {"authm-cmd-x": MATRIX_USER, "authm-cmd-a": STUDENT_A, "authm-cmd-b": STUDENT_B}
# every path parameter of both apps, filled with a row of this module (a new parameter fails)
PATH_VALUES = {"device_id": DEVICE, "experiment_id": "authm-x", "run_id": "authm-x-run-0",
               "command_id": "authm-cmd-x", "request_id": "authm-sr",
               "protocol_id": "PVTP-003", "sample_id": "authm-s1",
               "execution_id": "authm-running"}
# a request body for each operation that takes one (a new one fails until it is added here)
BODIES = {
    "send_command": {"json": {"device_id": DEVICE, "command_type": "measure",
                              "payload": {"wavelength_nm": 600}}},
    "token": {"data": {"username": "nobody@lab.example", "password": "not a password"}},
    # a dye no deck holds: the experiment processor, if one runs, rejects the campaign at once
    "start_experiment": {"json": {"target": "#7a3cc0", "dyes": ["authm-dye"],
                                  "budget_wells": 8}},
    "cancel_experiment": {"json": {"reason": "the auth matrix"}},
    "submit_service_request": {"json": {
        "customer": "auth matrix", "module_type": "authm-module", "module_area_m2": 1.6,
        "sample_ids": ["authm-s1"], "protocols": [{"protocol_id": "PVTP-003"}]}},
    "register_sample": {"json": {
        "sample_id": "authm-s1", "lims_ref": "AUTHM-1", "customer": "auth matrix",
        "module_type": "authm-module", "module_area_m2": 1.6, "serial_number": "SN-authm-1",
        "received_at": "2026-03-01T09:00:00+00:00"}},
    "record_inspection": {"json": {"sample_id": "authm-sr-S1", "findings": ["frame intact"]}},
    # the seeded execution stays running (no testing processor runs on the seed): 202 each time
    "abort_execution": {"json": {"reason": "the auth matrix"}},
}
# the routes anyone may call; every other route must declare a permission
PUBLIC = {"/health/live", "/health/ready", "/auth/token", "/.well-known/jwks.json",
          "/.well-known/openid-configuration"}
# who calls: None = no Authorization header; a str = a bad token of tests/support/idp.py; a
# tuple = a valid token with these roles
CALLERS: dict[str, str | tuple | None] = {
    "no token": None, **{kind: kind for kind in BAD_TOKENS},
    "no labbus role": ("offline_access",), **{role: (role,) for role in ROLES}}


def seed(cfg) -> None:
    """One device, three experiments (the matrix user's, student A's, student B's), three
    commands with the same owners and a service request with its reports, written through the
    real projection code."""
    codec = default_codec()
    t = dict(source="authm-test")
    by_topic: dict[str, list] = {"experiments": [], "runs": [], "readings": []}
    for xid, owner in OWNERS.items():
        for alias, events in campaign_events(xid, requested_by=owner).items():
            by_topic[alias] += events
    devices = [DeviceRegistered.create(**t, subject=DEVICE, sequence=0, device_id=DEVICE,
                                       device_type="spectrophotometer", model="m",
                                       location="bench", metrics=["absorbance"])]
    devices += [CommandIssued.create(
        **t, subject=DEVICE, sequence=i, command_id=cid, device_id=DEVICE, idempotency_key=cid,
        command_type="measure", payload_json="{}", issued_by=owner,
        expires_at=datetime.now(UTC) + timedelta(seconds=30))
        for i, (cid, owner) in enumerate(COMMANDS.items())]
    batches = positioned(by_topic) + [[
        Positioned(TopicPartition("authm-test.devices", 0), offset,
                   *codec.decode_record(codec.encode(e), plain=True))
        for offset, e in enumerate(devices)]]
    # a service request with its executions and its three reports (stored in GridFS)
    request = service_request_events("authm-sr", datetime(2026, 3, 1, tzinfo=UTC))
    client = MongoClient(cfg.mongo_url)
    store = GridFSStore(client[cfg.mongo_db])
    reports = [report_generated("authm-sr", fmt, store.put(f"authm-sr.{fmt}", media,
                                                           f"authm {fmt}".encode()),
                                datetime(2026, 3, 2, tzinfo=UTC))
               for fmt, media in MEDIA_TYPES.items()]
    client.close()
    # a registered sample, and an execution of the request that is running
    sample = register_sample("authm-s1", "AUTHM-1", "auth matrix", "authm-module", 1.6,
                             "SN-authm-1", datetime(2026, 3, 1, tzinfo=UTC), MATRIX_USER)
    ident = dict(source="testing", subject="authm-running", execution_id="authm-running",
                 request_id="authm-sr", sample_id="authm-sr-S1", protocol_id="PVTP-003",
                 template_version=1)
    running = [ProtocolAssigned.create(**ident, sequence=1, template_sha256="ab" * 32,
                                       inputs={}, module_type="m", module_area_m2=1.6),
               ExecutionStarted.create(**ident, sequence=2, steps=["insulation_resistance"])]
    batches += [as_positioned("authm-test.requests", request["requests"] + reports),
                as_positioned("authm-test.executions", request["executions"] + running),
                as_positioned("authm-test.samples", [sample])]

    async def write():
        pg = PostgresProjection(cfg)
        await pg.start()
        try:
            for batch in batches:
                await pg.apply(batch, {})  # no positions: the session's projectors are not steered
        finally:
            await pg.stop()

    run(write())


@pytest.fixture(scope="module")
def apps(cfg, tokens, tmp_path_factory):
    """The query API and the command gateway, both trusting the stand-in issuer, no default
    token; the gateway publishes to the session's broker and runs its built-in issuer with a
    key of this module's."""
    seed(cfg)
    trusting = tokens.config(cfg)
    gateway_cfg = replace(trusting, auth_keys_dir=tmp_path_factory.mktemp("auth-keys"))
    fetched = tokens.provider.jwks_fetches
    with TestClient(create_app(trusting)) as api, \
            TestClient(create_gateway(gateway_cfg)) as gateway:
        yield {"query API": api, "command gateway": gateway}
    # the keys are cached: each app fetched them once, whatever the number of requests
    assert tokens.provider.jwks_fetches - fetched <= 2


def headers_for(tokens, caller: str | tuple | None, user: str = MATRIX_USER) -> dict:
    if caller is None:
        return {}
    token = tokens.bad(caller, user) if isinstance(caller, str) else tokens.token(user, caller)
    return {"Authorization": f"Bearer {token}"}


def expected(caller: str | tuple | None, needed: list[str] | None, success: set[int],
             public_answer: int | None) -> set[int]:
    if needed is None:
        return {public_answer}  # a public route does not look at the token
    if caller is None or isinstance(caller, str):
        return {401}
    return success if admitted(caller, needed) else {403}


def test_auth_matrix_of_both_apps_from_their_openapi_documents(apps, tokens):
    rows, wrong = [], []
    for app_name, client in apps.items():
        document = client.get("/openapi.json").json()
        assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        for path, operations in document["paths"].items():
            url = re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m[1]], path)
            for method, operation in operations.items():
                needed = operation.get(PERMISSIONS_KEY)
                assert (needed is None) == (path in PUBLIC), f"{app_name} {path}: {needed}"
                responses = operation["responses"]
                success = {int(s) for s in responses if s.startswith("2")}
                if needed is not None:  # what the document promises a guarded route answers
                    assert {"401", "403"} <= set(responses), (path, method)
                    assert operation["security"] == [{"bearer": []}], (path, method)
                body = BODIES.get(operation["operationId"], {})
                if "requestBody" in operation:
                    assert body, f"add a body for {operation['operationId']} to BODIES"
                public_answer = None
                for name, caller in CALLERS.items():
                    r = client.request(method.upper(), url, headers=headers_for(tokens, caller),
                                       **body)
                    if public_answer is None:
                        public_answer = r.status_code  # "no token" comes first
                    want = expected(caller, needed, success, public_answer)
                    rows.append((app_name, f"{method.upper()} {path}", name, r.status_code))
                    if r.status_code not in want or r.status_code >= 500:
                        wrong.append((app_name, method.upper(), path, name, sorted(want),
                                      r.status_code, r.text[:200]))
                        continue
                    challenge = r.headers.get("www-authenticate", "")
                    if r.status_code == 401:
                        assert challenge.startswith('Bearer realm="labbus"'), challenge
                        assert ('error="invalid_token"' in challenge) == (caller is not None)
                    if r.status_code == 403 and needed is not None:
                        assert 'error="insufficient_scope"' in challenge, challenge
                        assert "detail" in r.json()
    assert not wrong, "\n".join(map(str, wrong))
    operations = {(a, route) for a, route, _, _ in rows}
    print(f"\nauth matrix: {len(operations)} operations x {len(CALLERS)} callers = {len(rows)} "
          f"requests; by status: {sorted(_count(s for *_, s in rows).items())}")
    assert len(operations) >= 20 and len(rows) == len(operations) * len(CALLERS)


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def test_a_student_reads_only_their_own_experiments_and_commands(apps, tokens):
    api = apps["query API"]

    def get(user: str, roles: tuple, url: str, **params):
        return api.get(url, params=params, headers=headers_for(tokens, roles, user))

    def listed(user: str, roles: tuple, url: str, mine: set[str], key: str) -> set[str]:
        found, cursor = set(), None
        while True:
            page = get(user, roles, url, limit=50, **({"cursor": cursor} if cursor else {}))
            assert page.status_code == 200, page.text
            found |= {item[key] for item in page.json()["items"]}
            cursor = page.json()["next_cursor"]
            if not cursor:
                return found & mine  # other tests' rows share the session's database

    for student, other in ((STUDENT_A, STUDENT_B), (STUDENT_B, STUDENT_A)):
        own_x = next(x for x, owner in OWNERS.items() if owner == student)
        other_x = next(x for x, owner in OWNERS.items() if owner == other)
        own_c = next(c for c, owner in COMMANDS.items() if owner == student)
        other_c = next(c for c, owner in COMMANDS.items() if owner == other)
        roles = ("student",)
        assert listed(student, roles, "/experiments", set(OWNERS), "experiment_id") == {own_x}
        assert listed(student, roles, "/commands", set(COMMANDS), "command_id") == {own_c}
        for suffix in ("", "/wells", "/plate.svg", "/convergence.svg"):
            assert get(student, roles, f"/experiments/{own_x}{suffix}").status_code == 200
            r = get(student, roles, f"/experiments/{other_x}{suffix}")
            # as for an id that does not exist: nothing tells that it does
            assert r.status_code == 404, (suffix, r.text)
            assert r.json()["detail"] == f"no experiment {other_x!r}"
        assert get(student, roles, f"/robot-runs/{own_x}-run-0/commands").status_code == 200
        assert get(student, roles, f"/robot-runs/{other_x}-run-0/commands").status_code == 404
        assert get(student, roles, f"/commands/{own_c}").status_code == 200
        assert get(student, roles, f"/commands/{other_c}").status_code == 404
        # instrument data is for the roles that read everything
        assert get(student, roles, "/devices").status_code == 403
    for user, roles in (("authm-admin", ("admin",)), ("authm-viewer", ("viewer",))):
        assert listed(user, roles, "/experiments", set(OWNERS), "experiment_id") == set(OWNERS)
        assert listed(user, roles, "/commands", set(COMMANDS), "command_id") == set(COMMANDS)
        for xid in OWNERS:
            assert get(user, roles, f"/experiments/{xid}").json()["requested_by"] == OWNERS[xid]
            assert get(user, roles, f"/robot-runs/{xid}-run-0/commands").status_code == 200
        for cid in COMMANDS:
            assert get(user, roles, f"/commands/{cid}").json()["issued_by"] == COMMANDS[cid]


def test_only_an_app_built_without_the_check_answers_without_a_token(apps, cfg, tokens):
    """`create_app(cfg, auth=False)` (the benchmark's baseline) answers without a token; the
    app `labbus api` builds refuses."""
    with TestClient(create_app(tokens.config(cfg), auth=False)) as open_api, \
            TestClient(create_app(tokens.config(cfg))) as api:
        assert open_api.get(f"/devices/{DEVICE}").status_code == 200
        assert api.get(f"/devices/{DEVICE}").status_code == 401
        assert api.get("/health/ready").status_code == 200
        assert api.get("/metrics").status_code == 200
        assert api.get("/openapi.json").status_code == 200
        assert api.get("/docs").status_code == 200
