"""Tiny process helper shared by the local services: pid files, port waits, detached starts.

Nothing here knows about Kafka, PostgreSQL or Mongo; the per-service modules use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Echo = Callable[[str], None]

_HAVE_PROC = Path("/proc/self/stat").exists()
_children: dict[int, subprocess.Popen] = {}  # our detached children, so they can be reaped


class ServiceError(RuntimeError):
    """A local service could not be installed, started or reached.

    ``piece`` is "kafka", "postgres" or "mongo"; the message says what to do about it.
    """

    def __init__(self, piece: str, message: str):
        self.piece = piece
        self.message = message
        super().__init__(f"{piece}: {message}")


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    address: str
    pid: int | None
    detail: str


def host_port(address: str, default_port: int) -> tuple[str, int]:
    """The first host:port of "host:port[,host:port]" (IPv6 may be bracketed)."""
    first = address.split(",")[0].strip()
    host, sep, port = first.rpartition(":")
    if not sep or "]" in port:
        host, port = first, str(default_port)
    return host.strip("[]"), int(port)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --- pids -----------------------------------------------------------------

def pid_alive(pid: int, marker: str | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when given, its command line contains ``marker``.

    The marker guards against a stale pid file whose number was reused by another process.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, belongs to another user
    child = _children.get(pid)
    if child is not None:
        # our own child: its pid cannot have been reused while we have not reaped it, so no
        # marker check (a JVM's /proc/<pid>/cmdline may read empty while it starts under load)
        return child.poll() is None
    else:
        with contextlib.suppress(ChildProcessError, OSError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return False
    if not _HAVE_PROC:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        if state in ("Z", "X"):
            return False
        if marker is not None:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            return marker.encode() in cmdline
    except FileNotFoundError:
        return False
    except OSError:
        pass
    return True


def read_pid(pid_file: Path, marker: str | None = None) -> int | None:
    """The live pid recorded in ``pid_file`` (first token), or None."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid_alive(pid, marker) else None


def spawn(argv: list[str], *, log: Path, pid_file: Path | None = None,
          cwd: Path | None = None, env: dict[str, str] | None = None) -> int:
    """Start ``argv`` detached (own session, stdin closed, output appended to ``log``)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        stamp = time.strftime('%Y-%m-%d %H:%M:%S')
        out.write(f"\n--- {stamp} starting: {shlex.join(argv)}\n".encode())
        out.flush()
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                 start_new_session=True, close_fds=True)
    _children[child.pid] = child
    if pid_file is not None:
        pid_file.write_text(f"{child.pid}\n")
    return child.pid


def wait_gone(pid: int, timeout: float, marker: str | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid, marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def stop(pid: int, *, sig: int = signal.SIGTERM, timeout: float = 30.0,
         marker: str | None = None, pid_file: Path | None = None) -> str:
    """Send ``sig``, wait up to ``timeout`` s, then SIGKILL. Returns "stopped" or "killed"."""
    outcome = "stopped"
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
        if not wait_gone(pid, timeout, marker):
            outcome = "killed"
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 10.0, marker)
    if pid_file is not None and not pid_alive(pid, marker):
        pid_file.unlink(missing_ok=True)
    return outcome


def wait_until(piece: str, what: str, problem: Callable[[], str | None], timeout: float, *,
               pid: int | None = None, marker: str | None = None, log: Path | None = None) -> float:
    """Poll ``problem`` until it returns None; fail early if ``pid`` dies.

    Returns the seconds waited.
    """
    start = time.monotonic()
    while (why := problem()) is not None:
        if pid is not None and not pid_alive(pid, marker):
            raise ServiceError(piece, f"the process exited while starting{_log_hint(log)}")
        if time.monotonic() - start > timeout:
            raise ServiceError(piece, f"{what} did not answer within {timeout:.0f} s "
                                      f"({why}){_log_hint(log)}")
        time.sleep(0.25)
    return time.monotonic() - start


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _log_hint(log: Path | None) -> str:
    if log is None:
        return ""
    tail = log_tail(log)
    return f"; see {log}" + (f". Last lines:\n{tail}" if tail else "")


def run(piece: str, argv: list[str], *, hint: str, timeout: float = 120.0,
        **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a command to completion; failures become ServiceError(piece, output tail + hint)."""
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, **kwargs)
    except FileNotFoundError:
        raise ServiceError(piece, f"{argv[0]} not found: {hint}") from None
    except subprocess.TimeoutExpired:
        raise ServiceError(piece, f"`{shlex.join(argv)}` took longer than {timeout:.0f} s: "
                                  f"{hint}") from None
    except subprocess.CalledProcessError as e:
        out = "\n".join(((e.stdout or "") + (e.stderr or "")).strip().splitlines()[-15:])
        raise ServiceError(piece, f"`{shlex.join(argv)}` failed (exit {e.returncode}):\n"
                                  f"{out}\n{hint}") from None


def run_async(make: Callable[[], Awaitable[Any]]) -> Any:
    """Run a coroutine from sync code, also when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(make())
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (so two `up`s at once don't both start a service)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
