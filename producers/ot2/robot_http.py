"""Robot mode: run a protocol on a real OT-2 through its HTTP API (port 31950), streaming commands.

Flow: ``POST /protocols`` (multipart upload) -> ``POST /runs`` {"data": {"protocolId"}} ->
``POST /runs/{id}/actions`` {"data": {"actionType": "play"}} -> poll ``GET /runs/{id}`` and
``GET /runs/{id}/commands?cursor=&pageLength=`` until the run is succeeded/failed/stopped.

Each command is emitted exactly once, in run order, only once it is succeeded or failed: a
cursor tracks the index of the next command to emit, and a page is consumed up to its first
command that is still queued/running. The list endpoint serves *summaries* (no ``result``),
so by default each finished command is fetched in full from ``GET /runs/{id}/commands/{cid}``;
the dicts then have the same shape as simulation mode (``commands.normalize_command``).

The run status is read *before* each drain of the command list, so once a terminal status
has been seen, the drain that follows is guaranteed to see the final command list.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from .commands import (
    TERMINAL_COMMAND_STATUSES,
    TERMINAL_RUN_STATUSES,
    Command,
    RunOutcome,
    normalize_command,
)

ROBOT_PORT = 31950
OnCommand = Callable[[Command], "Awaitable[None] | None"]


class RobotHTTPError(RuntimeError):
    """The robot answered with an HTTP error; ``errors`` is its JSON:API error list."""

    def __init__(self, method: str, url: str, status_code: int, body: Any) -> None:
        self.status_code = status_code
        self.errors = body.get("errors", []) if isinstance(body, dict) else []
        detail = ("; ".join(str(e.get("detail") or e.get("title")) for e in self.errors)
                  or str(body)[:500])
        super().__init__(f"{method} {url} -> HTTP {status_code}: {detail}")


class RobotRunTimeout(TimeoutError):
    """The run did not reach a terminal status within ``max_wait_s``."""


@dataclass(frozen=True)
class RobotRun:
    """Identifiers of what was created on the robot, plus how the run ended."""

    protocol_id: str
    run_id: str
    outcome: RunOutcome


class OT2Client:
    """Minimal async client for the OT-2 robot-server HTTP API.

    ``transport`` is passed to ``httpx.AsyncClient`` (tests give an ``httpx.MockTransport``
    serving recorded robot responses). ``sleep`` is the poll-delay function.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_version: str = "*",
        poll_interval_s: float = 0.5,
        page_length: int = 50,
        fetch_full_commands: bool = True,
        timeout_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        if "://" not in base_url:
            base_url = f"http://{base_url}"
        if base_url.count(":") < 2:  # no port given
            base_url = f"{base_url.rstrip('/')}:{ROBOT_PORT}"
        self.poll_interval_s = poll_interval_s
        self.page_length = page_length
        self.fetch_full_commands = fetch_full_commands
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers={"Opentrons-Version": api_version},
            timeout=timeout_s,
            transport=transport,
        )

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    async def __aenter__(self) -> OT2Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, url: str, **kw: Any) -> dict[str, Any]:
        resp = await self._http.request(method, url, **kw)
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        if resp.status_code >= 400:
            raise RobotHTTPError(method, url, resp.status_code, body)
        return body

    # -- individual endpoints -------------------------------------------------------------

    async def upload_protocol(self, protocol_text: str,
                              filename: str = "protocol.py") -> dict[str, Any]:
        """``POST /protocols``; returns the protocol resource (``data``). 200 = already on robot."""
        files = [("files", (filename, protocol_text.encode("utf-8"), "text/x-python"))]
        return (await self._request("POST", "/protocols", files=files))["data"]

    async def create_run(self, protocol_id: str) -> dict[str, Any]:
        """``POST /runs`` for a protocol; returns the run resource (status ``idle``)."""
        body = {"data": {"protocolId": protocol_id}}
        return (await self._request("POST", "/runs", json=body))["data"]

    async def run_action(self, run_id: str, action_type: str = "play") -> dict[str, Any]:
        """``POST /runs/{id}/actions`` (play, pause, stop, resume-from-recovery, ...)."""
        body = {"data": {"actionType": action_type}}
        return (await self._request("POST", f"/runs/{run_id}/actions", json=body))["data"]

    async def get_run(self, run_id: str) -> dict[str, Any]:
        return (await self._request("GET", f"/runs/{run_id}"))["data"]

    async def get_commands_page(self, run_id: str, cursor: int, page_length: int) -> dict[str, Any]:
        """The whole envelope: ``data`` (summaries), ``meta`` {cursor, totalLength}, ``links``."""
        params = {"cursor": cursor, "pageLength": page_length}
        return await self._request("GET", f"/runs/{run_id}/commands", params=params)

    async def get_command(self, run_id: str, command_id: str) -> dict[str, Any]:
        return (await self._request("GET", f"/runs/{run_id}/commands/{command_id}"))["data"]

    # -- streaming ------------------------------------------------------------------------

    async def follow_run(
        self, run_id: str, on_command: OnCommand | None = None, *, max_wait_s: float | None = None
    ) -> RunOutcome:
        """Poll until the run is terminal, calling ``on_command`` once per finished command."""
        loop = asyncio.get_running_loop()
        deadline = None if max_wait_s is None else loop.time() + max_wait_s
        cursor = 0
        while True:
            run = await self.get_run(run_id)
            terminal = run["status"] in TERMINAL_RUN_STATUSES
            cursor = await self._drain(run_id, cursor, on_command)
            if terminal:
                return RunOutcome(
                    status=run["status"],
                    commands=cursor,
                    errors=list(run.get("errors") or []),
                    liquids=list(run.get("liquids") or []),
                )
            if deadline is not None and loop.time() >= deadline:
                raise RobotRunTimeout(f"run {run_id} still {run['status']!r} after {max_wait_s} s")
            await self._sleep(self.poll_interval_s)

    async def _drain(self, run_id: str, cursor: int, on_command: OnCommand | None) -> int:
        """Emit every finished command from ``cursor`` on, stopping at the first unfinished one."""
        while True:
            page = await self.get_commands_page(run_id, cursor, self.page_length)
            start = int(page["meta"]["cursor"])
            total = int(page["meta"]["totalLength"])
            progressed = False
            for index, summary in enumerate(page["data"], start=start):
                if index < cursor:  # robot chose an earlier cursor than asked for
                    continue
                if index > cursor:  # a gap: never skip a command
                    break
                if summary["status"] not in TERMINAL_COMMAND_STATUSES:
                    return cursor  # still queued/running: emit it on a later poll
                full = (await self.get_command(run_id, summary["id"])
                        if self.fetch_full_commands else summary)
                await _call(on_command, normalize_command(full))
                cursor += 1
                progressed = True
            if cursor >= total or not progressed:
                return cursor

    async def run_protocol(
        self,
        protocol_text: str,
        on_command: OnCommand | None = None,
        *,
        filename: str = "protocol.py",
        max_wait_s: float | None = None,
    ) -> RobotRun:
        """Upload, create a run, play it and follow it to the end."""
        protocol = await self.upload_protocol(protocol_text, filename)
        run = await self.create_run(protocol["id"])
        await self.run_action(run["id"], "play")
        outcome = await self.follow_run(run["id"], on_command, max_wait_s=max_wait_s)
        return RobotRun(protocol_id=protocol["id"], run_id=run["id"], outcome=outcome)


async def _call(on_command: OnCommand | None, command: Mapping[str, Any]) -> None:
    if on_command is not None:
        res = on_command(dict(command))
        if inspect.isawaitable(res):
            await res
