"""PostgreSQL from the Debian packages, one cluster under ``<home>/postgres``, plus labbus' roles.

As root the server runs as the ``postgres`` system user (PostgreSQL refuses to run as root);
otherwise as the current user. Administration goes through the unix socket in
``<home>/postgres/run`` (trust auth; the directory is mode 0700) as the ``postgres`` superuser;
TCP on 127.0.0.1 requires scram-sha-256 passwords.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pwd
import secrets
import shlex
import shutil
import signal
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from labbus.deploy.local import proc
from labbus.deploy.local.proc import Echo, ServiceError
from labbus.events.config import Config

NAME = "postgres"
SETTING = "postgres_dsn"
STOP_SIGNAL = signal.SIGINT  # "fast" shutdown: clean, but doesn't wait for clients to disconnect
STOP_TIMEOUT = 60.0
START_TIMEOUT = 60.0
SUPERUSER = "postgres"
SERVER_OPTIONS = ["-c", "shared_buffers=128MB", "-c", "fsync=on", "-c", "max_connections=100"]
INSTALL_HINT = "apt-get install postgresql"


@dataclass(frozen=True)
class Dsn:
    host: str
    port: int
    user: str
    password: str | None
    database: str


def parse(dsn: str) -> Dsn:
    u = urlsplit(dsn)
    user = unquote(u.username or "")
    return Dsn(host=u.hostname or "127.0.0.1", port=u.port or 5432, user=user,
               password=None if u.password is None else unquote(u.password),
               database=unquote(u.path.lstrip("/")) or user)


def with_database(dsn: str, database: str) -> str:
    """``dsn`` pointing at another database."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + quote(database)))


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"  # standard_conforming_strings is on (the default)


# --- paths ---------------------------------------------------------------------

def _dir(cfg: Config) -> Path:
    return server_dir(cfg.home)


@functools.lru_cache
def server_dir(home: Path) -> Path:
    """``<home>/postgres``, unless the ``postgres`` OS user could not reach it (a checkout under
    /root, say) or its socket path would be too long; then a directory of its own in /var/tmp."""
    preferred = home / "postgres"
    socket_ok = len(str(preferred / "run" / ".s.PGSQL.65535")) <= 100
    if os.geteuid() != 0 or (socket_ok and _searchable_by_others(home)):
        return preferred
    digest = hashlib.sha1(str(home).encode()).hexdigest()[:10]
    return Path("/var/tmp") / f"labbus-postgres-{digest}"


def _searchable_by_others(path: Path) -> bool:
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def _data(cfg: Config) -> Path:
    return _dir(cfg) / "data"


def _socket_dir(cfg: Config) -> Path:
    return _dir(cfg) / "run"


def log_path(cfg: Config) -> Path:
    return _dir(cfg) / "postgres.log"


def pid_file(cfg: Config) -> None:
    """None: PostgreSQL writes and removes its own postmaster.pid."""
    return None


def marker(cfg: Config) -> str:
    return str(_data(cfg))


def endpoint(cfg: Config) -> tuple[str, int]:
    dsn = parse(cfg.postgres_dsn)
    return dsn.host, dsn.port


def address(cfg: Config) -> str:
    return cfg.postgres_dsn


def running_pid(cfg: Config) -> int | None:
    return proc.read_pid(_data(cfg) / "postmaster.pid", marker(cfg))


# --- binaries and the OS user -------------------------------------------------------

def _bin_dir(cfg: Config) -> Path | None:
    """The binaries matching an existing cluster's version, else the highest installed."""
    want = None
    try:
        want = (_data(cfg) / "PG_VERSION").read_text().strip()
    except OSError:
        pass
    candidates = {p.parent.name: p for p in Path("/usr/lib/postgresql").glob("*/bin")
                  if (p / "pg_ctl").exists()}
    if want is not None:
        if want in candidates:
            return candidates[want]
        raise ServiceError(NAME, f"{_data(cfg)} was created by PostgreSQL {want}, "
                                 f"which is not installed "
                                 f"(found: {', '.join(sorted(candidates)) or 'none'}): "
                                 f"apt-get install postgresql-{want}, "
                                 f"or remove {_data(cfg)} to start empty")
    if candidates:
        return candidates[max(candidates, key=lambda v: int(v) if v.isdigit() else -1)]
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found else None


