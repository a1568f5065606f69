"""Start, stop and inspect the local services labbus needs: Kafka, PostgreSQL and a Mongo server.

    from labbus.events import config
    from labbus.deploy.local import services
    addresses = services.up(config.load())   # idempotent; fast when everything already runs
    services.status(config.load())
    services.down(config.load())             # data is kept under LABBUS_HOME

A service whose setting was given explicitly (LABBUS_KAFKA_BOOTSTRAP, LABBUS_POSTGRES_DSN,
LABBUS_MONGO_URL) is the user's own: it is never started or stopped here, `up` only checks it
answers.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import ModuleType
from urllib.parse import urlsplit, urlunsplit

from labbus.deploy.local import kafka, mongo, postgres, proc
from labbus.deploy.local.postgres import create_database, drop_database, with_database
from labbus.deploy.local.proc import Echo, ServiceError, ServiceStatus
from labbus.events.config import SETTINGS, Config

__all__ = ["up", "down", "status", "ServiceError", "ServiceStatus",
           "create_database", "drop_database", "with_database", "SERVICES"]

# Each module provides: NAME, SETTING, START_TIMEOUT, STOP_SIGNAL, STOP_TIMEOUT, address(cfg),
# endpoint(cfg), running_pid(cfg), pid_file(cfg), marker(cfg), log_path(cfg), prepare(cfg, echo),
# start(cfg, echo), problem(cfg, timeout) (None when it answers), provision(cfg, echo),
# restart_reason(cfg) (None, or why `up` must restart the running server: e.g. a Kafka broker an
# older labbus started without SASL_SSL).
SERVICES: tuple[ModuleType, ...] = (kafka, postgres, mongo)


def _selected(only: Iterable[str] | None) -> list[ModuleType]:
    if only is None:
        return list(SERVICES)
    names = set(only)
    unknown = names - {s.NAME for s in SERVICES}
    if unknown:
        raise ValueError(f"unknown service(s) {sorted(unknown)}; "
                         f"known: {[s.NAME for s in SERVICES]}")
    return [s for s in SERVICES if s.NAME in names]


def _external(cfg: Config, svc: ModuleType) -> bool:
    return cfg.explicitly_set(svc.SETTING)


def _env(svc: ModuleType) -> str:
    return SETTINGS[svc.SETTING].env


def masked(address: str) -> str:
    """``address`` with any password replaced by ***."""
    u = urlsplit(address)
    if not u.scheme or u.password is None:
        return address
    return urlunsplit(u._replace(netloc=u.netloc.replace(":" + u.password + "@", ":***@", 1)))


def up(cfg: Config, echo: Echo = print, only: Iterable[str] | None = None,
       restart: bool = True) -> dict[str, str]:
    """Install what's missing, start what isn't running, wait until everything answers.

    A running server that must be restarted (`restart_reason`, e.g. a Kafka broker an older
    labbus started without SASL_SSL) is restarted, or, with restart=False (the tests, which
    must not stop a server other sessions use), left running and said so.

    Returns {"kafka": bootstrap, "postgres": writer DSN, "mongo": URL}. Raises ServiceError.
    """
    chosen = _selected(only)
    with proc.locked(cfg.home / "services.lock"):
        started: dict[str, tuple[int | None, float]] = {}
        for svc in chosen:  # first launch everything, so the slow starts overlap
            if _external(cfg, svc):
                continue
            pid = svc.running_pid(cfg)
            if pid is not None:
                why = svc.restart_reason(cfg)
                if why is None:
                    continue
                if not restart:
                    echo(f"{svc.NAME}: left running (pid {pid}), though {why}; "
                         "`labbus services up` restarts it")
                    continue
                echo(f"{svc.NAME}: restarting pid {pid}: {why}")
                proc.stop(pid, sig=svc.STOP_SIGNAL, timeout=svc.STOP_TIMEOUT,
                          marker=svc.marker(cfg), pid_file=svc.pid_file(cfg))
            host, port = svc.endpoint(cfg)
            if proc.port_open(host, port):
                raise ServiceError(svc.NAME,
                                   f"{host}:{port} is already in use by a process labbus did not "
                                   f"start (no live pid under {cfg.home}); stop that process, or "
                                   f"set {_env(svc)} to use it as your own server")
            svc.prepare(cfg, echo)
            t0 = time.monotonic()
            started[svc.NAME] = (svc.start(cfg, echo), t0)
        for svc in chosen:
            if _external(cfg, svc):
                why = svc.problem(cfg, 10.0)
                if why is not None:
                    raise ServiceError(svc.NAME,
                                       f"{masked(svc.address(cfg))} (from {_env(svc)}) does not "
                                       f"answer ({why}): start that server or fix {_env(svc)}, or "
                                       f"unset {_env(svc)} to run a local one")
                continue
            pid, t0 = started.get(svc.NAME, (svc.running_pid(cfg), None))
            proc.wait_until(svc.NAME, masked(svc.address(cfg)),
                            lambda svc=svc: svc.problem(cfg, 5.0), svc.START_TIMEOUT,
                            pid=pid, marker=svc.marker(cfg), log=svc.log_path(cfg))
            svc.provision(cfg, echo)
            if t0 is not None:
                echo(f"{svc.NAME}: ready at {masked(svc.address(cfg))} "
                     f"(pid {svc.running_pid(cfg)}, {time.monotonic() - t0:.1f} s)")
        return {svc.NAME: svc.address(cfg) for svc in chosen}


def down(cfg: Config, echo: Echo = print, only: Iterable[str] | None = None) -> None:
    """Stop the services started here (signal, wait, then SIGKILL). Data is kept."""
    with proc.locked(cfg.home / "services.lock"):
        for svc in reversed(_selected(only)):
            if _external(cfg, svc):
                echo(f"{svc.NAME}: not managed here ({_env(svc)} is set); left alone")
                continue
            pid = svc.running_pid(cfg)
            if pid is None:
                echo(f"{svc.NAME}: not running")
                continue
            t0 = time.monotonic()
            outcome = proc.stop(pid, sig=svc.STOP_SIGNAL, timeout=svc.STOP_TIMEOUT,
                                marker=svc.marker(cfg), pid_file=svc.pid_file(cfg))
            echo(f"{svc.NAME}: {outcome} (pid {pid}, {time.monotonic() - t0:.1f} s)")


def status(cfg: Config) -> list[ServiceStatus]:
    result = []
    for svc in SERVICES:
        address = masked(svc.address(cfg))
        if _external(cfg, svc):
            why = svc.problem(cfg, 3.0)
            result.append(ServiceStatus(svc.NAME, why is None, address, None,
                                        f"external ({_env(svc)}); "
                                        + ("answers" if why is None else why)))
            continue
        pid = svc.running_pid(cfg)
        if pid is not None:
            detail = f"local, log {svc.log_path(cfg)}"
        elif proc.port_open(*svc.endpoint(cfg)):
            detail = "stopped, but its port is taken by a process labbus did not start"
        else:
            detail = "stopped"
        result.append(ServiceStatus(svc.NAME, pid is not None, address, pid, detail))
    return result
