"""The faust runtime's delivery guard (events/faust_runtime.DeliveryGuard): plain logic."""

from labbus.events.faust_runtime import DeliveryGuard

TP = ("t", 0)


def test_contiguous_offsets_need_no_seek():
    guard = DeliveryGuard("p")
    assert [guard.handled(TP, o, None) for o in range(5)] == [None] * 5
    assert guard.done[TP] == 4


def test_a_skipped_range_is_read_again_once():
    guard = DeliveryGuard("p")
    guard.handled(TP, 10, 10)
    assert guard.handled(TP, 15, None) == 11  # 11..14 never reached the handler
    assert guard.handled(TP, 16, None) is None  # rest of the stale batch: one seek is enough
    for o in range(11, 17):  # delivered again from 11
        assert guard.handled(TP, o, None) is None
    assert guard.done[TP] == 16
    assert guard.handled(TP, 20, None) == 17  # a later gap is caught again


def test_records_handled_again_after_a_rebalance_are_not_a_gap():
    guard = DeliveryGuard("p")
    for o in range(354, 381):
        guard.handled(TP, o, None)
    assert guard.handled(TP, 370, 354) is None  # faust went back to the committed offset
    assert guard.done[TP] == 380


def test_the_committed_offset_counts_as_handled():
    guard = DeliveryGuard("p")
    assert guard.handled(TP, 168, 168) is None  # a partition taken over at its commit
    other = ("t", 1)
    assert guard.handled(other, 272, 168) == 168  # taken over, but the first records vanished


def test_records_read_but_never_handled_are_found_once_the_handler_is_idle():
    guard = DeliveryGuard("p")
    for o in range(530, 536):
        guard.handled(TP, o, None)
    assert guard.lost({TP: 551}, {TP: 536}) == {}  # handled just now: may still be on its way
    guard.last_handled -= DeliveryGuard.IDLE_S
    assert guard.lost({TP: 551}, {TP: 536}) == {TP: 536}  # the consumer returned 536..550
    assert guard.lost({TP: 536}, {TP: 536}) == {}  # everything returned was handled
    assert guard.lost({TP: None}, {TP: None}) == {}  # no position yet


def test_a_partition_sought_to_its_commit_is_not_lost():
    guard = DeliveryGuard("p")
    guard.last_handled -= DeliveryGuard.IDLE_S
    assert guard.lost({TP: 102}, {TP: 102}) == {}  # nothing returned since the seek


def test_a_partition_never_handled_is_checked_from_the_log_start():
    guard = DeliveryGuard("p")
    guard.last_handled -= DeliveryGuard.IDLE_S
    assert guard.lost({TP: 11}, {TP: 0}) == {TP: 0}  # 0..10 returned, none delivered
    assert guard.handled(TP, 0, None) is None and guard.done[TP] == 0


def test_nothing_is_committed_past_a_record_not_handled():
    guard = DeliveryGuard("p")
    assert guard.committable(TP, 250) is None  # nothing handled here yet
    for o in range(240, 248):
        guard.handled(TP, o, 240)
    assert guard.committable(TP, 250) == 248  # faust would skip 248 and 249: capped
    assert guard.committable(TP, 245) == 245
    assert guard.committable(TP, None) is None


def test_nothing_is_committed_past_a_state_write_not_yet_flushed():
    guard = DeliveryGuard("p")
    other = ("t", 1)
    for o in range(10, 20):
        guard.handled(TP, o, 10)
    guard.handled(other, 5, 5)
    guard.written(TP, 12)
    guard.written(TP, 15)  # the first unflushed write caps, not the latest
    assert guard.committable(TP, 20) == 12
    assert guard.committable(other, 6) == 6  # a partition without writes is not held back
    guard.flush_started()
    guard.written(TP, 18)  # written while the flush runs: not covered by it
    assert guard.committable(TP, 20) == 12
    guard.flush_done()
    assert guard.committable(TP, 20) == 18
    guard.flush_started()
    assert guard.committable(TP, 20) == 18  # a flush that never finished keeps its cap
    guard.written(TP, 19)
    guard.flush_started()  # the next flush covers both
    assert guard.committable(TP, 20) == 18
    guard.flush_done()
    assert guard.committable(TP, 20) == 20


class _FaustConsumerBookkeeping:
    """The attributes faust's `Consumer._new_offset` reads and writes, nothing else."""

    def __init__(self) -> None:
        from collections import defaultdict

        from intervaltree import IntervalTree

        self._acked = defaultdict(list)
        self._acked_index = defaultdict(set)
        self._gap = defaultdict(IntervalTree)
        self._committed_offset = defaultdict(lambda: None)

    def ack(self, tp, offset) -> None:
        self._acked[tp].append(offset)
        self._acked_index[tp].add(offset)

    def commit(self, tp, offset) -> None:
        self._committed_offset[tp] = offset


def test_a_capped_commit_keeps_faust_committing_later():
    """faust's own _new_offset (the real function) under the cap: after a commit held back by
    a state write not yet flushed, the next commits still happen (faust forgot the acked offsets
    it returned; without giving back those not committed it sees a gap and never commits)."""
    from faust.transport.consumer import Consumer

    from labbus.events.faust_runtime import capped_new_offset

    consumer = _FaustConsumerBookkeeping()

    def choose(tp):
        return Consumer._new_offset(consumer, tp)

    guard = DeliveryGuard("p")
    for o in range(10):
        guard.handled(TP, o, None)
        consumer.ack(TP, o)
    guard.written(TP, 4)  # the state of offset 4 is not flushed yet
    offset = capped_new_offset(consumer, choose, guard, TP)
    assert offset == 4
    consumer.commit(TP, offset)
    guard.flush_started()
    guard.flush_done()
    for o in range(10, 15):
        guard.handled(TP, o, 4)
        consumer.ack(TP, o)
    assert capped_new_offset(consumer, choose, guard, TP) == 15  # all of it, at last

    # without giving the offsets back, faust would stall: the same steps on faust alone
    alone = _FaustConsumerBookkeeping()
    for o in range(10):
        alone.ack(TP, o)
    assert Consumer._new_offset(alone, TP) == 10
    alone.commit(TP, 4)  # what a cap without the give-back would have committed
    for o in range(10, 15):
        alone.ack(TP, o)
    assert Consumer._new_offset(alone, TP) is None  # a gap 4 -> 10: never again
