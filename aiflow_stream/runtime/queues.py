"""Bounded queues between steps: bounded by items and bytes, with a drop policy.

``latest`` (live sources) drops the oldest item when full and skips items older than
``max_staleness`` when they are taken; ``block`` makes the producer wait and never drops.
End-of-stream is never dropped: it is queued past the bound if it must be.
"""

from __future__ import annotations

import collections
import threading
import time

from aiflow_stream.runtime.items import Counters, DropReason, Item, ItemKind
from aiflow_stream.sources.base import Policy


class Closed(Exception):
    """The queue was closed (the tier is stopping)."""


class BoundedQueue:
    def __init__(self, name: str, *, max_items: int = 8, max_bytes: int = 64 << 20,
                 policy: Policy = Policy.BLOCK, max_staleness: float | None = None,
                 drops: Counters | None = None) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError(f"queue {name!r}: max_items and max_bytes must be >= 1")
        self.name = name
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.policy = policy
        self.max_staleness = max_staleness
        self.drops = drops if drops is not None else Counters()
        self._q: collections.deque[Item] = collections.deque()
        self._bytes = 0
        self._cv = threading.Condition()
        self._closed = False
        self.high_water = 0

    def __len__(self) -> int:
        with self._cv:
            return len(self._q)

    @property
    def nbytes(self) -> int:
        with self._cv:
            return self._bytes

    def _full(self, incoming: int) -> bool:
        if not self._q:
            return False  # one item always fits, however large
        return len(self._q) >= self.max_items or self._bytes + incoming > self.max_bytes

    def put(self, item: Item, timeout: float | None = None) -> bool:
        """Queue ``item``. Returns False only if ``block`` timed out (the item is not queued)."""
        size = item.nbytes
        dropped: list[Item] = []
        with self._cv:
            if self._closed:
                raise Closed(self.name)
            if item.kind is not ItemKind.EOS:
                if self.policy is Policy.LATEST:
                    while self._full(size):
                        victim = self._pop_oldest_data()
                        if victim is None:
                            break
                        dropped.append(victim)
                else:
                    deadline = None if timeout is None else time.monotonic() + timeout
                    while self._full(size) and not self._closed:
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            return False
                        self._cv.wait(left if left is not None else 0.5)
                    if self._closed:
                        raise Closed(self.name)
            self._q.append(item)
            self._bytes += size
            self.high_water = max(self.high_water, len(self._q))
            self._cv.notify_all()
        for v in dropped:
            self.drops.add(f"{self.name}.{DropReason.OVERFLOW.value}")
            v.done()
        return True

    def _pop_oldest_data(self) -> Item | None:
        for idx, it in enumerate(self._q):
            if it.kind is not ItemKind.EOS:
                del self._q[idx]
                self._bytes -= it.nbytes
                return it
        return None

    def get(self, timeout: float | None = None) -> Item | None:
        """Next item, or None after ``timeout``. Stale items (``latest``) are dropped and counted."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cv:
                while not self._q:
                    if self._closed:
                        raise Closed(self.name)
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return None
                    self._cv.wait(left if left is not None else 0.5)
                item = self._q.popleft()
                self._bytes -= item.nbytes
                self._cv.notify_all()
            if (self.policy is Policy.LATEST and self.max_staleness is not None
                    and item.kind is not ItemKind.EOS
                    and (time.time_ns() - item.capture_ns) > self.max_staleness * 1e9):
                self.drops.add(f"{self.name}.{DropReason.STALE.value}")
                item.done()
                continue
            return item

    def close(self) -> None:
        with self._cv:
            self._closed = True
            leftovers = list(self._q)
            self._q.clear()
            self._bytes = 0
            self._cv.notify_all()
        for it in leftovers:
            it.done()
