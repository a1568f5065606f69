"""The routes' permissions as the apps declare them (labbus.events.http_auth), without services:
the apps are built, not started."""

from __future__ import annotations

from pathlib import Path

import pytest

from labbus.events import config
from labbus.events.http_auth import PERMISSIONS_KEY, Guard, admitted, route_guards, routes_markdown

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
