"""The wire format (DESIGN.md section 4): one message = ZeroMQ multipart ``[header, *payload]``.

The header is a msgpack map (the only place protocol maps exist); the code above this module
sees typed ``Header``/``PartSpec`` dataclasses. Payload buffers travel untouched: ``encode``
never copies a contiguous buffer and ``decode`` views received frames without copying.
``decode`` validates everything a peer controls before anything is allocated from it.

Batches: small messages may travel several to one ZeroMQ multipart, which saves the per-frame
and per-call costs that dominate small messages in Python. A batch is exactly two frames:

- an envelope, the msgpack map ``{"v": version, "k": 19, "b": [sub-header, ...],
  "z": [payload bytes of each message, ...]}``; a sub-header is the array
  ``[kind, stream, seq, parts, sizes, link, capture_ns, stamps | nil, meta | nil]`` where
  ``parts`` is the msgpack list ``[[dtype, shape, codec], ...]`` packed into a bin (it repeats
  from message to message, so the receiver validates each distinct one once and remembers
  the result) and ``sizes`` the byte count of each part (it delimits coded parts);
- a blob: the payload parts of every message, concatenated in order (the sender copies small
  parts once; the receiver views slices of the received frame, no copy).

Every sub-header is validated on its own, like a single header; a bad one drops only its
message (its byte range is known from ``z``). A bad envelope drops the whole batch. Kind code
19 is the envelope's and never a message kind; an envelope (its keys in the order above) may
exceed ``Limits.max_header_bytes`` up to ``max_batch_header_bytes``. Single messages are
unchanged, so a receiver that speaks batches reads every sender of protocol version 1.
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
    """Message kinds. The numbers are wire codes: never renumber or reuse one (19 is taken by
    the batch envelope)."""

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


_BATCH = 19  # the kind code of a batch envelope (see the module docstring)
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
    max_batch: int = 4096  # messages in one batch
    max_batch_header_bytes: int = 4 << 20  # a batch envelope (all its sub-headers)


# dtypes a part may declare (little-endian native on every supported host)
_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
        "float16", "float32", "float64", "complex64", "complex128",
    )
}
_NAMES: dict[np.dtype, str] = {dt: name for name, dt in _DTYPES.items()}  # dtype.name is slow
_SIZES: dict[str, int] = {name: dt.itemsize for name, dt in _DTYPES.items()}
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
        n = 0
        for b in self.payload:
            n += b.nbytes if type(b) is np.ndarray else _nbytes(b)
        return n

    def arrays(self) -> list[np.ndarray]:
        """Numpy views over the payload, no copies: raw parts with their dtype and shape,
        coded parts as 1-D uint8. Views of received frames are read-only and may be
        unaligned for their dtype (tcp, batches); copy if a consumer needs aligned memory."""
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


def _wire_parts(msg: Message) -> tuple[list[Any], list[int], list[Buffer], int]:
    """The part specs as they go on the wire, the byte count of each part, the payload
    buffers (contiguous) and their total; raises ``WireError`` when the payload does not
    match the specs."""
    h = msg.header
    specs, payload = h.parts, msg.payload
    if len(specs) != len(payload):
        raise WireError(f"message has {len(payload)} payload buffers but {len(specs)} part "
                        f"specs (stream={h.stream!r} seq={h.seq}); give one spec per buffer")
    wire: list[Any] = []
    lens: list[int] = []
    bufs: list[Buffer] = []
    total = 0
    for spec, buf in zip(specs, payload):
        if type(buf) is np.ndarray:
            if not buf.flags.c_contiguous:
                buf = np.ascontiguousarray(buf)
            n = buf.nbytes
        else:
            n = _nbytes(buf)
        codec = spec.codec
        if codec == "raw":
            size = _SIZES.get(spec.dtype)
            want = -1 if size is None else math.prod(spec.shape) * size
            if n != want:
                raise WireError(f"part {len(wire)} of stream={h.stream!r} seq={h.seq} holds "
                                f"{n} bytes but its spec {spec.dtype}{list(spec.shape)} needs "
                                f"{want if want >= 0 else 'a known dtype'}")
        wire.append((spec.dtype, spec.shape, codec))
        lens.append(n)
        bufs.append(buf)
        total += n
    return wire, lens, bufs, total


def _pack(packer: msgpack.Packer, obj: Any, h: Header) -> bytes:
    try:
        return packer.pack(obj)
    except (TypeError, ValueError, OverflowError) as err:
        raise WireError(f"header of stream={h.stream!r} seq={h.seq} cannot be packed: {err}; "
                        "meta and stamps must hold only msgpack types") from err


def encode(msg: Message) -> list[Buffer]:
    """Multipart frames for ``msg``: the packed header, then the payload buffers as they are
    (a non-contiguous array is the only thing copied). Raises ``WireError`` when the payload
    does not match the part specs, so a bad message fails at the sender."""
    return encode_sized(msg)[0]


def encode_sized(msg: Message, packer: msgpack.Packer | None = None) -> tuple[list[Buffer], int]:
    """``encode`` plus the payload byte count (the unit of byte credits). A caller that
    encodes from one thread may pass its own ``packer`` (not thread-safe) to save a lookup."""
    h = msg.header
    wire, _, bufs, total = _wire_parts(msg)
    m: dict[str, Any] = {"v": h.version, "k": int(h.kind), "s": h.stream, "q": h.seq,
                         "p": wire}
    if h.link:
        m["l"] = h.link
    if h.capture_ns:
        m["t"] = h.capture_ns
    if h.stamps:
        m["ts"] = h.stamps
    if h.meta:
        m["m"] = h.meta
    return [_pack(packer or _packer(), m, h), *bufs], total


_Spec = tuple[str, tuple[int, ...], str]
_SPEC_CACHE = 1024  # distinct packed part specs remembered (per Limits on the receiver)
# the envelope's fixed start: a map of 4 with "v", "k" and the key of the sub-header array
_ENVELOPE = b"".join([b"\x84", *map(msgpack.packb, ("v", PROTOCOL_VERSION, "k", _BATCH, "b"))])
_Z = msgpack.packb("z")


class Batch:
    """Small messages gathered for one multipart (see the module docstring). ``add`` checks
    and packs each message's header at once, so a bad message fails its own ``add``.
    Not thread-safe."""

    __slots__ = ("_packer", "_specs", "_heads", "_sizes", "_bufs", "msgs", "nbytes",
                 "head_bytes")

    def __init__(self, packer: msgpack.Packer | None = None) -> None:
        self._packer = packer or msgpack.Packer(autoreset=True, use_bin_type=True)
        self._specs: dict[tuple[Any, ...], bytes] = {}  # part specs -> packed (they repeat)
        self._heads: list[bytes] = []
        self._sizes: list[int] = []
        self._bufs: list[Buffer] = []
        self.msgs = 0  # messages in the batch
        self.nbytes = 0  # their payload bytes
        self.head_bytes = 0  # their packed sub-header bytes

    def add(self, msg: Message) -> int:
        """Add ``msg``; returns its payload byte count. Raises ``WireError`` (nothing added)
        when the message is inconsistent or its header cannot be packed."""
        h = msg.header
        parts, payload = h.parts, msg.payload
        specs = None
        if len(payload) == 1 and len(parts) == 1:
            buf = payload[0]  # the common case: one contiguous array whose specs were seen
            if type(buf) is np.ndarray and buf.flags.c_contiguous:
                spec = parts[0]
                total = buf.nbytes
                try:
                    specs = self._specs.get((spec.dtype, spec.shape, spec.codec, total))
                except TypeError:  # a shape given as a list: not hashable, not cached
                    pass
                lens, bufs = [total], payload
        if specs is None or h.version != PROTOCOL_VERSION:
            specs, lens, bufs, total = self._checked(msg)
        head = _pack(self._packer, [h.kind, h.stream, h.seq, specs, lens, h.link,
                                    h.capture_ns, h.stamps or None, h.meta or None], h)
        self._heads.append(head)
        self._sizes.append(total)
        self._bufs += bufs
        self.msgs += 1
        self.nbytes += total
        self.head_bytes += len(head)
        return total

    def _checked(self, msg: Message) -> tuple[bytes, list[int], list[Buffer], int]:
        """Packed part specs, part sizes, buffers and byte total of ``msg``, fully checked;
        the specs of a single raw array part are remembered for ``add``'s quick path."""
        h = msg.header
        if h.version != PROTOCOL_VERSION:
            raise WireError(f"a batch carries protocol version {PROTOCOL_VERSION} only, "
                            f"not {h.version} (stream={h.stream!r} seq={h.seq})")
        wire, lens, bufs, total = _wire_parts(msg)
        specs = _pack(self._packer, wire, h)
        if len(wire) == 1 and wire[0][2] == "raw" and type(bufs[0]) is np.ndarray:
            try:
                key = (*wire[0], total)
                if len(self._specs) >= _SPEC_CACHE:
                    self._specs.clear()
                self._specs[key] = specs
            except TypeError:
                pass
        return specs, lens, bufs, total

    def frames(self) -> list[Buffer]:
        """``[envelope, blob]`` for what was added (the payloads are copied once, into the
        blob); the batch is empty afterwards."""
        p = self._packer
        env = b"".join([_ENVELOPE, p.pack_array_header(self.msgs), *self._heads, _Z,
                        p.pack(self._sizes)])
        blob = b"".join(self._bufs)  # type: ignore[arg-type]  # all are buffers
        self._heads, self._sizes, self._bufs = [], [], []  # the sent lists go with the frames
        self.msgs = self.nbytes = self.head_bytes = 0
        return [env, blob]


