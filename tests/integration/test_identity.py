"""The built-in issuer end to end against real Kafka and PostgreSQL: `labbus users add` ->
lab.users -> `labbus project postgres` -> the users read model -> `POST /auth/token` on a running
`labbus gateway http` (real HTTP) -> the kernel's verifier accepts the token through the
gateway's discovery document and JWKS. Wrong passwords, unknown and disabled users are refused;
roles granted and revoked show in the next token; the SELECT-only API role cannot read the
credentials; no credential reaches the event log."""

from __future__ import annotations

import subprocess
import time
import uuid
from dataclasses import replace
from pathlib import Path

import asyncpg
import httpx
import pytest
from aiokafka import TopicPartition

from labbus.deploy.demo import LABBUS
from labbus.events.codec import default_codec
from labbus.events.identity import user_id_for
from labbus.events.model import (
    AccessDenied,
    ExperimentCancelRequested,
    QuotaGranted,
    RoleGranted,
    RoleRevoked,
    UserDisabled,
    UserRegistered,
)
from labbus.events.runtime import Positioned
from labbus.events.tokens import TokenExpired, TokenVerifier
from labbus.events.topics import (
    COMMANDS,
    EXPERIMENTS,
    TESTING_REQUESTS,
    USERS,
    topic_name,
)
from labbus.projections.postgres import PostgresProjection
from tests.conftest import (
    REPO,
    Processes,
    free_port,
    http_server,
    read_topic,
    run,
    wait_for,
)

RUN = uuid.uuid4().hex[:8]
ADA = f"ada-{RUN}@lab.example"
BOB = f"bob-{RUN}@lab.example"
ADA_PW = "correct horse battery"
BOB_PW = "bob's long password"


