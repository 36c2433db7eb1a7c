"""The wire format (DESIGN.md section 4): one message = ZeroMQ multipart ``[header, *payload]``.

The header is a msgpack map (the only place protocol maps exist); the code above this module
sees typed ``Header``/``PartSpec`` dataclasses. Payload buffers travel untouched: ``encode``
never copies a contiguous buffer and ``decode`` views received frames without copying.
``decode`` validates everything a peer controls before anything is allocated from it.
"""

from __future__ import annotations

import enum
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq

from aiflow_stream.errors import WireError

PROTOCOL_VERSION = 1

Buffer = bytes | bytearray | memoryview | np.ndarray | zmq.Frame


class Kind(enum.IntEnum):
    """Message kinds. The numbers are wire codes: never renumber or reuse one."""

    FRAME = 1  # raw or JPEG images
    FEATURES = 2  # encoder features
    PACKET = 3  # compressed features
    TOKENS = 4  # token ids
    CAPTION = 5  # caption text (in meta) and tokens
    EOS = 6  # end of a stream
    REQUEST = 7  # a call that wants a REPLY (speculative-decoding verify)
    REPLY = 8  # the answer to a REQUEST, sent back over the same link
    CREDIT = 16  # flow control: grant (receiver -> sender) or ask (sender -> receiver)
    HEARTBEAT = 17  # liveness ping / pong
    HELLO = 18  # a sender opens (or reopens) its session


CONTROL_KINDS = frozenset({Kind.CREDIT, Kind.HEARTBEAT, Kind.HELLO})
_KINDS = {int(k): k for k in Kind}


class Reason(str, enum.Enum):
    """Why a message was rejected; the key of the invalid-message counters."""

    GARBAGE = "garbage"  # not msgpack, not a map, missing/mistyped field, unknown kind
    VERSION = "version"  # a protocol version this code does not speak
    SHAPE = "shape"  # unknown dtype, negative or absurd dimensions
    SIZE = "size"  # frame count or raw byte count disagrees with the part specs
    LIMIT = "limit"  # over one of the configured ``Limits``


class BadMessage(WireError):
    """A message failed validation; ``reason`` says which way (for counters)."""

    def __init__(self, reason: Reason, text: str) -> None:
        super().__init__(text)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Limits:
    """What a receiver accepts; checked before any payload is used or allocated."""

    max_parts: int = 16
    max_part_bytes: int = 256 << 20
    max_message_bytes: int = 512 << 20
    max_header_bytes: int = 64 << 10
    max_ndim: int = 8


# dtypes a part may declare (little-endian native on every supported host)
_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
        "float16", "float32", "float64", "complex64", "complex128",
    )
}
_NAMES: dict[np.dtype, str] = {dt: name for name, dt in _DTYPES.items()}  # dtype.name is slow
_U8 = _DTYPES["uint8"]
_MAX_NAME = 256  # stream, link and codec names


@dataclass(slots=True)
class PartSpec:
    """One payload part: ``dtype``/``shape`` of the array it holds (for a coded part, of the
    array it decodes to) and the ``codec`` label ("raw" parts are checked byte for byte)."""

    dtype: str
    shape: tuple[int, ...]
    codec: str = "raw"

    @property
    def nbytes(self) -> int:
        """Byte size of the (decoded) array this part describes."""
        return math.prod(self.shape) * _DTYPES[self.dtype].itemsize

    @classmethod
    def of(cls, buf: Buffer) -> PartSpec:
        """The raw spec of a numpy array, or of plain bytes as a 1-D uint8 array."""
        if isinstance(buf, np.ndarray):
            name = _NAMES.get(buf.dtype)
            if name is None:
                raise WireError(f"dtype {buf.dtype} cannot go on the wire; use one of "
                                f"{', '.join(_DTYPES)}")
            return cls(name, buf.shape)
        return cls("uint8", (_nbytes(buf),))


@dataclass(slots=True)
class Header:
    """Typed message header; see DESIGN.md section 4."""

    kind: Kind
    stream: str
    seq: int
    link: str = ""  # producing step id / logical link name; the receiver routes on it
    capture_ns: int = 0
    stamps: dict[str, int] = field(default_factory=dict)  # stage name -> ns timestamp
    parts: list[PartSpec] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # small msgpack-able map
    version: int = PROTOCOL_VERSION


