"""The routes' permissions as the apps declare them (labbus.events.http_auth), without services:
the apps are built, not started."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from labbus.events import config
from labbus.events.http_auth import PERMISSIONS_KEY, Guard, admitted, route_guards, routes_markdown
from labbus.events.identity import Principal
from labbus.events.tokens import TokenVerifier
from tests.support.idp import Tokens

PUBLIC = {"/health/live", "/health/ready", "/auth/token", "/.well-known/jwks.json",
          "/.well-known/openid-configuration"}


def documents() -> tuple[tuple[str, dict], tuple[str, dict]]:
    from labbus.api.app import create_app
    from labbus.producers.http_gateway.app import create_app as create_gateway

    cfg = config.load({})  # the defaults: the built-in issuer on
    return (("query API", create_app(cfg).openapi()),
            ("command gateway", create_gateway(cfg).openapi()))


def test_the_readme_shows_the_routes_permissions_as_the_apps_declare_them():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = routes_markdown(*documents())
    assert table in readme, "README's routes table differs: paste http_auth.routes_markdown()"


def test_every_route_but_the_public_ones_declares_a_permission_and_its_refusals():
    for name, document in documents():
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                needed = operation.get(PERMISSIONS_KEY)
                assert (needed is None) == (path in PUBLIC), (name, method, path)
                if needed:
                    assert operation["security"] == [{"bearer": []}]
                    assert {"401", "403", "503"} <= set(operation["responses"])
                    assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]


def test_the_guards_are_readable_from_the_app():
    from labbus.api.app import READ_ALL, READ_OWN, create_app

    guards = {(m, p): g for m, p, g in route_guards(create_app(config.load({})))}
    assert guards[("GET", "/devices")] is READ_ALL
    assert guards[("GET", "/experiments/{experiment_id}")] is READ_OWN
    assert guards[("GET", "/health/ready")] is None


def test_admitted_by_any_of_the_permissions_through_the_roles_table():
    assert admitted(("viewer",), ["read:all"]) and not admitted(("student",), ["read:all"])
    assert admitted(("student",), ["read:own", "read:all"])
    assert not admitted(("offline_access",), ["read:own", "read:all"])
    assert admitted((), None)  # a public route
    with pytest.raises(ValueError):
        Guard("read:everything")
    with pytest.raises(ValueError):
        Guard()


SEND = Guard("command:send")


def test_a_refusal_for_missing_permissions_is_reported_to_the_app_before_the_403():
    """`app.state.on_denied` (the gateway's audit hook) hears each 403 for missing permissions,
    not the 401s nor the callers let in."""
    tokens = Tokens()
    heard = []

    async def on_denied(request, principal, permissions, reason):
        heard.append((request.url.path, principal.user_id, permissions, reason))

    app = FastAPI()

    @app.get("/x")
    async def x(principal: Annotated[Principal, Depends(SEND)]) -> dict:
        return {"user": principal.user_id}

    try:
        app.state.verifier = TokenVerifier.from_config(tokens.config(config.load({})))
        app.state.on_denied = on_denied
        with TestClient(app) as client:
            assert client.get("/x").status_code == 401
            assert client.get("/x", headers=tokens.headers("op", ("operator",))).json() == {
                "user": "op"}
            r = client.get("/x", headers=tokens.headers("stu", ("student",)))
            assert r.status_code == 403 and "insufficient_scope" in r.headers["www-authenticate"]
        assert heard == [("/x", "stu", ("command:send",), r.json()["detail"])]
    finally:
        tokens.close()
