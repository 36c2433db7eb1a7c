"""Captions out: a ZeroMQ PUB socket (topic = stream id) and a typed subscriber.

A record is a msgpack map; :func:`subscribe` turns it into a :class:`CaptionRecord`. An
end-of-stream record (``eos: true``) lets a subscriber stop when the stream is over.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
import zmq

from aiflow_stream.errors import TransportError, WireError


@dataclass(frozen=True)
class CaptionRecord:
    """One caption as published: ``revision`` 0 is the first answer, higher ones refine it."""

    stream: str
    seq: int
    capture_ns: int
    publish_ns: int
    text: str
    model: str
    revision: int = 0
    final: bool = True
    truth: str | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    eos: bool = False

    @property
    def latency(self) -> float:
        """Capture-to-publish latency in milliseconds."""
        return (self.publish_ns - self.capture_ns) / 1e6

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_map(cls, m: Any) -> CaptionRecord:
        if not isinstance(m, dict):
            raise WireError(f"caption record must be a map, got {type(m).__name__}")
        try:
            return cls(stream=str(m["stream"]), seq=int(m.get("seq", -1)), capture_ns=int(m.get("capture_ns", 0)),
                       publish_ns=int(m.get("publish_ns", 0)), text=str(m.get("text", "")),
                       model=str(m.get("model", "")), revision=int(m.get("revision", 0)),
                       final=bool(m.get("final", True)), truth=m.get("truth"),
                       latency_ms=dict(m.get("latency_ms") or {}), stats=dict(m.get("stats") or {}),
                       eos=bool(m.get("eos", False)))
        except (KeyError, TypeError, ValueError) as err:
            raise WireError(f"malformed caption record: {err}") from err


class CaptionPublisher:
    """Owns one PUB socket. Used from one thread (the publish step's)."""

    def __init__(self, address: str, ctx: zmq.Context | None = None) -> None:
        self.address = address
        self._ctx = ctx or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 500)  # bounded: a stopping tier must exit promptly
        self._sock.setsockopt(zmq.SNDHWM, 10000)
        try:
            self._sock.bind(address)
        except zmq.ZMQError as err:
            self._sock.close(0)
            raise TransportError(f"cannot bind the caption publisher at {address}: {err}") from err
        self.sent = 0
        self._streams: set[str] = set()

    def send(self, topic: str, record: dict[str, Any]) -> None:
        self._streams.add(topic)
        self._sock.send_multipart([topic.encode(), msgpack.packb(record, use_bin_type=True)])
        self.sent += 1

    def close(self) -> None:
        if self._sock.closed:
            return
        for s in sorted(self._streams):
            self._sock.send_multipart([s.encode(), msgpack.packb({"stream": s, "eos": True}, use_bin_type=True)])
        # PUB drops messages for peers still connecting; give in-flight ones a moment to leave.
        time.sleep(0.05)
        self._sock.close()


class Subscriber:
    """A SUB socket that yields typed records; ``recv`` can be polled with a timeout."""

    def __init__(self, address: str, streams: Iterable[str] | None = None, ctx: zmq.Context | None = None) -> None:
        self._ctx = ctx or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.wanted = list(streams) if streams else None
        for s in self.wanted or [""]:
            self._sock.setsockopt(zmq.SUBSCRIBE, s.encode())
        self._sock.connect(address)
        self.invalid = 0

    def recv(self, timeout: float | None = None) -> CaptionRecord | None:
        """The next record (EOS records included), or None after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._sock.poll(None if left is None else int(left * 1000)):
                return None
            frames = self._sock.recv_multipart()
            try:
                if len(frames) != 2:
                    raise WireError(f"expected [topic, record], got {len(frames)} frames")
                return CaptionRecord.from_map(msgpack.unpackb(frames[1], raw=False))
            except (WireError, ValueError, msgpack.UnpackException):
                self.invalid += 1

    def close(self) -> None:
        self._sock.close(0)


def subscribe(address: str, streams: Iterable[str] | None = None, *, timeout: float | None = None,
              until_eos: bool = False, ctx: zmq.Context | None = None) -> Iterator[CaptionRecord]:
    """Yield captions published at ``address`` (optionally only ``streams``).

    ``timeout``: stop after that many seconds without a caption. ``until_eos``: stop once every
    stream seen (or every stream asked for) has ended.
    """
    sub = Subscriber(address, streams, ctx)
    seen: set[str] = set()
    ended: set[str] = set()
    try:
        while True:
            rec = sub.recv(timeout)
            if rec is None:
                return
            if rec.eos:
                ended.add(rec.stream)
                if until_eos and set(sub.wanted or seen) <= ended:
                    return
                continue
            seen.add(rec.stream)
            yield rec
    finally:
        sub.close()
