"""labbus's faust transport: registered under labbus://, and its hand-off of a half-run delivery."""

import asyncio

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
