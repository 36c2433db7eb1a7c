"""What flows between steps inside a tier: items, and the counters every drop goes to."""

from __future__ import annotations

import enum
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class ItemKind(str, enum.Enum):
    FRAME = "frame"
    FEATURES = "features"
    PACKET = "packet"
    CAPTION = "caption"
    REQUEST = "request"  # a call to a verifier step, answered with a reply
    EOS = "eos"


class DropReason(str, enum.Enum):
    OVERFLOW = "overflow"  # a latest queue was full: the oldest item went
    STALE = "stale"  # older than max_staleness when its turn came
    INVALID = "invalid"  # a malformed message or payload
    GAP = "gap"  # sequence numbers missing on a link (counted, nothing to drop)
    ERROR = "error"  # the step raised while processing it


@dataclass
class Item:
    """One unit of work: a frame, features, a packet or a caption, with its provenance.

    ``parts`` are payload buffers (numpy arrays or bytes) and ``codecs`` their codec labels;
    ``meta`` is small and msgpack-able (it travels in the wire header). ``on_done`` returns the
    link credit of an item that arrived over the network; it runs exactly once, when the item
    is consumed or dropped.
    """

    kind: ItemKind
    stream: str
    seq: int
    capture_ns: int
    parts: list[Any] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    stamps: dict[str, int] = field(default_factory=dict)
    codecs: list[str] = field(default_factory=list)
    on_done: Callable[[], None] | None = None
    origin: str = ""  # producing step id

    @property
    def nbytes(self) -> int:
        total = 0
        for p in self.parts:
            total += p.nbytes if hasattr(p, "nbytes") else len(p)
        return total

    def done(self) -> None:
        cb, self.on_done = self.on_done, None
        if cb is not None:
            cb()

    def derive(self, kind: ItemKind, parts: list[Any], *, meta: dict[str, Any] | None = None,
               codecs: list[str] | None = None) -> Item:
        """A new item for the same frame (stream, seq, timestamps carried over)."""
        m = dict(self.meta)
        if meta:
            m.update(meta)
        return Item(kind, self.stream, self.seq, self.capture_ns, parts, m, dict(self.stamps),
                    codecs or ["raw"] * len(parts))

    @staticmethod
    def eos(stream: str, origin: str, seq: int = 0) -> Item:
        """End of ``stream`` from step ``origin``; ``seq`` is the count of items before it."""
        return Item(ItemKind.EOS, stream, seq, time.time_ns(), origin=origin)


class Counters:
    """Thread-safe named counters (drops by reason, items in/out, ...)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._c[name] += n

    def get(self, name: str) -> int:
        with self._lock:
            return self._c[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)
