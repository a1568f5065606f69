"""Roles as data (labbus.events.identity): the one table every entry point asks."""

import pytest

from labbus.events.identity import (
    PERMISSIONS,
    ROLES,
    UnknownRole,
    allowed,
    known_roles,
    may_act_on,
    may_read,
    normalise_email,
    permissions_of,
    role,
    user_id_for,
)

WRITES = {"experiment:start", "experiment:cancel", "command:send", "service-request:submit",
          "result:record", "protocol:manage", "users:manage"}


def test_the_roles_of_the_issue_exist_and_use_known_permissions():
    assert set(ROLES) == {"admin", "researcher", "student", "viewer", "engineer", "operator"}
    for r in ROLES.values():
        assert r.permissions <= set(PERMISSIONS), r.name
    used = set().union(*(r.permissions for r in ROLES.values() if r.name != "admin"))
    assert used | {"audit:read", "users:manage"} == set(PERMISSIONS)


def test_admin_may_do_everything_a_viewer_nothing_but_read():
    assert permissions_of(["admin"]) == set(PERMISSIONS)
    assert permissions_of(["viewer"]) == {"read:all"}
    assert not permissions_of(["viewer"]) & WRITES


@pytest.mark.parametrize("name", ["researcher", "student"])
def test_colour_lab_users_start_and_cancel_campaigns_and_read_their_own(name):
    assert allowed([name], "experiment:start") and allowed([name], "experiment:cancel")
    assert allowed([name], "read:own") and not allowed([name], "read:all")
    for p in ("command:send", "audit:read", "users:manage", "protocol:manage"):
        assert not allowed([name], p), p


def test_testing_lab_roles():
    for name in ("engineer", "operator"):
        assert allowed([name], "command:send") and allowed([name], "service-request:submit")
        assert allowed([name], "read:all") and not allowed([name], "experiment:start")
        assert not allowed([name], "audit:read") and not allowed([name], "users:manage")
    assert allowed(["engineer"], "protocol:manage")
    assert not allowed(["operator"], "protocol:manage")
    assert not allowed(["viewer", "student"], "audit:read")
    assert allowed(["viewer", "student"], "experiment:start")  # roles add up


def test_unknown_roles_grant_nothing_and_unknown_permissions_are_errors():
    assert known_roles(["offline_access", "viewer", "admin", "viewer"]) == ("admin", "viewer")
    assert permissions_of(["uma_authorization"]) == frozenset()
    assert not allowed([], "read:own")
    with pytest.raises(KeyError):
        allowed(["admin"], "experiment:destroy")
    with pytest.raises(UnknownRole, match="researcher"):
        role("superuser")


def test_reading_and_acting_on_what_others_started():
    assert may_read(["student"], "u1", "u1") and not may_read(["student"], "u1", "u2")
    assert may_read(["viewer"], "u1", "u2") and may_read(["admin"], "u1", "u2")
    assert not may_read([], "u1", "u1")
    assert may_act_on(["student"], "experiment:cancel", "u1", "u1")
    assert not may_act_on(["student"], "experiment:cancel", "u1", "u2")
    assert may_act_on(["admin"], "experiment:cancel", "u1", "u2")
    assert not may_act_on(["viewer"], "experiment:cancel", "u1", "u2")  # reads all, acts on none


def test_user_ids_derive_from_the_normalised_email():
    assert normalise_email("  Ada@Lab.Example ") == "ada@lab.example"
    assert user_id_for("Ada@Lab.Example") == user_id_for("ada@lab.example")
    assert user_id_for("ada@lab.example") != user_id_for("bob@lab.example")
    for bad in ("ada", "ada@", "@lab.example", "a da@lab.example", "ada@lab"):
        with pytest.raises(ValueError):
            normalise_email(bad)


def test_the_readme_shows_the_roles_table_as_the_data_says():
    from pathlib import Path

    from labbus.events.identity import roles_markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert roles_markdown() in readme, "README's roles table differs: paste roles_markdown()"