def encode_batch(msgs: list[Message]) -> list[Buffer]:
    """The two frames of one batch holding ``msgs`` (see the module docstring)."""
    b = Batch(_packer())
    for m in msgs:
        b.add(m)
    return b.frames()


def decode(frames: list[Any], limits: Limits) -> Message:
    """Validate received multipart ``frames`` and view them as a ``Message`` without copying.

    Raises ``BadMessage`` (a ``WireError``) naming what was wrong; nothing is allocated
    from the peer's numbers before they passed the checks against ``limits``."""
    return decode_sized(frames, limits)[0]


def decode_sized(frames: list[Any], limits: Limits) -> tuple[Message, int]:
    """``decode`` plus the payload byte count."""
    m, hlen = _unpack_first(frames, limits)
    if m.get("k") == _BATCH:
        raise BadMessage(Reason.GARBAGE, "a batch where one message was expected")
    msg = _decode_single(m, hlen, frames, limits)
    return msg, msg._size


def decode_all(frames: list[Any], limits: Limits) -> list[Message | BadMessage]:
    """Every message in received multipart ``frames`` (one, or a batch), each validated on
    its own: a ``Message`` (``nbytes`` known) or the ``BadMessage`` that rejected it.
    Never raises for bad input."""
    try:
        m, hlen = _unpack_first(frames, limits)
        if m.get("k") == _BATCH:
            return _decode_batch(m, frames, limits)
        return [_decode_single(m, hlen, frames, limits)]
    except BadMessage as err:
        return [err]


