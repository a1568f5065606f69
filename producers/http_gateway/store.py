"""The built-in issuer's tables: password hashes (auth.credentials, written by `labbus users add`,
never in the event log) and the users read model (`users`, projected from lab.users)."""

from __future__ import annotations

import asyncpg

_CREDENTIALS = "SELECT user_id, email, password_hash FROM auth.credentials WHERE email = $1"
_ADD = """
INSERT INTO auth.credentials (user_id, email, password_hash) VALUES ($1, $2, $3)
ON CONFLICT DO NOTHING
"""
_SET_HASH = """
UPDATE auth.credentials SET password_hash = $2, updated_at = now() WHERE user_id = $1
"""
_USER_COLUMNS = """user_id, email, roles, disabled, disabled_reason, quota_granted_wells,
                   registered_at, updated_at"""


async def credentials(db: asyncpg.Pool | asyncpg.Connection, email: str) -> asyncpg.Record | None:
    return await db.fetchrow(_CREDENTIALS, email)


async def add_credentials(db, user_id: str, email: str, password_hash: str) -> bool:
    """False when the user id or the email has credentials already (nothing changed)."""
    return await db.execute(_ADD, user_id, email, password_hash) == "INSERT 0 1"


async def set_hash(db, user_id: str, password_hash: str) -> None:
    await db.execute(_SET_HASH, user_id, password_hash)


async def user(db, user_id: str) -> asyncpg.Record | None:
    return await db.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE user_id = $1", user_id)


async def users(db) -> list[asyncpg.Record]:
    return await db.fetch(f"SELECT {_USER_COLUMNS} FROM users ORDER BY email, user_id")
