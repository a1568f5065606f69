"""A MongoDB-compatible server: SecantusDB (pure-Python, WiredTiger storage, pymongo wire protocol).

It advertises itself as a single-node replica set, so pymongo allows multi-document transactions.
What labbus relies on is checked by ``python -m labbus.deploy.local.verify_mongo``.
"""

from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path
from urllib.parse import urlsplit

from labbus.deploy.local import proc
from labbus.deploy.local.proc import Echo, ServiceError
from labbus.events.config import Config

NAME = "mongo"
SETTING = "mongo_url"
STOP_SIGNAL = signal.SIGTERM
STOP_TIMEOUT = 30.0
START_TIMEOUT = 30.0
CACHE_SIZE = "256M"


def _dir(cfg: Config) -> Path:
    return cfg.home / "mongo"


def _data(cfg: Config) -> Path:
    return _dir(cfg) / "data"


def pid_file(cfg: Config) -> Path:
    """Written by us at start; removed by `down`."""
    return _dir(cfg) / "mongo.pid"


def log_path(cfg: Config) -> Path:
    return _dir(cfg) / "mongo.log"


def marker(cfg: Config) -> str:
    return str(_data(cfg))


def endpoint(cfg: Config) -> tuple[str, int]:
    u = urlsplit(cfg.mongo_url)
    return u.hostname or "127.0.0.1", u.port or 27017


def address(cfg: Config) -> str:
    return cfg.mongo_url


def running_pid(cfg: Config) -> int | None:
    return proc.read_pid(pid_file(cfg), marker(cfg))


def _server_command() -> list[str]:
    if importlib.util.find_spec("secantus") is None:
        raise ServiceError(NAME, f"SecantusDB is not installed for {sys.executable}: "
                                 "pip install secantusdb "
                                 "(or set LABBUS_MONGO_URL to a MongoDB you run)")
    script = Path(sys.executable).parent / "secantusd-py"
    return [str(script)] if script.exists() else [sys.executable, "-m", "secantus"]


def restart_reason(cfg: Config) -> str | None:
    """A running server is kept as it is."""
    return None


def prepare(cfg: Config, echo: Echo) -> None:
    _server_command()
    _data(cfg).mkdir(parents=True, exist_ok=True)
    config = _dir(cfg) / "secantusd.toml"
    if not config.exists():  # an explicit (empty) config file stops it reading ~/.secantus/ etc.
        config.write_text("# Settings come from the command line in deploy/local/mongo.py.\n")


def start(cfg: Config, echo: Echo) -> int:
    host, port = endpoint(cfg)
    argv = [*_server_command(), "--config", str(_dir(cfg) / "secantusd.toml"), "--host", host,
            "--port", str(port), "--storage-path", str(_data(cfg)), "--cache-size", CACHE_SIZE]
    echo(f"mongo: starting SecantusDB on {host}:{port} (log: {log_path(cfg)})")
    return proc.spawn(argv, log=log_path(cfg), pid_file=pid_file(cfg), cwd=_dir(cfg))


def problem(cfg: Config, timeout: float = 5.0) -> str | None:
    """None when `ping` answers, else why not."""
    import pymongo
    from pymongo.errors import PyMongoError

    if not cfg.mongo_url.startswith("mongodb+srv://"):
        netloc = urlsplit(cfg.mongo_url).netloc
        hosts = [proc.host_port(h, 27017) for h in netloc.rpartition("@")[2].split(",")]
        if not any(proc.port_open(h, p) for h, p in hosts):
            return "connection refused"
    ms = int(timeout * 1000)
    client = pymongo.MongoClient(cfg.mongo_url, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms)
    try:
        client.admin.command("ping")
        return None
    except PyMongoError as e:
        return f"{type(e).__name__}: {str(e).split(', Timeout:')[0]}"
    finally:
        client.close()


def provision(cfg: Config, echo: Echo) -> None:
    """Nothing to create: collections and indexes are created by labbus itself."""
