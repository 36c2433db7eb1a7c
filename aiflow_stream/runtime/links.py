"""The runtime's side of the network: items <-> wire messages, and the verifier RPC client.

This is the only runtime module that knows the wire format; operators see items and a
:class:`~aiflow_stream.operators.base.VerifierClient`.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from aiflow_stream.errors import WireError
from aiflow_stream.runtime.items import Item, ItemKind
from aiflow_stream.transport.wire import Header, Kind, Message, PartSpec

if TYPE_CHECKING:
    from aiflow_stream.transport.link import Outlet

_TO_WIRE = {
    ItemKind.FRAME: Kind.FRAME,
    ItemKind.FEATURES: Kind.FEATURES,
    ItemKind.PACKET: Kind.PACKET,
    ItemKind.CAPTION: Kind.CAPTION,
    ItemKind.REQUEST: Kind.REQUEST,
    ItemKind.EOS: Kind.EOS,
}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}
_FRAME_SEQ = "_fseq"  # meta key: the item's own (frame) seq when the header carries a link seq


def _spec(part: Any, codec: str) -> PartSpec:
    if isinstance(part, np.ndarray):
        return PartSpec(dtype=str(part.dtype), shape=tuple(part.shape), codec="raw")
    return PartSpec(dtype="uint8", shape=(len(memoryview(part).cast("B")),), codec=codec or "bytes")


def item_to_message(item: Item, link: str, seq: int | None = None) -> Message:
    """The wire message for ``item`` on ``link``. ``seq`` (a per-link, per-stream counter) goes
    in the header so the receiver counts messages lost in transit, not frames a key-frame step
    skipped; the item's own seq then travels in ``meta``."""
    parts = [np.ascontiguousarray(p) if isinstance(p, np.ndarray) else p for p in item.parts]
    codecs = item.codecs if len(item.codecs) == len(parts) else ["raw"] * len(parts)
    meta = dict(item.meta)
    if seq is not None and seq != item.seq:
        meta[_FRAME_SEQ] = item.seq
    header = Header(kind=_TO_WIRE[item.kind], stream=item.stream, seq=item.seq if seq is None else seq,
                    link=link, capture_ns=item.capture_ns, stamps=dict(item.stamps),
                    parts=[_spec(p, c) for p, c in zip(parts, codecs)], meta=meta)
    return Message(header, parts)


def message_to_item(msg: Message) -> Item:
    h = msg.header
    kind = _FROM_WIRE.get(h.kind)
    if kind is None:
        raise WireError(f"a {h.kind.name} message (stream={h.stream!r} seq={h.seq}) is not something a tier "
                        f"consumes; expected one of {', '.join(k.name for k in _FROM_WIRE)}")
    meta = dict(h.meta)
    seq = meta.pop(_FRAME_SEQ, h.seq)
    if type(seq) is not int or seq < 0:
        raise WireError(f"meta {_FRAME_SEQ} must be a non-negative int, got {seq!r}")
    arrays = msg.arrays()
    parts: list[Any] = []
    codecs: list[str] = []
    for spec, arr, raw in zip(h.parts, arrays, msg.payload):
        if spec.codec == "raw":
            parts.append(arr)
        else:
            parts.append(raw if isinstance(raw, (bytes, memoryview)) else memoryview(arr).cast("B"))  # type: ignore[arg-type]
        codecs.append(spec.codec)
    return Item(kind, h.stream, seq, h.capture_ns, parts, meta, dict(h.stamps), codecs, origin=h.link)


class RemoteVerifier:
    """Verifier round trips over an :class:`Outlet` (one caller at a time; a caller with
    several sessions sends their rounds together with :meth:`call_many`)."""

    def __init__(self, outlet: Outlet, link: str, stream: str = "rpc") -> None:
        self.outlet = outlet
        self.link = link
        self.stream = stream
        self._lock = threading.Lock()
        self._seq = 0
        self.bytes_sent = 0
        self.last_call_bytes: list[int] = []  # bytes of each request of the last call_many
        self.calls = 0

    def call(self, meta: dict[str, Any], parts: list[Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:
        return self.call_many([(meta, parts)], timeout)[0]

    def call_many(self, calls: list[tuple[dict[str, Any], list[Any] | None]],
                  timeout: float = 30.0) -> list[dict[str, Any]]:
        """Several requests in one round trip; the answers in the order of ``calls``."""
        with self._lock:
            msgs = []
            for meta, parts in calls:
                self._seq += 1
                item = Item(ItemKind.REQUEST, self.stream, self._seq, time.time_ns(), list(parts or []), meta)
                msgs.append(item_to_message(item, self.link))
                self.calls += 1
            self.last_call_bytes = [m.nbytes for m in msgs]
            self.bytes_sent += sum(self.last_call_bytes)
            return [dict(r.header.meta) for r in self.outlet.request_many(msgs, timeout=timeout)]

    def send_eos(self, timeout: float = 10.0) -> None:
        """Tell the verifier this caller is done; raises ``TransportError`` after ``timeout``."""
        with self._lock:
            self._seq += 1
            msg = item_to_message(Item.eos(self.stream, self.link, self._seq), self.link)
        self.outlet.send(msg, timeout=timeout)


class LocalVerifier:
    """A verifier step in the same tier: a plain call, no network."""

    def __init__(self, op: Any) -> None:
        self.op = op

    def call(self, meta: dict[str, Any], parts: list[Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:
        return self.op.handle("local", meta, list(parts or []))

    def call_many(self, calls: list[tuple[dict[str, Any], list[Any] | None]],
                  timeout: float = 30.0) -> list[dict[str, Any]]:
        return [self.call(meta, parts, timeout) for meta, parts in calls]
