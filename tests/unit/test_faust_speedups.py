"""labbus's faust transport: registered under labbus://, and its hand-off of a half-run delivery."""

import asyncio
from types import FunctionType

import pytest
from faust.transport import by_url

from labbus.processors import faust_speedups
from labbus.processors.faust_speedups import _Resumed


def test_labbus_scheme_is_our_transport():
    transport = by_url("labbus://127.0.0.1:19092")
    assert transport is faust_speedups.Transport
    assert transport.Consumer is faust_speedups.Consumer


def _first_step(coro):
    try:
        return coro.send(None)
    except StopIteration as done:
        pytest.fail(f"finished without waiting: {done.value!r}")


async def test_resumed_coroutine_gets_what_it_waited_for():
    gate = asyncio.get_running_loop().create_future()
    steps = []

    async def delivery():
        steps.append("started")
        got = await gate
        steps.append(got)
        await asyncio.sleep(0)
        return got * 2

    coro = delivery()
    waiting_on = _first_step(coro)
    assert waiting_on is gate and steps == ["started"]
    task = asyncio.ensure_future(_Resumed(coro, waiting_on))
    await asyncio.sleep(0)
    assert not task.done()
    gate.set_result(21)
    assert await task == 42
    assert steps == ["started", 21]


async def test_cancelling_the_race_cancels_the_delivery_inside():
    gate = asyncio.get_running_loop().create_future()
    cleaned = []

    async def delivery():
        try:
            await gate
        finally:
            cleaned.append(True)

    coro = delivery()
    task = asyncio.ensure_future(_Resumed(coro, _first_step(coro)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True]


async def test_raw_schema_hands_over_the_broker_bytes():
    import faust
    from faust.types import TP, Message

    from labbus.processors.faust_speedups import RawSchema

    app = faust.App("schema-test", broker="memory://")
    decode = RawSchema(key_type=bytes, value_type=bytes).compile(app)
    message = Message("t", 0, 7, 0.0, 0, [], b"dev-1", b"\xc3\x01abc", None, None,
                      tp=TP("t", 0))
    event = await decode(message)
    assert (event.key, event.value, event.message) == (b"dev-1", b"\xc3\x01abc", message)


def test_upstream_code_under_the_patches_is_the_tested_version():
    """faust-streaming is pinned to the tested minor version, and a patch release can still
    change private code: an upgrade that touches anything the patches copy or override fails
    here, naming the function (see UPSTREAM_SOURCES for what to do)."""
    changed = faust_speedups.changed_upstream()
    assert not changed, (
        "faust/mode changed under processors/faust_speedups.py: " + "; ".join(changed)
        + ". Port the change into the patch or drop the patch "
        "(tests/bench/bench_faust_patches.py), then record the new hashes "
        "(python -m labbus.processors.faust_speedups).")


def test_every_override_is_guarded():
    """Each method or property the patches override is in UPSTREAM_SOURCES, so a new override
    cannot be added without its upstream source being recorded."""
    ours = (faust_speedups.Consumer, faust_speedups.Producer, faust_speedups.ProducerBuffer,
            faust_speedups.RawSchema, faust_speedups.LeanMonitor)
    unguarded = []
    for cls in ours:
        for attr, obj in vars(cls).items():
            if not isinstance(obj, property | FunctionType) or (
                    attr.startswith("__") and attr != "__init__"):
                continue
            base = next((b for b in cls.__mro__[1:] if attr in vars(b)), None)
            if base is None:
                continue  # labbus's own helper, nothing upstream to follow
            name = f"{base.__module__}:{base.__qualname__}.{attr}"
            if name not in faust_speedups.UPSTREAM_SOURCES:
                unguarded.append(name)
    assert not unguarded, f"overridden but not in UPSTREAM_SOURCES: {unguarded}"


def test_the_guard_names_a_changed_or_vanished_function(monkeypatch):
    table = dict(faust_speedups.UPSTREAM_SOURCES)
    table["faust.transport.consumer:Consumer.getmany"] = "0" * 64
    table["faust.transport.consumer:Consumer.no_such_method"] = "0" * 64
    monkeypatch.setattr(faust_speedups, "UPSTREAM_SOURCES", table)
    changed = faust_speedups.changed_upstream()
    assert len(changed) == 2
    assert changed[0].startswith("faust.transport.consumer:Consumer.getmany (source sha256")
    assert changed[1].startswith("faust.transport.consumer:Consumer.no_such_method (gone")


def test_faust_is_pinned_to_the_tested_minor_version():
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "faust-streaming>=0.15.3,<0.16" in project["project"]["dependencies"]
    assert version("faust-streaming").startswith("0.15.")


def test_the_faust_internals_of_the_stateful_driver_are_as_tested():
    from labbus.events import faust_runtime

    changed = [name for name, tested in faust_runtime.UPSTREAM_SOURCES.items()
               if faust_speedups.source_hash(name) != tested]
    assert not changed, f"faust changed under the delivery guard: {changed}"