def labbus(env, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([LABBUS, *args], env=env, input=stdin, capture_output=True, text=True,
                          timeout=120, cwd=REPO)


@pytest.fixture(scope="module")
def gateway(env, tmp_path_factory):
    """`labbus project postgres` and `labbus gateway http` on a free port, with a signing key
    of this test's own."""
    logs = tmp_path_factory.mktemp("identity")
    port = free_port()
    genv = {**env, "LABBUS_HTTP_GATEWAY_PORT": str(port),
            "LABBUS_AUTH_KEYS_DIR": str(logs / "auth")}
    procs = Processes(genv, logs)
    procs.start("project", "postgres")
    base = f"http://127.0.0.1:{port}"
    try:
        with http_server(["gateway", "http"], genv, logs / "gateway-http.log",
                         f"{base}/health/ready"):
            yield base, genv
    finally:
        procs.stop_all()


def token(base: str, username: str, password: str, **extra) -> httpx.Response:
    return httpx.post(f"{base}/auth/token", timeout=10,
                      data={"username": username, "password": password, **extra})


def token_once_projected(base: str, username: str, password: str) -> dict:
    """The token response, once the projector has written the user (invalid_grant until then)."""
    def ask():
        r = token(base, username, password)
        return r.json() if r.status_code == 200 else None
    return wait_for(ask, 60, f"a token for {username}", interval=0.3)


def signed_up(genv, base: str, **roles: str) -> dict[str, dict[str, str]]:
    """Users of this module's run (name -> role), each added with `labbus users add`: name ->
    the Authorization header of their token once the projector has them."""
    headers = {}
    for name, role in roles.items():
        email, pw = f"{name}-{RUN}@lab.example", f"{name}'s long password"
        r = labbus(genv, "users", "add", email, "--role", role, "--password-stdin",
                   stdin=pw + "\n")
        assert r.returncode == 0, r.stderr
        headers[name] = {"Authorization": "Bearer "
                         + token_once_projected(base, email, pw)["access_token"]}
    return headers


def verify(cfg, base: str, access_token: str):
    async def go():
        verifier = TokenVerifier.from_config(replace(cfg, auth_issuer=base))
        try:
            return await verifier.verify(access_token)
        finally:
            await verifier.aclose()
    return run(go())


@pytest.fixture(scope="module")
def users(gateway):
    base, genv = gateway
    added = {}
    for email, pw, role in ((ADA, ADA_PW, "researcher"), (BOB, BOB_PW, "student")):
        r = labbus(genv, "users", "add", email, "--role", role, "--password-stdin", stdin=pw + "\n")
        assert r.returncode == 0, r.stderr
        added[email] = r.stdout.strip()
    return added


def test_users_add_then_a_token_the_verifier_accepts_through_the_gateways_jwks(
        gateway, users, cfg):
    base, _ = gateway
    assert users[ADA] == user_id_for(ADA)
    body = token_once_projected(base, ADA, ADA_PW)
    assert body["token_type"] == "bearer" and body["expires_in"] == 900
    principal = verify(cfg, base, body["access_token"])
    assert principal.user_id == users[ADA] and principal.roles == ("researcher",)
    assert principal.email == ADA and principal.issuer == base
    assert principal.may("experiment:start") and not principal.may("read:all")
    # the discovery document and the keys are what the verifier used
    discovery = httpx.get(f"{base}/.well-known/openid-configuration").json()
    assert discovery["issuer"] == base and discovery["token_endpoint"] == f"{base}/auth/token"
    jwks = httpx.get(discovery["jwks_uri"]).json()
    assert [k["alg"] for k in jwks["keys"]] == ["ES256"] and "d" not in jwks["keys"][0]
    # the login name is case-insensitive
    assert token(base, ADA.upper(), ADA_PW).status_code == 200


def test_wrong_password_unknown_user_and_malformed_requests_are_refused(gateway, users):
    base, _ = gateway
    token_once_projected(base, ADA, ADA_PW)
    for username, password in ((ADA, "wrong password"), (f"nobody-{RUN}@lab.example", ADA_PW),
                               ("not an email", ADA_PW)):
        r = token(base, username, password)
        assert r.status_code == 400, r.text
        assert r.json()["error"] == "invalid_grant"
        assert r.headers["cache-control"] == "no-store"
    r = httpx.post(f"{base}/auth/token", data={"username": ADA})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    assert "password" in r.json()["error_description"]
    r = token(base, ADA, ADA_PW, grant_type="client_credentials")
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"
    metrics = httpx.get(f"{base}/metrics").text
    assert 'labbus_gateway_token_requests_total{outcome="invalid_grant"}' in metrics
    assert httpx.get(f"{base}/health/live").json() == {"status": "ok"}


def test_a_disabled_user_gets_no_new_token_and_an_issued_one_lasts_its_lifetime(
        gateway, users, cfg):
    base, genv = gateway
    before = token_once_projected(base, BOB, BOB_PW)["access_token"]
    r = labbus(genv, "users", "disable", BOB, "--reason", "left the lab")
    assert r.returncode == 0, r.stderr

    def refused():
        r = token(base, BOB, BOB_PW)
        return r.status_code == 400 and "disabled" in r.json()["error_description"]
    wait_for(refused, 60, "the disabled user to be refused")
    # no per-request lookup: the token issued before still verifies until it expires
    assert verify(cfg, base, before).user_id == users[BOB]
    r = labbus(genv, "users", "list")
    assert r.returncode == 0 and any(BOB in line and "disabled" in line
                                     for line in r.stdout.splitlines())


def test_granted_and_revoked_roles_show_in_the_next_token(gateway, users, cfg):
    base, genv = gateway
    token_once_projected(base, ADA, ADA_PW)
    assert labbus(genv, "users", "grant", ADA, "viewer").returncode == 0
    assert labbus(genv, "users", "revoke", ADA, "researcher").returncode == 0

    def roles_now():
        r = token(base, ADA, ADA_PW)
        if r.status_code != 200:
            return None
        roles = verify(cfg, base, r.json()["access_token"]).roles
        return roles if roles == ("viewer",) else None
    wait_for(roles_now, 60, "the next token to carry viewer only")
    r = labbus(genv, "users", "grant", ADA, "superuser")
    assert r.returncode == 2 and "superuser" in r.stderr
    r = labbus(genv, "users", "disable", f"nobody-{RUN}@lab.example")
    assert r.returncode == 1 and "no user" in r.stderr
    r = labbus(genv, "users", "add", ADA, "--role", "viewer", "--password-stdin",
               stdin="another password\n")
    assert r.returncode == 1 and "exists" in r.stderr


def test_credentials_stay_out_of_the_api_role_and_the_event_log(gateway, users, cfg):
    base, _ = gateway
    token_once_projected(base, ADA, ADA_PW)

    async def check():
        api = await asyncpg.connect(cfg.postgres_api_dsn)
        writer = await asyncpg.connect(cfg.postgres_dsn)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await api.fetch("SELECT * FROM auth.credentials")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await api.execute("DELETE FROM auth.credentials")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await api.execute("CREATE TABLE auth.stolen (x text)")
            # the read model is readable (the API will show users), not writable
            assert await api.fetchval("SELECT count(*) FROM users WHERE email = $1", ADA) == 1
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await api.execute("UPDATE users SET disabled = false")
            return await writer.fetch("SELECT email, password_hash FROM auth.credentials "
                                      "WHERE email = ANY($1)", [ADA, BOB])
        finally:
            await api.close()
            await writer.close()

    rows = run(check())
    assert len(rows) == 2 and all(r["password_hash"].startswith("$argon2id$") for r in rows)
    log = run(read_topic(cfg, topic_name(cfg, USERS)))
    mine = [r for r in log if r.key.decode() in (users[ADA], users[BOB])]
    assert len(mine) >= 2
    for record in mine:
        for secret in (ADA_PW, BOB_PW, *(r["password_hash"] for r in rows)):
            assert secret.encode() not in record.value
    assert {type(default_codec().decode(r.value)) for r in mine} >= {UserRegistered}


def test_the_users_read_model_applies_each_users_events_once_in_log_order(cfg):
    """Through the projection code: a replay of older offsets changes nothing, a grant and a
    later revoke of the same role in one batch end revoked, quotas add up once."""
    uid = f"rm-{RUN}"
    tp = TopicPartition(f"users-test-{RUN}", 0)
    codec = default_codec()
    made = [
        UserRegistered.create(source="t", subject=uid, sequence=0, user_id=uid,
                              email=f"{uid}@lab.example", roles=["student", "student"],
                              registered_by="t"),
        RoleGranted.create(source="t", subject=uid, sequence=0, user_id=uid, role="viewer",
                           granted_by="t"),
        QuotaGranted.create(source="t", subject=uid, sequence=0, user_id=uid, wells=96,
                            granted_by="t"),
        RoleGranted.create(source="t", subject=uid, sequence=0, user_id=uid, role="admin",
                           granted_by="t"),
        RoleRevoked.create(source="t", subject=uid, sequence=0, user_id=uid, role="admin",
                           revoked_by="t"),
        UserDisabled.create(source="t", subject=uid, sequence=0, user_id=uid, reason="done",
                            disabled_by="t"),
        QuotaGranted.create(source="t", subject=uid, sequence=0, user_id=uid, wells=4,
                            granted_by="t"),
    ]
    events = [Positioned(tp, i, *codec.decode_record(codec.encode(e), plain=True))
              for i, e in enumerate(made)]

    async def go():
        projection = PostgresProjection(cfg)
        await projection.start()
        try:
            await projection.apply(events, {})
            first = await projection.pool.fetchrow("SELECT * FROM users WHERE user_id = $1", uid)
            # a replay: grant admin again, both quotas again
            await projection.apply(events[1:4] + events[-1:], {})
            again = await projection.pool.fetchrow("SELECT * FROM users WHERE user_id = $1", uid)
            return first, again
        finally:
            await projection.stop()

    first, again = run(go())
    assert first["roles"] == ["student", "viewer"] and first["quota_granted_wells"] == 100
    assert first["disabled"] and first["disabled_reason"] == "done"
    assert first["last_offset"] == len(made) - 1
    assert dict(again) == dict(first)


def test_an_expired_token_of_the_gateway_is_refused(gateway, users, cfg):
    """The lifetime is LABBUS_AUTH_TOKEN_TTL_S: a token minted with the gateway's key an hour
    ago (15 min lifetime) is refused by the verifier."""
    from labbus.producers.http_gateway import keys
    from labbus.producers.http_gateway.issuer import Issuer

    base, genv = gateway
    key = keys.load_or_create(Path(genv["LABBUS_AUTH_KEYS_DIR"]))
    old = Issuer(base, cfg.auth_audience, 900, key, clock=lambda: time.time() - 3600)
    with pytest.raises(TokenExpired):
        verify(cfg, base, old.mint(user_id_for(ADA), ("researcher",))[0])


def test_commands_need_a_token_and_the_permission_and_a_retried_post_publishes_once(
        gateway, users, cfg):
    """POST /commands: 401 without a token, 403 for a student, 202 for an operator with the
    event on lab.commands (issued_by = the token's subject) and a Location on the query API;
    the same Idempotency-Key again publishes nothing, with another body it is a 409."""
    base, genv = gateway
    carol, carol_pw = f"carol-{RUN}@lab.example", "carol's long password"
    dan, dan_pw = f"dan-{RUN}@lab.example", "dan's long password"
    for email, pw, role in ((carol, carol_pw, "operator"), (dan, dan_pw, "student")):
        r = labbus(genv, "users", "add", email, "--role", role, "--password-stdin",
                   stdin=pw + "\n")
        assert r.returncode == 0, r.stderr
    device = f"gw-http-{RUN}"
    body = {"device_id": device, "command_type": "measure", "payload": {"wavelength_nm": 600},
            "timeout_s": 30}

    refused = httpx.post(f"{base}/commands", json=body, timeout=10)
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
    student = token_once_projected(base, dan, dan_pw)["access_token"]
    forbidden = httpx.post(f"{base}/commands", json=body, timeout=10,
                           headers={"Authorization": f"Bearer {student}"})
    assert forbidden.status_code == 403 and "command:send" in forbidden.json()["detail"]

    carol_token = token_once_projected(base, carol, carol_pw)["access_token"]
    operator = {"Authorization": f"Bearer {carol_token}", "Idempotency-Key": "first"}
    bad = httpx.post(f"{base}/commands", json={**body, "timeout_s": 0}, headers=operator,
                     timeout=10)
    assert bad.status_code == 422
    sent = httpx.post(f"{base}/commands", json=body, headers=operator, timeout=10)
    assert sent.status_code == 202, sent.text
    answer = sent.json()
    assert sent.headers["Location"] == answer["location"] == (
        f"{cfg.query_api_url}/commands/{answer['command_id']}")
    again = httpx.post(f"{base}/commands", json=body, headers=operator, timeout=10)
    assert again.status_code == 202 and again.json() == answer
    other = httpx.post(f"{base}/commands", json={**body, "payload": {"wavelength_nm": 700}},
                       headers=operator, timeout=10)
    assert other.status_code == 409

    codec = default_codec()
    issued = [codec.decode(rec.value) for rec in run(read_topic(cfg, topic_name(cfg, COMMANDS)))
              if rec.key == device.encode()]
    assert [(e.command_id, str(e.event_id), e.issued_by) for e in issued] == [
        (answer["command_id"], answer["event_id"], user_id_for(carol))]
    assert issued[0].payload_json == '{"wavelength_nm":600}'
    actor = issued[0].envelope.actor  # who asked, for the audit log
    assert (actor.user_id, actor.roles, actor.client_ip) == (
        user_id_for(carol), ("operator",), "127.0.0.1")
    assert actor.user_agent.startswith("python-httpx") and actor.token_id


def test_a_campaign_started_through_the_gateway_is_requested_by_the_caller(gateway, users, cfg):
    """POST /experiments: 403 for a role without experiment:start, 422 for a target in none of
    the documented forms, 400 for one out of range, 202 for a student with ExperimentRequested
    on lab.experiments requested by the student and carrying the student as its actor; a retry
    with the same key publishes once."""
    base, genv = gateway
    eve, eve_pw = f"eve-{RUN}@lab.example", "eve's long password"
    fay, fay_pw = f"fay-{RUN}@lab.example", "fay's long password"
    for email, pw, role in ((eve, eve_pw, "student"), (fay, fay_pw, "viewer")):
        r = labbus(genv, "users", "add", email, "--role", role, "--password-stdin",
                   stdin=pw + "\n")
        assert r.returncode == 0, r.stderr
    body = {"target": "#7a3cc0", "dyes": ["red", "yellow", "blue"], "budget_wells": 16,
            "batch_size": 8}
    viewer = token_once_projected(base, fay, fay_pw)["access_token"]
    forbidden = httpx.post(f"{base}/experiments", json=body, timeout=10,
                           headers={"Authorization": f"Bearer {viewer}"})
    assert forbidden.status_code == 403 and "experiment:start" in forbidden.json()["detail"]
    student = {"Authorization": f"Bearer {token_once_projected(base, eve, eve_pw)['access_token']}",
               "Idempotency-Key": f"campaign-{RUN}", "User-Agent": "labbus-test/1"}
    bad = httpx.post(f"{base}/experiments", json={**body, "target": "#zzz"}, headers=student,
                     timeout=10)
    assert bad.status_code == 422  # not one of the documented forms
    out = httpx.post(f"{base}/experiments", json={**body, "target": "rgb(300, 0, 0)"},
                     headers=student, timeout=10)
    assert out.status_code == 400 and "between 0 and 255" in out.json()["detail"]
    started = httpx.post(f"{base}/experiments", json=body, headers=student, timeout=10)
    assert started.status_code == 202, started.text
    answer = started.json()
    assert started.headers["Location"] == f"{cfg.query_api_url}/experiments/" \
                                          f"{answer['experiment_id']}"
    again = httpx.post(f"{base}/experiments", json=body, headers=student, timeout=10)
    assert again.status_code == 202 and again.json() == answer

    codec = default_codec()
    requested = [codec.decode(rec.value)
                 for rec in run(read_topic(cfg, topic_name(cfg, EXPERIMENTS)))
                 if rec.key == answer["experiment_id"].encode()]
    assert [str(e.event_id) for e in requested] == [answer["event_id"]]
    (req,) = requested
    assert req.requested_by == user_id_for(eve) and req.budget_wells == 16
    assert req.dyes == ["red", "yellow", "blue"] and req.target_hex == "#7a3cc0"
    assert (req.envelope.actor.user_id, req.envelope.actor.roles,
            req.envelope.actor.user_agent) == (user_id_for(eve), ("student",), "labbus-test/1")
    # the viewer's refusal is on the log, for the audit
    denied = [e for e in (codec.decode(rec.value)
                          for rec in run(read_topic(cfg, topic_name(cfg, USERS)))
                          if rec.key == user_id_for(fay).encode())
              if isinstance(e, AccessDenied)]
    assert [(d.permission, d.request, d.envelope.actor.client_ip) for d in denied] == [
        ("experiment:start", "POST /experiments", "127.0.0.1")]


def test_the_cli_logs_in_and_goes_through_the_gateway(gateway, users, cfg, tmp_path):
    """`labbus login` keeps a token (mode 0600); `experiment start` and `command send` then go
    through the gateway: the events carry the user as actor, with the CLI's user agent. A wrong
    password is refused with the issuer's reason; `--via gateway` without a token says so."""
    base, genv = gateway
    cenv = {**genv, "LABBUS_TOKEN_FILE": str(tmp_path / "token.json"),
            "LABBUS_GATEWAY_URL": base}
    gil, gil_pw = f"gil-{RUN}@lab.example", "gil's long password"
    r = labbus(cenv, "users", "add", gil, "--role", "researcher", "--role", "operator",
               "--password-stdin", stdin=gil_pw + "\n")
    assert r.returncode == 0, r.stderr
    token_once_projected(base, gil, gil_pw)
    no_token = labbus(cenv, "experiment", "start", "--target", "#7a3cc0", "--via", "gateway")
    assert no_token.returncode != 0 and "labbus login" in no_token.stderr
    wrong = labbus(cenv, "login", gil, "--password-stdin", stdin="not the password\n")
    assert wrong.returncode != 0 and "refused" in wrong.stderr
    ok = labbus(cenv, "login", gil, "--password-stdin", stdin=gil_pw + "\n")
    assert ok.returncode == 0 and user_id_for(gil) in ok.stdout, ok.stderr
    assert (tmp_path / "token.json").stat().st_mode & 0o777 == 0o600

    started = labbus(cenv, "experiment", "start", "--target", "#336699", "--budget", "8",
                     "--idempotency-key", f"cli-{RUN}")
    assert started.returncode == 0, started.stderr
    xid = started.stdout.strip()
    device = f"cli-gw-{RUN}"
    sent = labbus(cenv, "command", "send", device, "measure", "--payload", '{"n": 1}')
    assert sent.returncode == 0, sent.stderr
    command_id = sent.stdout.strip()

    codec = default_codec()
    req = [codec.decode(rec.value) for rec in run(read_topic(cfg, topic_name(cfg, EXPERIMENTS)))
           if rec.key == xid.encode()]
    cmd = [codec.decode(rec.value) for rec in run(read_topic(cfg, topic_name(cfg, COMMANDS)))
           if rec.key == device.encode()]
    assert len(req) == 1 and req[0].requested_by == user_id_for(gil)
    assert [c.command_id for c in cmd] == [command_id]
    for event in (req[0], cmd[0]):
        actor = event.envelope.actor
        assert (actor.user_id, actor.user_agent) == (user_id_for(gil), "labbus-cli")
        assert set(actor.roles) == {"researcher", "operator"}

    def cancelled():  # through the gateway, once the projector shows the experiment
        r = labbus(cenv, "experiment", "cancel", xid, "--reason", "changed my mind")
        return r if "(404)" not in r.stderr else None
    done = wait_for(cancelled, 30, "the cancel through the gateway")
    assert done.returncode == 0, done.stderr
    assert labbus(cenv, "logout").returncode == 0 and not (tmp_path / "token.json").exists()


def test_a_campaign_is_cancelled_by_its_requester_not_by_another_student(gateway, users, cfg):
    """POST /experiments/{id}/cancel: 404 for an experiment the read model does not hold, 403
    (and an AccessDenied) for another student, 202 for the requester with
    ExperimentCancelRequested carrying the requester as actor; an admin may cancel anyone's."""
    base, genv = gateway
    people = signed_up(genv, base, hal="student", ivy="student", jon="admin")
    body = {"target": "#336699", "dyes": ["red", "yellow", "blue"], "budget_wells": 8}
    started = httpx.post(f"{base}/experiments", json=body, headers=people["hal"], timeout=10)
    assert started.status_code == 202, started.text
    xid = started.json()["experiment_id"]
    unknown = httpx.post(f"{base}/experiments/exp-nope-{RUN}/cancel", headers=people["hal"],
                         timeout=10)
    assert unknown.status_code == 404

    def cancel(who: str) -> httpx.Response | None:
        r = httpx.post(f"{base}/experiments/{xid}/cancel", json={"reason": f"by {who}"},
                       headers=people[who], timeout=10)
        return None if r.status_code == 404 else r  # not projected yet

    other = wait_for(lambda: cancel("ivy"), 30, "the experiment in the read model")
    assert other.status_code == 403 and "own campaigns" in other.json()["detail"]
    mine = cancel("hal")
    assert mine.status_code == 202 and mine.headers["Location"].endswith(f"/experiments/{xid}")
    admin = cancel("jon")
    assert admin.status_code == 202

    codec = default_codec()
    cancels = [e for e in (codec.decode(rec.value)
                           for rec in run(read_topic(cfg, topic_name(cfg, EXPERIMENTS)))
                           if rec.key == xid.encode())
               if isinstance(e, ExperimentCancelRequested)]
    assert [(c.reason, c.requested_by, c.envelope.actor.roles) for c in cancels] == [
        ("by hal", user_id_for(f"hal-{RUN}@lab.example"), ("student",)),
        ("by jon", user_id_for(f"jon-{RUN}@lab.example"), ("admin",))]
    denied = [e for e in (codec.decode(rec.value)
                          for rec in run(read_topic(cfg, topic_name(cfg, USERS)))
                          if rec.key == user_id_for(f"ivy-{RUN}@lab.example").encode())
              if isinstance(e, AccessDenied)]
    assert [(d.permission, d.request) for d in denied] == [
        ("experiment:cancel", f"POST /experiments/{xid}/cancel")]


def test_a_students_campaign_shows_in_the_audit_and_not_to_another_student(gateway, users,
                                                                          cfg):
    """End to end with the built-in issuer's tokens: a student starts a campaign through the
    gateway; the admin sees it in `/audit` (the student's id and IP, experiment:start); the
    student reads their campaign, another student gets 404 for it and 403 for `/audit`."""
    from fastapi.testclient import TestClient

    from labbus.api.app import create_app

    base, genv = gateway
    tokens = signed_up(genv, base, kim="student", lee="student", max="admin")
    body = {"target": "#7a3cc0", "dyes": ["red", "yellow", "blue"], "budget_wells": 8}
    started = httpx.post(f"{base}/experiments", json=body, timeout=10,
                         headers={**tokens["kim"], "User-Agent": "kim-browser"})
    assert started.status_code == 202, started.text
    xid, event_id = started.json()["experiment_id"], started.json()["event_id"]
    kim = user_id_for(f"kim-{RUN}@lab.example")

    with TestClient(create_app(replace(cfg, auth_issuer=base))) as api:
        def audited():
            r = api.get("/audit", params={"user": kim, "action": "experiment:start"},
                        headers=tokens["max"])
            assert r.status_code == 200, r.text
            return r.json()["items"] or None
        (entry,) = wait_for(audited, 30, "the campaign in the audit log")
        assert (entry["event_id"], entry["user_id"], entry["client_ip"], entry["user_agent"],
                entry["subject"], entry["roles"]) == (
            event_id, kim, "127.0.0.1", "kim-browser", xid, ["student"])
        assert api.get(f"/experiments/{xid}", headers=tokens["kim"]).status_code == 200
        assert api.get(f"/experiments/{xid}", headers=tokens["lee"]).status_code == 404
        theirs = api.get("/experiments", headers=tokens["lee"]).json()["items"]
        assert xid not in [e["experiment_id"] for e in theirs]
        assert api.get("/audit", headers=tokens["kim"]).status_code == 403
        assert api.get("/audit").status_code == 401


def test_a_service_request_is_judged_against_the_catalog_and_submitted_by_the_caller(
        gateway, users, cfg, tmp_path):
    """POST /service-requests: 403 for a student, 400 with every reason for an unknown protocol
    and an input out of its template's range, 202 for an engineer with ServiceRequestSubmitted
    on lab.testing.requests carrying the engineer as actor; a retry publishes once."""
    base, genv = gateway
    people = signed_up(genv, base, nia="engineer", oto="student")
    body = {"customer": "ACME Solar", "module_type": "Canadian_Solar_Inc__CS6K_275M",
            "module_area_m2": 1.62, "sample_ids": [f"S-{RUN}-1", f"S-{RUN}-2"],
            "protocols": [{"protocol_id": "PVTP-001", "inputs": {
                "rated_pmax_w": 275, "measurement_uncertainty_pct": 3}},
                {"protocol_id": "PVTP-003"}]}
    student = httpx.post(f"{base}/service-requests", json=body, headers=people["oto"],
                         timeout=10)
    assert student.status_code == 403
    bad = httpx.post(f"{base}/service-requests", headers=people["nia"], timeout=10, json={
        **body, "protocols": [{"protocol_id": "PVTP-999"},
                              {"protocol_id": "PVTP-015", "inputs": {"cycles": 5}}]})
    assert bad.status_code == 400, bad.text
    assert "PVTP-999" in bad.json()["detail"] and "cycles" in bad.json()["detail"]
    engineer = {**people["nia"], "Idempotency-Key": f"sr-{RUN}"}
    sent = httpx.post(f"{base}/service-requests", json=body, headers=engineer, timeout=10)
    assert sent.status_code == 202, sent.text
    again = httpx.post(f"{base}/service-requests", json=body, headers=engineer, timeout=10)
    assert again.json() == sent.json()
    rid = sent.json()["request_id"]
    codec = default_codec()
    submitted = [codec.decode(rec.value)
                 for rec in run(read_topic(cfg, topic_name(cfg, TESTING_REQUESTS)))
                 if rec.key == rid.encode()]
    assert [str(e.event_id) for e in submitted] == [sent.json()["event_id"]]
    (e,) = submitted
    assert e.submitted_by == user_id_for(f"nia-{RUN}@lab.example")
    assert e.envelope.actor.roles == ("engineer",) and e.sample_ids == body["sample_ids"]
    assert [p["protocol_id"] for p in e.protocols] == ["PVTP-001", "PVTP-003"]

    # the CLI, logged in: through the gateway, judged before it is sent
    cenv = {**genv, "LABBUS_TOKEN_FILE": str(tmp_path / "token.json"),
            "LABBUS_GATEWAY_URL": base}
    login = labbus(cenv, "login", f"nia-{RUN}@lab.example", "--password-stdin",
                   stdin="nia's long password\n")
    assert login.returncode == 0, login.stderr
    args = ["testing", "submit", "--customer", "ACME", "--module-type", "m", "--area", "1.6",
            "--sample", f"C-{RUN}", "--protocol", "PVTP-015"]
    refused = labbus(cenv, *args, "--input", "PVTP-015.cycles=5")
    assert refused.returncode != 0 and "cycles" in refused.stderr
    ok = labbus(cenv, *args, "--input", "PVTP-015.injection_current_a=8.9")
    assert ok.returncode == 0, ok.stderr
    cli_rid = ok.stdout.strip()
    (cli,) = [codec.decode(rec.value)
              for rec in run(read_topic(cfg, topic_name(cfg, TESTING_REQUESTS)))
              if rec.key == cli_rid.encode()]
    assert cli.envelope.actor.user_agent == "labbus-cli"
    assert cli.protocols[0]["inputs"] == {"injection_current_a": 8.9}
