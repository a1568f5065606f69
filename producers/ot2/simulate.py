"""Simulation mode: run a protocol in-process on opentrons' Protocol Engine, streaming commands.

This is the ONLY module that touches opentrons internals. It wires things the same way
``opentrons analyze`` does (``create_simulating_orchestrator`` + ``ProtocolReader``) and adds
a Protocol Engine plugin that sees every ``SucceedCommandAction`` / ``FailCommandAction``
the moment the engine dispatches it, i.e. as each command completes, in order.

Private access (kept here on purpose, pinned to opentrons==9.0.0):
* ``RunOrchestrator._protocol_engine`` to call ``ProtocolEngine.add_plugin``;
* ``FailCommandAction`` does not carry the failed command, so the failed command is rebuilt
  from ``action.running_command`` + the error exactly like the engine's CommandStore does
  (tests compare the streamed copy against the engine's final command list).

``OT_API_CONFIG_DIR`` is pointed at ``$LABBUS_HOME/opentrons`` (default ``<repo>/.local/opentrons``)
before opentrons is imported, so simulation never reads or writes ``~/.opentrons``.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .commands import (
    Command,
    RunOutcome,
    dispensed_wells,
    find_labware_id,
    labware_ids,
    liquid_sources,
    normalize_command,
)

__all__ = ["RunOutcome", "simulate_run", "stream_simulation", "dispensed_wells",
           "find_labware_id", "labware_ids", "liquid_sources", "opentrons_config_dir"]


def opentrons_config_dir() -> Path:
    """Where opentrons keeps its config during simulation (created if missing)."""
    if "OT_API_CONFIG_DIR" in os.environ:
        path = Path(os.environ["OT_API_CONFIG_DIR"])
    else:
        home = os.environ.get("LABBUS_HOME") or str(Path(__file__).resolve().parents[2] / ".local")
        path = Path(home).expanduser() / "opentrons"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


if "opentrons" not in sys.modules:  # config dir is read once, at opentrons import time
    os.environ["OT_API_CONFIG_DIR"] = str(opentrons_config_dir())

from opentrons.protocol_engine import ErrorOccurrence  # noqa: E402
from opentrons.protocol_engine.actions import FailCommandAction, SucceedCommandAction  # noqa: E402
from opentrons.protocol_engine.commands import CommandStatus  # noqa: E402
from opentrons.protocol_engine.plugins import AbstractPlugin  # noqa: E402
from opentrons.protocol_reader import ProtocolReader  # noqa: E402
from opentrons.protocol_runner.create_simulating_orchestrator import (  # noqa: E402
    create_simulating_orchestrator,
)
from opentrons.protocol_runner.run_orchestrator import ParseMode  # noqa: E402
from opentrons_shared_data.errors.exceptions import EnumeratedError  # noqa: E402

OnCommand = Callable[[Command], "Awaitable[None] | None"]


class _CommandStreamPlugin(AbstractPlugin):
    """Forwards each completed command (as a plain dict) to ``sink``; runs on the engine loop."""

    def __init__(self, sink: Callable[[Command], None]) -> None:
        self._sink = sink

    def handle_action(self, action: object) -> None:
        if isinstance(action, SucceedCommandAction):
            self._sink(_to_dict(action.command))
        elif isinstance(action, FailCommandAction):
            # Mirror CommandStore._handle_fail_command_action / _update_to_failed.
            if isinstance(action.error, EnumeratedError):
                error = ErrorOccurrence.from_failed(
                    id=action.error_id, createdAt=action.failed_at, error=action.error)
            else:
                error = action.error.public
            failed = action.running_command.model_copy(update={
                "completedAt": action.failed_at,
                "status": CommandStatus.FAILED,
                "error": error,
                **({"notes": action.notes} if action.notes is not None else {}),
            })
            self._sink(_to_dict(failed))


def _to_dict(command: Any) -> Command:
    return normalize_command(command.model_dump(mode="json"))


async def simulate_run(
    protocol_text: str,
    on_command: OnCommand | None = None,
    *,
    keep_engine_commands: bool = False,
) -> RunOutcome:
    """Simulate ``protocol_text`` (an OT-2/Flex Python protocol) and report each command.

    ``on_command`` (sync or async) is called once per command, in completion order, while the
    run is in progress. A protocol that fails (engine error, bad Python, invalid file) gives
    ``status='failed'`` with the engine's error, never an exception; exceptions raised by
    ``on_command`` itself do propagate (after the engine has been shut down).
    ``keep_engine_commands`` also returns the engine's final command list (for checking).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Command | None] = asyncio.Queue()
    count = 0

    async def deliver() -> None:
        nonlocal count
        while (cmd := await queue.get()) is not None:
            count += 1
            if on_command is not None:
                res = on_command(cmd)
                if inspect.isawaitable(res):
                    await res

    consumer = asyncio.create_task(deliver())
    try:
        # call_soon_threadsafe: the plugin may be called off-loop; FIFO keeps completion order.
        outcome = await _run_engine(
            protocol_text, lambda c: loop.call_soon_threadsafe(queue.put_nowait, c))
    finally:
        loop.call_soon_threadsafe(queue.put_nowait, None)  # after every command queued above
        await asyncio.wait([consumer])
    consumer.result()  # re-raises on_command's exception, if any
    return RunOutcome(outcome.status, count, outcome.errors, outcome.liquids,
                      outcome.commands if keep_engine_commands else None)


