"""Plain versioned SQL migrations, applied in order at startup under an advisory lock."""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg

MIGRATIONS = Path(__file__).parent / "migrations" / "postgres"
_LOCK_KEY = 0x6C616262  # "labb"
log = logging.getLogger(__name__)


async def migrate(con: asyncpg.Connection, folder: Path = MIGRATIONS) -> list[str]:
    """Apply every migration not yet applied; returns the versions applied now."""
    applied_now = []
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await con.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                               version text PRIMARY KEY,
                               applied_at timestamptz NOT NULL DEFAULT now())""")
        done = {r["version"] for r in await con.fetch("SELECT version FROM schema_migrations")}
        for path in sorted(folder.glob("*.sql")):
            if path.stem in done:
                continue
            await con.execute(path.read_text())
            await con.execute("INSERT INTO schema_migrations (version) VALUES ($1)", path.stem)
            applied_now.append(path.stem)
    if applied_now:
        log.info("applied migrations", extra={"versions": applied_now})
    return applied_now
