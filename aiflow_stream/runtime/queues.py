"""Bounded queues between steps: bounded by items and bytes, with a drop policy.

``latest`` (live sources) drops the oldest item when full and skips items older than
``max_staleness`` when they are taken; ``block`` makes the producer wait and never drops.
End-of-stream is never dropped: it is queued past the bound if it must be.

When several streams share a ``latest`` queue (many cameras into one edge step) and it
overflows, the item dropped is the oldest of the stream that holds the most queued items, and
among equals, of the stream served most so far; when that is the newcomer's own stream, the
newcomer replaces its stream's queued item in place (or is dropped if there is none). Plain
drop-oldest starves the cameras whose key frames arrive first in each burst, for as long as
the cameras' phases stay put (measured: 0 to 1 caption/s per camera at 16 cameras).
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
        self._served: collections.Counter[str] = collections.Counter()  # data items taken, per stream

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
        placed = False  # dropped itself, or put in place of its stream's older item
        with self._cv:
            if self._closed:
                raise Closed(self.name)
            if item.kind is not ItemKind.EOS:
                if self.policy is Policy.LATEST:
                    while self._full(size):
                        evicted = self._evict_for(item)
                        if evicted is None:
                            break
                        dropped.append(evicted[0])
                        if evicted[0] is item or evicted[1]:
                            placed = True
                            break
                else:
                    deadline = None if timeout is None else time.monotonic() + timeout
                    while self._full(size) and not self._closed:
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            return False
                        self._cv.wait(left if left is not None else 0.5)
                    if self._closed:
                        raise Closed(self.name)
            if not placed:
                self._q.append(item)
                self._bytes += size
            self.high_water = max(self.high_water, len(self._q))
            self._cv.notify_all()
        for v in dropped:
            self.drops.add(f"{self.name}.{DropReason.OVERFLOW.value}")
            v.done()
        return True

    def _evict_for(self, incoming: Item) -> tuple[Item, bool] | None:
        """Make room for ``incoming``: (the item dropped, whether ``incoming`` took its place
        in the queue); None when only EOS is queued."""
        queued: collections.Counter[str] = collections.Counter(
            it.stream for it in self._q if it.kind is not ItemKind.EOS)  # in order of first (oldest) item
        if not queued:
            return None
        if len(queued) > 1 or incoming.stream not in queued:
            queued[incoming.stream] += 1
            stream = max(queued, key=lambda s: (queued[s], self._served[s]))  # ties: the oldest
        else:
            stream = incoming.stream
        idx = next((i for i, it in enumerate(self._q) if it.kind is not ItemKind.EOS and it.stream == stream), None)
        if idx is None:
            return incoming, False  # its stream is the one to cut, and it has nothing older queued
        victim = self._q[idx]
        self._bytes -= victim.nbytes
        if stream == incoming.stream and queued[stream] == 2 and len(queued) > 1:
            # its only queued item is refreshed where it stands: a stream keeps its place in
            # line, or the cameras that burst last would be pushed back behind the others forever
            self._q[idx] = incoming
            self._bytes += incoming.nbytes
            return victim, True
        del self._q[idx]
        return victim, False

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
            if item.kind is not ItemKind.EOS:
                with self._cv:
                    self._served[item.stream] += 1
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
