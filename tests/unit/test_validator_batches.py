"""When the validator decides a batch: full, nothing more buffered, or stalled (watchdog)."""

import asyncio

from labbus.processors.validator import Batches


class RecordingBatches(Batches):
    """Batches whose decide() records the batch instead of validating and sending it."""

    def __init__(self, buffered: asyncio.Queue, **kwargs) -> None:
        super().__init__(app=None, validator=None, producer=None, windows_ready=None,
                         buffered=buffered, **kwargs)
        self.decided: list[list] = []

    async def decide(self) -> int:
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        batch, self.pending = self.pending, []
        if batch:
            self.decided.append(batch)
        return len(batch)


def test_decides_at_once_when_nothing_more_is_buffered():
    async def scenario():
        batches = RecordingBatches(asyncio.Queue(), max_size=10)
        assert batches.add("e1") is True
    asyncio.run(scenario())


def test_waits_while_more_is_buffered_and_decides_when_full():
    async def scenario():
        buffered = asyncio.Queue()
        buffered.put_nowait("more")
        batches = RecordingBatches(buffered, max_size=3)
        assert [batches.add(e) for e in ("e1", "e2", "e3")] == [False, False, True]
        batches.close()
    asyncio.run(scenario())


def test_a_stalled_partial_batch_is_decided_by_the_watchdog():
    """faust empties its buffers when partitions are revoked: the reading that should have
    followed never comes, and the batch must not wait for it."""
    async def scenario():
        buffered = asyncio.Queue()
        buffered.put_nowait("dropped by a rebalance")
        batches = RecordingBatches(buffered, max_size=100, stall_s=0.05)
        batches.add("e1")
        batches.add("e2")
        await asyncio.sleep(0.2)
        assert batches.decided == [["e1", "e2"]]
        assert batches.watchdog is None
    asyncio.run(scenario())


def test_a_growing_batch_is_left_alone_by_the_watchdog():
    async def scenario():
        buffered = asyncio.Queue()
        buffered.put_nowait("more")
        batches = RecordingBatches(buffered, max_size=1000, stall_s=0.05)
        for i in range(10):  # a reading every 20 ms for 200 ms: never stalled for 50 ms
            batches.add(i)
            await asyncio.sleep(0.02)
        assert batches.decided == []
        await asyncio.sleep(0.15)
        assert batches.decided == [list(range(10))]
    asyncio.run(scenario())