async def stream_simulation(protocol_text: str) -> AsyncIterator[Command | RunOutcome]:
    """Async-iterator form: yields command dicts as they complete, then the RunOutcome last."""
    queue: asyncio.Queue[Command | RunOutcome | BaseException] = asyncio.Queue()

    async def run() -> None:
        try:
            await queue.put(await simulate_run(protocol_text, queue.put))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put(e)

    task = asyncio.create_task(run())
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, RunOutcome):
                return
    finally:
        if not task.done():
            task.cancel()


@dataclass(frozen=True)
class _EngineResult:
    status: str
    errors: list[dict[str, Any]]
    liquids: list[dict[str, Any]]
    commands: list[Command] = field(default_factory=list)


async def _run_engine(protocol_text: str, sink: Callable[[Command], None]) -> _EngineResult:
    with tempfile.TemporaryDirectory(prefix="labbus-ot2-") as tmp:
        path = Path(tmp) / "protocol.py"
        path.write_text(protocol_text, encoding="utf-8")
        try:
            source = await ProtocolReader().read_saved(files=[path], directory=None)
        except Exception as exc:  # ProtocolFilesInvalidError: not a loadable protocol
            return _EngineResult("failed", [_setup_error(exc)], [])
        orchestrator = await create_simulating_orchestrator(
            robot_type=source.robot_type, protocol_config=source.config)
        orchestrator._protocol_engine.add_plugin(_CommandStreamPlugin(sink))
        try:
            await orchestrator.load(protocol_source=source, parse_mode=ParseMode.NORMAL,
                                    run_time_param_values=None, run_time_param_paths=None)
        except Exception as exc:  # e.g. syntax errors, missing run(): found while parsing
            await orchestrator.finish(error=exc, drop_tips_after_run=False, set_run_status=False)
            return _EngineResult("failed", [_setup_error(exc)], [])
        result = await orchestrator.run(deck_configuration=[])
    summary = result.state_summary
    return _EngineResult(
        status=str(summary.status.value),
        errors=[e.model_dump(mode="json") for e in summary.errors],
        liquids=[liq.model_dump(mode="json") for liq in summary.liquids],
        commands=[_to_dict(c) for c in result.commands],
    )


def _setup_error(exc: Exception) -> dict[str, Any]:
    from datetime import UTC, datetime

    from opentrons_shared_data.errors.exceptions import PythonException

    err = exc if isinstance(exc, EnumeratedError) else PythonException(exc)
    occ = ErrorOccurrence.from_failed(id="setup-error", createdAt=datetime.now(UTC), error=err)
    return occ.model_dump(mode="json")