def _install(echo: Echo) -> None:
    if os.geteuid() != 0:
        raise ServiceError(NAME, f"PostgreSQL server binaries not found "
                                 f"(/usr/lib/postgresql/*/bin): "
                                 f"sudo {INSTALL_HINT}, "
                                 f"or set LABBUS_POSTGRES_DSN to a server you run")
    echo("postgres: installing the postgresql package with apt-get (first run only)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    hint = f"run `{INSTALL_HINT}` yourself, or set LABBUS_POSTGRES_DSN to a server you run"
    proc.run(NAME, ["apt-get", "update"], hint=hint, timeout=600, env=env)
    proc.run(NAME, ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"],
             hint=hint, timeout=1800, env=env)


def _as_owner() -> list[str]:
    """Command prefix running a program as the server's OS user."""
    return ["runuser", "-u", SUPERUSER, "--"] if os.geteuid() == 0 else []


def _chown(*paths: Path) -> None:
    if os.geteuid() != 0:
        return
    try:
        owner = pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise ServiceError(NAME, f"no `{SUPERUSER}` system user to run the server as "
                                 f"(PostgreSQL refuses to run as root): "
                                 f"{INSTALL_HINT} creates it") from None
    for path in paths:
        os.chown(path, owner.pw_uid, owner.pw_gid)


# --- lifecycle -------------------------------------------------------------------

def restart_reason(cfg: Config) -> str | None:
    """A running server is kept as it is."""
    return None


def prepare(cfg: Config, echo: Echo) -> None:
    if _bin_dir(cfg) is None:
        _install(echo)
    bindir = _bin_dir(cfg)
    if bindir is None:
        raise ServiceError(NAME, f"PostgreSQL binaries still not found after installing: "
                                 f"{INSTALL_HINT}")
    base, run = _dir(cfg), _socket_dir(cfg)
    socket_path = run / f".s.PGSQL.{endpoint(cfg)[1]}"
    if len(str(socket_path)) > 100:
        raise ServiceError(NAME, f"the socket path {socket_path} is too long for a unix socket: "
                                 "set LABBUS_HOME to a shorter directory")
    for d in (base, run):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)
    _chown(base, run)
    if os.geteuid() == 0:
        proc.run(NAME, [*_as_owner(), "test", "-w", str(base)],
                 hint=f"the `{SUPERUSER}` user cannot write {base}: make its parent directories "
                      "searchable (chmod o+x) or set LABBUS_HOME elsewhere")
    if not (_data(cfg) / "PG_VERSION").exists():
        pwfile = base / "superuser.password"
        if not pwfile.exists():
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24) + "\n")
        _chown(pwfile)
        echo(f"postgres: initdb {_data(cfg)}")
        proc.run(NAME, [*_as_owner(), str(bindir / "initdb"), "-D", str(_data(cfg)),
                        "-U", SUPERUSER, f"--pwfile={pwfile}",
                        "--auth-local=trust", "--auth-host=scram-sha-256",
                        "-E", "UTF8", "--locale=C"],
                 hint=f"fix the problem above, or remove {_data(cfg)} and retry")
    log = log_path(cfg)
    log.touch()
    _chown(log)


def start(cfg: Config, echo: Echo) -> int | None:
    host, port = endpoint(cfg)
    options = ["-p", str(port), "-k", str(_socket_dir(cfg)), "-c", f"listen_addresses={host}",
               *SERVER_OPTIONS]
    echo(f"postgres: starting on {host}:{port} (log: {log_path(cfg)})")
    proc.run(NAME, [*_as_owner(), str(_bin_dir(cfg) / "pg_ctl"), "-D", str(_data(cfg)),
                    "-l", str(log_path(cfg)), "-o", shlex.join(options),
                    "-w", "-t", str(int(START_TIMEOUT)), "start"],
             hint=f"see {log_path(cfg)}", timeout=START_TIMEOUT + 10)
    return running_pid(cfg)


# --- connections -------------------------------------------------------------------

async def _connect_admin(cfg: Config, database: str, timeout: float = 10.0):
    """The superuser over the socket when we run the server, else the writer role over TCP."""
    import asyncpg

    if cfg.explicitly_set(SETTING):
        return await asyncpg.connect(with_database(cfg.postgres_dsn, database), timeout=timeout)
    return await asyncpg.connect(host=str(_socket_dir(cfg)), port=endpoint(cfg)[1], user=SUPERUSER,
                                 database=database, timeout=timeout)


async def _ping(cfg: Config, timeout: float) -> None:
    conn = await _connect_admin(cfg, parse(cfg.postgres_dsn).database if cfg.explicitly_set(SETTING)
                                else SUPERUSER, timeout)
    try:
        await conn.fetchval("SELECT 1", timeout=timeout)
    finally:
        await conn.close()


