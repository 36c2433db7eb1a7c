"""Bounded queues: item and byte bounds, latest vs block, staleness, EOS never dropped."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from aiflow_stream.runtime.items import Counters, Item, ItemKind
from aiflow_stream.runtime.queues import BoundedQueue, Closed
from aiflow_stream.sources.base import Policy


def item(seq: int, nbytes: int = 10, age_s: float = 0.0, released: list[int] | None = None,
         stream: str = "s") -> Item:
    it = Item(ItemKind.FRAME, stream, seq, time.time_ns() - int(age_s * 1e9), [np.zeros(nbytes, np.uint8)])
    if released is not None:
        it.on_done = lambda: released.append(seq)
    return it


def test_latest_drops_oldest_counts_and_releases() -> None:
    drops = Counters()
    released: list[int] = []
    q = BoundedQueue("q", max_items=3, policy=Policy.LATEST, drops=drops)
    for i in range(10):
        assert q.put(item(i, released=released))
    assert len(q) == 3
    assert [q.get(0).seq for _ in range(3)] == [7, 8, 9]
    assert drops.get("q.overflow") == 7
    assert released == list(range(7))  # dropped items return their link credit


def test_latest_shares_an_overloaded_queue_fairly_between_streams() -> None:
    # 6 cameras burst one key frame each per tick, always in the same order, into a queue of 2
    # served once per tick: plain drop-oldest would serve only the last two cameras forever.
    drops = Counters()
    released: list[int] = []
    q = BoundedQueue("q", max_items=2, policy=Policy.LATEST, drops=drops)
    served: dict[str, int] = {f"cam{k}": 0 for k in range(6)}
    seq = 0
    for _ in range(300):
        for cam in served:
            q.put(item(seq, released=released, stream=cam))
            seq += 1
        got = q.get(0)
        assert got is not None
        served[got.stream] += 1
        got.done()
    mean = sum(served.values()) / len(served)
    assert all(abs(v / mean - 1) <= 0.2 for v in served.values()), repr(served)
    # every dropped item (newcomers included) was counted and released
    assert drops.get("q.overflow") == seq - 300 - len(q)
    assert len(released) == seq - len(q)


def test_latest_single_stream_still_keeps_the_newest() -> None:
    q = BoundedQueue("q", max_items=2, policy=Policy.LATEST)
    q.put(item(0, stream="a"))
    q.put(item(1, stream="b"))
    q.put(item(2, stream="b"))  # b holds the most: its oldest goes, a's lone item stays
    assert [q.get(0).seq for _ in range(2)] == [0, 2]
    for i in range(5):
        q.put(item(10 + i, stream="a"))
    assert [q.get(0).seq for _ in range(2)] == [13, 14]


def test_byte_bound() -> None:
    q = BoundedQueue("q", max_items=100, max_bytes=1000, policy=Policy.LATEST)
    for i in range(10):
        q.put(item(i, nbytes=300))
    assert len(q) == 3 and q.nbytes == 900
    # One item always fits even if larger than the byte bound.
    q2 = BoundedQueue("q2", max_items=4, max_bytes=100)
    assert q2.put(item(0, nbytes=500), timeout=0.1)


def test_block_waits_then_times_out_and_never_drops() -> None:
    q = BoundedQueue("q", max_items=2, policy=Policy.BLOCK)
    assert q.put(item(0)) and q.put(item(1))
    t0 = time.monotonic()
    assert q.put(item(2), timeout=0.2) is False
    assert time.monotonic() - t0 >= 0.19
    # A consumer frees room: the blocked producer proceeds.
    done = threading.Event()

    def producer() -> None:
        q.put(item(3), timeout=5)
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    assert q.get(1).seq == 0
    assert done.wait(2)
    t.join()
    assert [q.get(0).seq, q.get(0).seq] == [1, 3]


def test_stale_items_are_skipped_and_counted() -> None:
    drops = Counters()
    q = BoundedQueue("q", max_items=8, policy=Policy.LATEST, max_staleness=0.5, drops=drops)
    q.put(item(0, age_s=2.0))
    q.put(item(1, age_s=0.0))
    assert q.get(0).seq == 1
    assert drops.get("q.stale") == 1


def test_eos_is_never_dropped() -> None:
    q = BoundedQueue("q", max_items=2, policy=Policy.LATEST)
    q.put(Item.eos("s", "cap"))
    for i in range(5):
        q.put(item(i))
    kinds = [q.get(0).kind for _ in range(len(q))]
    assert ItemKind.EOS in kinds


def test_close_wakes_consumers() -> None:
    q = BoundedQueue("q")
    err: list[BaseException] = []

    def consumer() -> None:
        try:
            q.get(timeout=5)
        except Closed as e:
            err.append(e)

    t = threading.Thread(target=consumer)
    t.start()
    time.sleep(0.05)
    q.close()
    t.join(2)
    assert err and not t.is_alive()


def test_bad_bounds_rejected() -> None:
    with pytest.raises(ValueError, match="max_items"):
        BoundedQueue("q", max_items=0)
