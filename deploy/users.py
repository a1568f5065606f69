"""`labbus users ...`: the built-in issuer's users, for an operator holding broker and database
credentials (the writer role, LABBUS_POSTGRES_DSN).

A user's lifecycle is events on lab.users (UserRegistered, RoleGranted, RoleRevoked,
UserDisabled, QuotaGranted), which the PostgreSQL projector turns into the `users` read model the
issuer reads. The password's Argon2id hash goes into auth.credentials only, never into an event.

`add` publishes UserRegistered first and writes the credentials after the broker acknowledged
it: interrupted in between, it can be run again (the user id and the event id derive from the
email, so the registration is the same event); a user with credentials exists for good.
"""

from __future__ import annotations

import asyncio
import getpass
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from labbus.events import kafka
from labbus.events.config import Config
from labbus.events.db import connect_pool
from labbus.events.identity import normalise_email, role, user_id_for
from labbus.events.model import (
    Event,
    QuotaGranted,
    RoleGranted,
    RoleRevoked,
    UserDisabled,
    UserRegistered,
    derived_id,
)
from labbus.producers.http_gateway import passwords, store
from labbus.projections.migrate import migrate


class UserError(ValueError):
    """A request the users' state refuses (exists, unknown); the message says which."""


def actor() -> str:
    try:
        return f"cli/{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "cli/unknown"


async def _with_db(cfg: Config, work: Callable[[Any], Awaitable[Any]]) -> Any:
    pool = await connect_pool(cfg.postgres_dsn, "LABBUS_POSTGRES_DSN")
    try:
        async with pool.acquire() as con:
            await migrate(con)  # auth.credentials and users exist from here on
        return await work(pool)
    finally:
        await pool.close()


def _event(cls: type[Event], user_id: str, event_id: str | None = None, **payload) -> Event:
    return cls.create(source="cli", subject=user_id, sequence=0,
                      event_id=uuid.UUID(event_id) if event_id else None, user_id=user_id,
                      **payload)


async def add(cfg: Config, email: str, roles: list[str], password: str,
              by: str | None = None) -> str:
    """Register a user with a password; returns the user id."""
    email = normalise_email(email)
    for name in roles:
        role(name)  # UnknownRole for a name not in ROLES
    passwords.check_new(password)
    user_id = user_id_for(email)

    async def work(pool) -> str:
        if await store.credentials(pool, email) is not None:
            raise UserError(f"user {email} exists (id {user_id})")
        hashed = await asyncio.to_thread(passwords.hash_password, password)
        await kafka.publish(cfg, _event(UserRegistered, user_id,
                                        derived_id(user_id, "registered"), email=email,
                                        roles=sorted(set(roles)), registered_by=by or actor()))
        if not await store.add_credentials(pool, user_id, email, hashed):
            raise UserError(f"user {email} was added meanwhile by someone else")
        return user_id

    return await _with_db(cfg, work)


async def known_user(cfg: Config, email: str) -> str:
    """The id of the user with this email (one with credentials), or UserError."""
    email = normalise_email(email)

    async def work(pool) -> str:
        row = await store.credentials(pool, email)
        if row is None:
            raise UserError(f"no user {email} (add one with `labbus users add`)")
        return row["user_id"]

    return await _with_db(cfg, work)


async def grant(cfg: Config, email: str, role_name: str, by: str | None = None) -> Event:
    role(role_name)
    event = _event(RoleGranted, await known_user(cfg, email), role=role_name,
                   granted_by=by or actor())
    await kafka.publish(cfg, event)
    return event


async def revoke(cfg: Config, email: str, role_name: str, by: str | None = None) -> Event:
    role(role_name)
    event = _event(RoleRevoked, await known_user(cfg, email), role=role_name,
                   revoked_by=by or actor())
    await kafka.publish(cfg, event)
    return event


async def disable(cfg: Config, email: str, reason: str, by: str | None = None) -> Event:
    event = _event(UserDisabled, await known_user(cfg, email), reason=reason,
                   disabled_by=by or actor())
    await kafka.publish(cfg, event)
    return event


async def grant_quota(cfg: Config, email: str, wells: int, note: str = "",
                      by: str | None = None) -> Event:
    if wells <= 0:
        raise UserError("a quota grant adds a positive number of wells")
    event = _event(QuotaGranted, await known_user(cfg, email), wells=wells,
                   granted_by=by or actor(), note=note)
    await kafka.publish(cfg, event)
    return event


async def listing(cfg: Config) -> list[dict]:
    """The users read model (what the issuer sees)."""
    return await _with_db(cfg, _rows)


async def _rows(pool) -> list[dict]:
    remaining = {r["user_id"]: r["quota_remaining"] for r in await pool.fetch(
        "SELECT user_id, quota_remaining FROM users")}
    return [{**dict(r), "quota_remaining": remaining.get(r["user_id"])}
            for r in await store.users(pool)]
