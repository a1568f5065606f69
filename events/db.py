"""Database connections shared by the writers (projectors) and the readers (query API)."""

from __future__ import annotations

import asyncpg


async def connect_pool(dsn: str, variable: str, **kwargs) -> asyncpg.Pool:
    """A PostgreSQL pool; a refusal names the environment variable that holds the DSN."""
    try:
        return await asyncpg.create_pool(dsn, min_size=1, max_size=4, **kwargs)
    except (OSError, asyncpg.PostgresError) as exc:
        safe = dsn.split("@")[-1]
        raise ConnectionError(f"PostgreSQL at {variable}=...@{safe} refused: {exc}") from exc
