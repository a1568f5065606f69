"""Who may do what: roles as data, one table of role -> permissions for every entry point.

A permission names an action (`experiment:start`) or a reach of reading (`read:own`,
`read:all`). Entry points (the command gateway, the query API) ask `allowed(roles, permission)`
and never test role names themselves, so changing what a role may do is an edit of ROLES below
and of nothing else. The README's table "Identity and tokens" is `roles_markdown()`.

Roles a token carries that labbus does not know (an identity provider's own, e.g. Keycloak's
`offline_access`) are ignored: they grant nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from labbus.events.model import derived_id

# permission -> what it allows (the README's wording)
PERMISSIONS: dict[str, str] = {
    "read:own": "read the experiments, commands and requests one started oneself",
    "read:all": "read every read model (all users' experiments, devices, commands, alerts)",
    "experiment:start": "request a colour campaign (ExperimentRequested)",
    "experiment:cancel": "cancel a campaign one started (any campaign, with read:all too)",
    "command:send": "send a command to a device (CommandIssued)",
    "service-request:submit": "submit test service requests and sample registrations",
    "result:record": "enter test results by hand, record a sample's inspection",
    "execution:abort": "abort a running test execution",
    "protocol:manage": "add and version test protocol templates",
    "audit:read": "read the activity log (who did what, when, from where)",
    "users:manage": "add and disable users, grant and revoke roles, grant quotas",
}


@dataclass(frozen=True)
class Role:
    name: str
    domain: str  # which lab uses it: "colour", "testing" or "all"
    permissions: frozenset[str]
    description: str


def _role(name: str, domain: str, description: str, *permissions: str) -> Role:
    unknown = set(permissions) - set(PERMISSIONS)
    assert not unknown, f"role {name}: unknown permissions {unknown}"
    return Role(name, domain, frozenset(permissions), description)


ROLES: dict[str, Role] = {r.name: r for r in (
    _role("admin", "all", "runs the lab's labbus: everything", *PERMISSIONS),
    _role("researcher", "colour", "runs colour campaigns and sees their own",
          "experiment:start", "experiment:cancel", "read:own"),
    _role("student", "colour", "like a researcher, within a quota of wells",
          "experiment:start", "experiment:cancel", "read:own"),
    _role("viewer", "colour", "reads everything, changes nothing", "read:all"),
    _role("engineer", "testing", "defines test protocols, runs tests, sends device commands",
          "protocol:manage", "service-request:submit", "result:record", "execution:abort",
          "command:send", "read:all"),
    _role("operator", "testing", "runs tests and sends device commands",
          "service-request:submit", "result:record", "execution:abort", "command:send",
          "read:all"),
)}


class UnknownRole(ValueError):
    """A role name that is not in ROLES."""


def role(name: str) -> Role:
    try:
        return ROLES[name]
    except KeyError:
        raise UnknownRole(f"unknown role {name!r}: one of {', '.join(ROLES)}") from None


def known_roles(roles: Iterable[str]) -> tuple[str, ...]:
    """The labbus roles among `roles`, in ROLES order, each once (others are ignored)."""
    given = set(roles)
    return tuple(name for name in ROLES if name in given)


def permissions_of(roles: Iterable[str]) -> frozenset[str]:
    """Everything the roles together may do."""
    out: frozenset[str] = frozenset()
    for name in known_roles(roles):
        out |= ROLES[name].permissions
    return out


def allowed(roles: Iterable[str], permission: str) -> bool:
    if permission not in PERMISSIONS:
        raise KeyError(f"unknown permission {permission!r}")
    return permission in permissions_of(roles)


def may_read(roles: Iterable[str], user_id: str, owner_id: str | None) -> bool:
    """May a caller with `roles` and id `user_id` read something `owner_id` started?"""
    perms = permissions_of(roles)
    return "read:all" in perms or ("read:own" in perms and owner_id == user_id)


def may_act_on(roles: Iterable[str], permission: str, user_id: str,
               owner_id: str | None) -> bool:
    """May a caller act (`permission`, e.g. experiment:cancel) on something `owner_id` started?
    On their own things with the permission; on anyone's with read:all as well."""
    perms = permissions_of(roles)
    return permission in perms and ("read:all" in perms or owner_id == user_id)


@dataclass(frozen=True)
class Principal:
    """A caller whose token was verified (labbus.events.tokens)."""

    user_id: str  # the token's `sub`
    roles: tuple[str, ...]  # the labbus roles among the token's (known_roles)
    token_id: str | None = None  # `jti`
    issuer: str = ""
    expires_at: datetime | None = None
    email: str | None = None
    claims: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def permissions(self) -> frozenset[str]:
        return permissions_of(self.roles)

    def may(self, permission: str) -> bool:
        return allowed(self.roles, permission)


# -- users of the built-in issuer -------------------------------------------------------------

_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


def normalise_email(email: str) -> str:
    """The form a user's email is stored and looked up in (trimmed, lower case)."""
    value = email.strip().lower()
    if len(value) > 254 or not _EMAIL.fullmatch(value):
        raise ValueError(f"{email!r} is not an email address")
    return value


def user_id_for(email: str) -> str:
    """A built-in user's id: derived from the normalised email, so a retried `users add` names
    the same user (and its UserRegistered is the same event)."""
    return derived_id("user", normalise_email(email))


def roles_markdown() -> str:
    """The role -> permission table of the README."""
    lines = ["| permission | what it allows | " + " | ".join(ROLES) + " |",
             "|---|---|" + "---|" * len(ROLES)]
    for p, what in PERMISSIONS.items():
        marks = " | ".join("✓" if p in r.permissions else "" for r in ROLES.values())
        lines.append(f"| `{p}` | {what} | {marks} |")
    return "\n".join(lines)