@dataclass(slots=True)
class Message:
    """A header and its payload buffers (numpy arrays, bytes, memoryviews or zmq Frames)."""

    header: Header
    payload: list[Buffer] = field(default_factory=list)
    _size: int = field(default=-1, repr=False, compare=False)  # set for received messages

    @classmethod
    def build(
        cls,
        kind: Kind,
        stream: str,
        seq: int,
        parts: list[Buffer] | tuple[Buffer, ...] = (),
        *,
        link: str = "",
        capture_ns: int = 0,
        stamps: dict[str, int] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Message:
        """A message whose raw part specs are taken from the given arrays / bytes."""
        payload = list(parts)
        specs = []
        for b in payload:
            if type(b) is np.ndarray and (name := _NAMES.get(b.dtype)) is not None:
                specs.append(PartSpec(name, b.shape))  # the common case, inlined
            else:
                specs.append(PartSpec.of(b))
        header = Header(kind, stream, seq, link, capture_ns,
                        {} if stamps is None else stamps, specs, {} if meta is None else meta)
        return cls(header, payload)

    @property
    def nbytes(self) -> int:
        """Payload bytes (the header is not counted); the unit of byte credits."""
        if self._size >= 0:
            return self._size
        return sum(_nbytes(b) for b in self.payload)

    def arrays(self) -> list[np.ndarray]:
        """Numpy views over the payload, no copies: raw parts with their dtype and shape,
        coded parts as 1-D uint8. Views of received frames are read-only and may be
        unaligned for their dtype (tcp); copy if a consumer needs aligned memory."""
        out = []
        for spec, buf in zip(self.header.parts, self.payload):
            if spec.codec == "raw":
                a = buf if isinstance(buf, np.ndarray) else np.frombuffer(
                    buf, _DTYPES[spec.dtype])  # type: ignore[arg-type]  # zmq.Frame is a buffer
                out.append(a.reshape(spec.shape))
            else:
                out.append(np.frombuffer(buf, _U8))  # type: ignore[arg-type]
        return out


def _nbytes(buf: Buffer) -> int:
    if isinstance(buf, (np.ndarray, memoryview)):
        return buf.nbytes
    return len(buf)


_local = threading.local()


def _packer() -> msgpack.Packer:
    p = getattr(_local, "packer", None)
    if p is None:
        p = _local.packer = msgpack.Packer(autoreset=True, use_bin_type=True)
    return p


def encode(msg: Message) -> list[Buffer]:
    """Multipart frames for ``msg``: the packed header, then the payload buffers as they are
    (a non-contiguous array is the only thing copied). Raises ``WireError`` when the payload
    does not match the part specs, so a bad message fails at the sender."""
    return encode_sized(msg)[0]


def encode_sized(msg: Message, packer: msgpack.Packer | None = None) -> tuple[list[Buffer], int]:
    """``encode`` plus the payload byte count (the unit of byte credits). A caller that
    encodes from one thread may pass its own ``packer`` (not thread-safe) to save a lookup."""
    h = msg.header
    specs, payload = h.parts, msg.payload
    if len(specs) != len(payload):
        raise WireError(f"message has {len(payload)} payload buffers but {len(specs)} part "
                        f"specs (stream={h.stream!r} seq={h.seq}); give one spec per buffer")
    frames: list[Buffer] = [b""]
    wire_parts: list[tuple[str, tuple[int, ...], str]] = []
    total = 0
    for spec, buf in zip(specs, payload):
        if type(buf) is np.ndarray:
            if not buf.flags.c_contiguous:
                buf = np.ascontiguousarray(buf)
            n = buf.nbytes
        else:
            n = _nbytes(buf)
        if spec.codec == "raw" and n != spec.nbytes:
            raise WireError(f"part {len(wire_parts)} of stream={h.stream!r} seq={h.seq} holds "
                            f"{n} bytes but its spec {spec.dtype}{list(spec.shape)} needs "
                            f"{spec.nbytes}")
        wire_parts.append((spec.dtype, spec.shape, spec.codec))
        frames.append(buf)
        total += n
    m: dict[str, Any] = {"v": h.version, "k": int(h.kind), "s": h.stream, "q": h.seq,
                         "p": wire_parts}
    if h.link:
        m["l"] = h.link
    if h.capture_ns:
        m["t"] = h.capture_ns
    if h.stamps:
        m["ts"] = h.stamps
    if h.meta:
        m["m"] = h.meta
    try:
        frames[0] = (packer or _packer()).pack(m)
    except (TypeError, ValueError, OverflowError) as err:
        raise WireError(f"header of stream={h.stream!r} seq={h.seq} cannot be packed: {err}; "
                        "meta and stamps must hold only msgpack types") from err
    return frames, total


def decode(frames: list[Any], limits: Limits) -> Message:
    """Validate received multipart ``frames`` and view them as a ``Message`` without copying.

    Raises ``BadMessage`` (a ``WireError``) naming what was wrong; nothing is allocated
    from the peer's numbers before they passed the checks against ``limits``."""
    return decode_sized(frames, limits)[0]


def decode_sized(frames: list[Any], limits: Limits) -> tuple[Message, int]:
    """``decode`` plus the payload byte count."""
    nf = len(frames)
    if nf == 0:
        raise BadMessage(Reason.GARBAGE, "empty message (no header frame)")
    if nf - 1 > limits.max_parts:
        raise BadMessage(Reason.LIMIT, f"{nf - 1} payload frames, limit is {limits.max_parts}")
    hbuf = frames[0]
    hlen = len(hbuf) if type(hbuf) in _LEN_TYPES else _nbytes(hbuf)
    if hlen > limits.max_header_bytes:
        raise BadMessage(Reason.LIMIT, f"header of {hlen} bytes, limit is "
                                       f"{limits.max_header_bytes}")
    header, sizes = _decode_header(hbuf, limits)
    if len(sizes) != nf - 1:
        raise BadMessage(Reason.SIZE, f"header declares {len(sizes)} parts but {nf - 1} payload "
                                      f"frames came (stream={header.stream!r} seq={header.seq})")
    total = 0
    max_part = limits.max_part_bytes
    payload = frames[1:]
    for i, buf in enumerate(payload):
        n = len(buf) if type(buf) in _LEN_TYPES else _nbytes(buf)
        if n > max_part:
            raise BadMessage(Reason.LIMIT, f"part {i} is {n} bytes, limit is {max_part}")
        want = sizes[i]
        if want >= 0 and n != want:
            spec = header.parts[i]
            raise BadMessage(Reason.SIZE, f"raw part {i} is {n} bytes but {spec.dtype}"
                                          f"{list(spec.shape)} needs {want} "
                                          f"(stream={header.stream!r} seq={header.seq})")
        total += n
    if total > limits.max_message_bytes:
        raise BadMessage(Reason.LIMIT, f"payload of {total} bytes, limit is "
                                       f"{limits.max_message_bytes}")
    return Message(header, payload, total), total


_LEN_TYPES = (zmq.Frame, bytes)


def _decode_header(buf: Any, limits: Limits) -> tuple[Header, list[int]]:
    """The typed header and, per part, the exact byte count a raw part must have (-1 for
    coded parts, whose size only the limits bound)."""
    try:
        m = msgpack.unpackb(buf, raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises many types on garbage; all mean the same here
        raise BadMessage(Reason.GARBAGE, f"header is not msgpack ({type(err).__name__})") from None
    if type(m) is not dict:
        raise BadMessage(Reason.GARBAGE, f"header is a msgpack {type(m).__name__}, not a map")
    try:
        version, kind, stream, seq, parts = m["v"], m["k"], m["s"], m["q"], m["p"]
    except KeyError as err:
        raise BadMessage(Reason.GARBAGE, f"header lacks field {err.args[0]!r}") from None
    if version != PROTOCOL_VERSION or type(version) is not int:
        if type(version) is not int:
            raise BadMessage(Reason.GARBAGE, f"header version is {type(version).__name__}")
        raise BadMessage(Reason.VERSION, f"protocol version {version}, this side speaks "
                                         f"{PROTOCOL_VERSION}; upgrade the older tier")
    k = _KINDS.get(kind) if type(kind) is int else None
    if k is None:
        raise BadMessage(Reason.GARBAGE, f"unknown message kind {kind!r}")
    if type(stream) is not str or len(stream) > _MAX_NAME:
        raise BadMessage(Reason.GARBAGE, "stream id must be a str of at most 256 characters")
    if type(seq) is not int or seq < 0:
        raise BadMessage(Reason.GARBAGE, f"seq must be a non-negative int, got {seq!r}")
    link, capture_ns, stamps, meta = "", 0, None, None
    if len(m) > 5:  # optional fields present
        link = m.get("l", "")
        if type(link) is not str or len(link) > _MAX_NAME:
            raise BadMessage(Reason.GARBAGE, "link must be a str of at most 256 characters")
        capture_ns = m.get("t", 0)
        if type(capture_ns) is not int:
            raise BadMessage(Reason.GARBAGE, "capture_ns must be an int")
        stamps = m.get("ts")
        if stamps is not None and (type(stamps) is not dict
                                   or not all(type(v) is int for v in stamps.values())):
            raise BadMessage(Reason.GARBAGE, "stamps must map stage names to int nanoseconds")
        meta = m.get("m")
        if meta is not None and type(meta) is not dict:
            raise BadMessage(Reason.GARBAGE, "meta must be a map")
    specs, sizes = _parse_parts(parts, limits)
    header = Header(k, stream, seq, link, capture_ns, {} if stamps is None else stamps, specs,
                    {} if meta is None else meta, version)
    return header, sizes


def _parse_parts(parts: Any, limits: Limits) -> tuple[list[PartSpec], list[int]]:
    if type(parts) is not list:
        raise BadMessage(Reason.GARBAGE, "part specs must be a list")
    if len(parts) > limits.max_parts:
        raise BadMessage(Reason.LIMIT, f"{len(parts)} parts declared, limit is "
                                       f"{limits.max_parts}")
    specs = []
    sizes = []
    for i, p in enumerate(parts):
        if type(p) is not list or len(p) != 3:
            raise BadMessage(Reason.GARBAGE, f"part {i} spec must be [dtype, shape, codec]")
        dtype, shape, codec = p
        dt = _DTYPES.get(dtype) if type(dtype) is str else None
        if dt is None:
            raise BadMessage(Reason.SHAPE, f"part {i} has unknown dtype {dtype!r}")
        if type(codec) is not str or len(codec) > _MAX_NAME:
            raise BadMessage(Reason.GARBAGE, f"part {i} codec must be a short str")
        if type(shape) is not list:
            raise BadMessage(Reason.SHAPE, f"part {i} shape must be a list of ints")
        if len(shape) > limits.max_ndim:
            raise BadMessage(Reason.SHAPE, f"part {i} has {len(shape)} dimensions, limit is "
                                           f"{limits.max_ndim}")
        n = dt.itemsize
        for d in shape:
            if type(d) is not int or d < 0:
                raise BadMessage(Reason.SHAPE, f"part {i} has a bad dimension {d!r} in {shape}")
            n *= d
        if n > limits.max_part_bytes:
            raise BadMessage(Reason.LIMIT, f"part {i} declares {dtype}{shape} = {n} bytes, "
                                           f"limit is {limits.max_part_bytes}")
        specs.append(PartSpec(dtype, tuple(shape), codec))
        sizes.append(n if codec == "raw" else -1)
    return specs, sizes


class SeqTracker:
    """Counts missed sequence numbers (gaps) and duplicates / reorders per key.

    The key is whatever identifies one sender's numbering, e.g. ``(peer, link, stream)``.
    At most ``max_keys`` keys are remembered (the oldest forgotten first), so a peer
    inventing stream ids cannot grow memory without bound."""

    def __init__(self, max_keys: int = 4096) -> None:
        self._next: dict[Any, int] = {}
        self._max = max_keys
        self.gaps = 0
        self.reordered = 0

    def observe(self, key: Any, seq: int) -> int:
        """Record ``seq`` for ``key``; return how many numbers were skipped before it."""
        nxt = self._next
        expected = nxt.get(key)
        if expected == seq:
            nxt[key] = seq + 1
            return 0
        if expected is None:
            if len(nxt) >= self._max:
                del nxt[next(iter(nxt))]
            nxt[key] = seq + 1
            return 0
        if seq > expected:
            nxt[key] = seq + 1
            self.gaps += seq - expected
            return seq - expected
        self.reordered += 1
        return 0

    def reset(self, match: Any = None) -> None:
        """Forget every key (``match`` None) or those whose first element equals ``match``
        (a restarted peer starts its numbering again)."""
        if match is None:
            self._next.clear()
            return
        for key in [k for k in self._next if isinstance(k, tuple) and k and k[0] == match]:
            del self._next[key]