def problem(cfg: Config, timeout: float = 5.0) -> str | None:
    """None when `SELECT 1` works (as the superuser locally, else as the writer), else why not."""
    try:
        proc.run_async(lambda: _ping(cfg, timeout))
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


# --- roles, databases, grants ------------------------------------------------------------

async def _ensure_role(conn, user: str, password: str | None) -> None:
    exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", user)
    secret = "" if password is None else f" PASSWORD {_literal(password)}"
    await conn.execute(f"{'ALTER' if exists else 'CREATE'} ROLE {_ident(user)} LOGIN{secret}")


async def _grant(conn, database: str, writer: str, reader: str | None) -> None:
    """Inside ``database``: writer owns and creates; reader may connect and SELECT, nothing else."""
    db, w = _ident(database), _ident(writer)
    statements = [f"REVOKE ALL ON DATABASE {db} FROM PUBLIC",  # no TEMP tables for the reader
                  "REVOKE CREATE ON SCHEMA public FROM PUBLIC",  # PostgreSQL < 15 grants it
                  f"GRANT USAGE, CREATE ON SCHEMA public TO {w}"]
    if reader is not None and reader != writer:
        r = _ident(reader)
        statements += [f"GRANT CONNECT ON DATABASE {db} TO {r}",
                       f"GRANT USAGE ON SCHEMA public TO {r}",
                       f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {r}",
                       f"ALTER DEFAULT PRIVILEGES FOR ROLE {w} IN SCHEMA public "
                       f"GRANT SELECT ON TABLES TO {r}"]
    await conn.execute(";\n".join(statements))


async def _provision(cfg: Config, database: str) -> None:
    managed = not cfg.explicitly_set(SETTING)
    await provision_roles(
        lambda db: _connect_admin(cfg, db), cfg.postgres_dsn, cfg.postgres_api_dsn, database,
        admin_database=SUPERUSER if managed else parse(cfg.postgres_dsn).database,
        create_roles=managed)


async def provision_roles(connect_admin, writer_dsn: str, reader_dsn: str, database: str,
                          admin_database: str, create_roles: bool = True) -> None:
    """Roles from both DSNs (when `create_roles`), `database` owned by the writer, and the
    reader's SELECT-only grants; `connect_admin(dbname)` opens a connection allowed to do that.
    Also used by the test fixtures for a PostgreSQL started with testcontainers."""
    writer, reader = parse(writer_dsn), parse(reader_dsn)
    conn = await connect_admin(admin_database)
    try:
        if create_roles:
            await _ensure_role(conn, writer.user, writer.password)
            if reader.user != writer.user:
                await _ensure_role(conn, reader.user, reader.password)
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
            owner = f" OWNER {_ident(writer.user)}" if create_roles else ""
            await conn.execute(f"CREATE DATABASE {_ident(database)}{owner}")
        elif create_roles:
            await conn.execute(f"ALTER DATABASE {_ident(database)} OWNER TO {_ident(writer.user)}")
    finally:
        await conn.close()
    conn = await connect_admin(database)
    try:
        await _grant(conn, database, writer.user, reader.user)
    finally:
        await conn.close()


def _sql(what: str, make) -> None:
    import asyncpg

    try:
        proc.run_async(make)
    except (asyncpg.PostgresError, OSError) as e:
        raise ServiceError(NAME, f"{what} failed: {e}. "
                                 "With your own server (LABBUS_POSTGRES_DSN) the "
                                 "writer role needs CREATEDB and must own its database") from None


def provision(cfg: Config, echo: Echo) -> None:
    """Roles from both DSNs, the writer's database, and the reader's SELECT-only grants."""
    if cfg.explicitly_set(SETTING):
        return  # their server, their roles
    _sql("creating roles and database", lambda: _provision(cfg, parse(cfg.postgres_dsn).database))


def create_database(cfg: Config, name: str) -> str:
    """Create (if missing) database ``name`` owned by the writer with the reader grants.

    Returns its writer DSN.
    """
    _sql(f"creating database {name}", lambda: _provision(cfg, name))
    return with_database(cfg.postgres_dsn, name)


def drop_database(cfg: Config, name: str) -> None:
    """Drop database ``name`` (disconnecting its sessions)."""
    async def drop() -> None:
        admin_db = (SUPERUSER if not cfg.explicitly_set(SETTING)
                    else parse(cfg.postgres_dsn).database)
        conn = await _connect_admin(cfg, admin_db)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)")
        finally:
            await conn.close()
    _sql(f"dropping database {name}", drop)