_LEN_TYPES = (zmq.Frame, bytes)


def _unpack_first(frames: list[Any], limits: Limits) -> tuple[dict[Any, Any], int]:
    """The first frame as a msgpack map of a version we speak, and its length."""
    nf = len(frames)
    if nf == 0:
        raise BadMessage(Reason.GARBAGE, "empty message (no header frame)")
    if nf - 1 > limits.max_parts:
        raise BadMessage(Reason.LIMIT, f"{nf - 1} payload frames, limit is {limits.max_parts}")
    hbuf = frames[0]
    hlen = len(hbuf) if type(hbuf) in _LEN_TYPES else _nbytes(hbuf)
    if hlen > limits.max_header_bytes and (  # only a batch envelope may be larger
            hlen > limits.max_batch_header_bytes
            or memoryview(hbuf)[:len(_ENVELOPE)] != _ENVELOPE):
        raise BadMessage(Reason.LIMIT, f"header of {hlen} bytes, limit is "
                                       f"{limits.max_header_bytes}")
    try:
        m = msgpack.unpackb(hbuf, raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises many types on garbage; all mean the same here
        raise BadMessage(Reason.GARBAGE, f"header is not msgpack ({type(err).__name__})") from None
    if type(m) is not dict:
        raise BadMessage(Reason.GARBAGE, f"header is a msgpack {type(m).__name__}, not a map")
    version = m.get("v")
    if version != PROTOCOL_VERSION or type(version) is not int:
        if version is None:
            raise BadMessage(Reason.GARBAGE, "header lacks field 'v'")
        if type(version) is not int:
            raise BadMessage(Reason.GARBAGE, f"header version is {type(version).__name__}")
        raise BadMessage(Reason.VERSION, f"protocol version {version}, this side speaks "
                                         f"{PROTOCOL_VERSION}; upgrade the older tier")
    return m, hlen


def _decode_single(m: dict[Any, Any], hlen: int, frames: list[Any], limits: Limits) -> Message:
    try:
        kind, stream, seq, parts = m["k"], m["s"], m["q"], m["p"]
    except KeyError as err:
        raise BadMessage(Reason.GARBAGE, f"header lacks field {err.args[0]!r}") from None
    if len(m) > 5:  # optional fields present
        link, capture_ns, stamps, meta = m.get("l", ""), m.get("t", 0), m.get("ts"), m.get("m")
    else:
        link, capture_ns, stamps, meta = "", 0, None, None
    k, stamps, meta = _fields(kind, stream, seq, link, capture_ns, stamps, meta)
    specs, sizes = _parse_parts(parts, limits)
    header = Header(k, stream, seq, link, capture_ns, stamps,
                    [PartSpec(d, s, c) for d, s, c in specs], meta)
    nf = len(frames)
    if len(sizes) != nf - 1:
        raise BadMessage(Reason.SIZE, f"header declares {len(sizes)} parts but {nf - 1} payload "
                                      f"frames came (stream={stream!r} seq={seq})")
    total = 0
    max_part = limits.max_part_bytes
    payload = frames[1:]
    for i, buf in enumerate(payload):
        n = len(buf) if type(buf) in _LEN_TYPES else _nbytes(buf)
        if n > max_part:
            raise BadMessage(Reason.LIMIT, f"part {i} is {n} bytes, limit is {max_part}")
        want = sizes[i]
        if want >= 0 and n != want:
            d, s, _ = specs[i]
            raise BadMessage(Reason.SIZE, f"raw part {i} is {n} bytes but {d}{list(s)} needs "
                                          f"{want} (stream={stream!r} seq={seq})")
        total += n
    if total > limits.max_message_bytes:
        raise BadMessage(Reason.LIMIT, f"payload of {total} bytes, limit is "
                                       f"{limits.max_message_bytes}")
    return Message(header, payload, total)


_spec_caches: dict[Limits, dict[bytes, tuple[tuple[_Spec, ...], tuple[int, ...]]]] = {}


def _decode_batch(m: dict[Any, Any], frames: list[Any], limits: Limits
                  ) -> list[Message | BadMessage]:
    heads, sizes = m.get("b"), m.get("z")
    if type(heads) is not list or type(sizes) is not list or len(heads) != len(sizes):
        raise BadMessage(Reason.GARBAGE, "batch envelope needs lists 'b' and 'z' of one length")
    count = len(heads)
    if count > limits.max_batch:
        raise BadMessage(Reason.LIMIT, f"batch of {count} messages, limit is {limits.max_batch}")
    if len(frames) != 2:
        return [BadMessage(Reason.SIZE, f"a batch is two frames, {len(frames)} came")] * count
    blob = frames[1]
    blen = len(blob) if type(blob) in _LEN_TYPES else _nbytes(blob)
    total = 0
    for z in sizes:
        if type(z) is not int or z < 0:
            return [BadMessage(Reason.GARBAGE, f"batch size {z!r} is not a byte count")] * count
        total += z
    if total != blen:
        return [BadMessage(Reason.SIZE, f"batch declares {total} payload bytes but its blob "
                                        f"holds {blen}")] * count
    cache = _spec_caches.get(limits)
    if cache is None:
        if len(_spec_caches) >= 16:
            _spec_caches.clear()
        cache = _spec_caches[limits] = {}
    view = memoryview(blob)
    out: list[Message | BadMessage] = []
    end = 0
    max_one = min(limits.max_message_bytes, limits.max_part_bytes)
    kinds = _KINDS
    for h, z in zip(heads, sizes):
        start, end = end, end + z
        # the common case, checked in one go: one part whose specs were seen before, no meta
        # and stamps or simple ones; anything else takes the general path below
        if type(h) is list and len(h) == 9:
            kind, stream, seq, pbin, lens, link, capture_ns, stamps, meta = h
            got = cache.get(pbin) if type(pbin) is bytes else None
            if (got is not None and len(got[0]) == 1 and type(kind) is int
                    and type(stream) is str and len(stream) <= _MAX_NAME
                    and type(seq) is int and seq >= 0 and type(link) is str
                    and len(link) <= _MAX_NAME and type(capture_ns) is int and z <= max_one
                    and type(lens) is list and len(lens) == 1 and lens[0] == z
                    and (got[1][0] < 0 or got[1][0] == z) and (meta is None or type(meta) is dict)
                    and (stamps is None or (type(stamps) is dict and _int_values(stamps)))
                    and (k := kinds.get(kind)) is not None):
                d, s, c = got[0][0]
                out.append(Message(Header(k, stream, seq, link, capture_ns,
                                          {} if stamps is None else stamps, [PartSpec(d, s, c)],
                                          {} if meta is None else meta), [view[start:end]], z))
                continue
        try:
            out.append(_batched(h, z, view, start, cache, limits))
        except BadMessage as err:
            out.append(err)
    return out


def _int_values(stamps: dict[Any, Any]) -> bool:
    for v in stamps.values():
        if type(v) is not int:
            return False
    return True


def _batched(h: Any, z: int, view: memoryview, start: int, cache: dict[bytes, Any],
             limits: Limits) -> Message:
    """One message of a batch, validated field by field (raises ``BadMessage``)."""
    if type(h) is not list or len(h) != 9:
        raise BadMessage(Reason.GARBAGE, "batch sub-header must be [kind, stream, seq, parts, "
                                         "sizes, link, capture_ns, stamps, meta]")
    kind, stream, seq, pbin, lens, link, capture_ns, stamps, meta = h
    k, stamps, meta = _fields(kind, stream, seq, link, capture_ns, stamps, meta)
    got = cache.get(pbin) if type(pbin) is bytes else None
    if got is None:
        got = _packed_parts(pbin, limits, cache)
    specs, want = got
    if z > limits.max_message_bytes:
        raise BadMessage(Reason.LIMIT, f"payload of {z} bytes, limit is "
                                       f"{limits.max_message_bytes}")
    if (type(lens) is not list or len(lens) != len(specs)
            or not all(type(n) is int and n >= 0 for n in lens) or sum(lens) != z
            or any(w >= 0 and w != n for w, n in zip(want, lens))):
        raise BadMessage(Reason.SIZE, f"part sizes {lens!r} disagree with the specs or a batch "
                                      f"slot of {z} bytes (stream={stream!r} seq={seq})")
    payload: list[Buffer] = []
    for i, n in enumerate(lens):
        if n > limits.max_part_bytes:
            raise BadMessage(Reason.LIMIT, f"part {i} is {n} bytes, limit is "
                                           f"{limits.max_part_bytes}")
        payload.append(view[start:start + n])
        start += n
    return Message(Header(k, stream, seq, link, capture_ns, stamps,
                          [PartSpec(d, s, c) for d, s, c in specs], meta), payload, z)


def _packed_parts(pbin: Any, limits: Limits, cache: dict[bytes, Any]
                  ) -> tuple[tuple[_Spec, ...], tuple[int, ...]]:
    """Validate the packed part specs of a batch sub-header and remember the result."""
    if type(pbin) is not bytes:
        raise BadMessage(Reason.GARBAGE, "batch part specs must be packed bytes")
    if len(pbin) > limits.max_header_bytes:
        raise BadMessage(Reason.LIMIT, f"part specs of {len(pbin)} bytes, limit is "
                                       f"{limits.max_header_bytes}")
    try:
        parts = msgpack.unpackb(pbin, raw=False, strict_map_key=True)
    except Exception as err:  # as for headers: every msgpack failure is garbage
        raise BadMessage(Reason.GARBAGE, f"part specs are not msgpack ({type(err).__name__})"
                         ) from None
    specs, sizes = _parse_parts(parts, limits)
    got = (tuple(specs), tuple(sizes))
    if len(cache) >= _SPEC_CACHE:
        cache.clear()
    cache[pbin] = got
    return got


def _fields(kind: Any, stream: Any, seq: Any, link: Any, capture_ns: Any, stamps: Any,
            meta: Any) -> tuple[Kind, dict[str, int], dict[str, Any]]:
    """Validate the scalar header fields; the kind, stamps and meta to use."""
    k = _KINDS.get(kind) if type(kind) is int else None
    if k is None:
        raise BadMessage(Reason.GARBAGE, f"unknown message kind {kind!r}")
    if type(stream) is not str or len(stream) > _MAX_NAME:
        raise BadMessage(Reason.GARBAGE, "stream id must be a str of at most 256 characters")
    if type(seq) is not int or seq < 0:
        raise BadMessage(Reason.GARBAGE, f"seq must be a non-negative int, got {seq!r}")
    if type(link) is not str or len(link) > _MAX_NAME:
        raise BadMessage(Reason.GARBAGE, "link must be a str of at most 256 characters")
    if type(capture_ns) is not int:
        raise BadMessage(Reason.GARBAGE, "capture_ns must be an int")
    if stamps is None:
        stamps = {}
    elif type(stamps) is not dict or not all(type(v) is int for v in stamps.values()):
        raise BadMessage(Reason.GARBAGE, "stamps must map stage names to int nanoseconds")
    if meta is None:
        meta = {}
    elif type(meta) is not dict:
        raise BadMessage(Reason.GARBAGE, "meta must be a map")
    return k, stamps, meta


def _parse_parts(parts: Any, limits: Limits) -> tuple[list[_Spec], list[int]]:
    """Validated ``(dtype, shape, codec)`` of each part and the byte count a raw part must
    have (-1 for coded parts, whose size only the limits bound)."""
    if type(parts) is not list:
        raise BadMessage(Reason.GARBAGE, "part specs must be a list")
    if len(parts) > limits.max_parts:
        raise BadMessage(Reason.LIMIT, f"{len(parts)} parts declared, limit is "
                                       f"{limits.max_parts}")
    specs: list[_Spec] = []
    sizes = []
    max_part = limits.max_part_bytes
    for i, p in enumerate(parts):
        if type(p) is not list or len(p) != 3:
            raise BadMessage(Reason.GARBAGE, f"part {i} spec must be [dtype, shape, codec]")
        dtype, shape, codec = p
        n = _SIZES.get(dtype) if type(dtype) is str else None
        if n is None:
            raise BadMessage(Reason.SHAPE, f"part {i} has unknown dtype {dtype!r}")
        if type(codec) is not str or len(codec) > _MAX_NAME:
            raise BadMessage(Reason.GARBAGE, f"part {i} codec must be a short str")
        if type(shape) is not list:
            raise BadMessage(Reason.SHAPE, f"part {i} shape must be a list of ints")
        if len(shape) > limits.max_ndim:
            raise BadMessage(Reason.SHAPE, f"part {i} has {len(shape)} dimensions, limit is "
                                           f"{limits.max_ndim}")
        for d in shape:
            if type(d) is not int or d < 0:
                raise BadMessage(Reason.SHAPE, f"part {i} has a bad dimension {d!r} in {shape}")
            n *= d
        if n > max_part:
            raise BadMessage(Reason.LIMIT, f"part {i} declares {dtype}{shape} = {n} bytes, "
                                           f"limit is {max_part}")
        specs.append((dtype, tuple(shape), codec))
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

    def advance(self, key: Any, next_seq: int) -> None:
        """Expect ``next_seq`` next for ``key``, after a run of consecutive numbers whose
        first one was ``observe``d (a receiver's shortcut for batches)."""
        if key in self._next:
            self._next[key] = next_seq

    def reset(self, match: Any = None) -> None:
        """Forget every key (``match`` None) or those whose first element equals ``match``
        (a restarted peer starts its numbering again)."""
        if match is None:
            self._next.clear()
            return
        for key in [k for k in self._next if isinstance(k, tuple) and k and k[0] == match]:
            del self._next[key]
