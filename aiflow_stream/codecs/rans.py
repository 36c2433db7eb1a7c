"""A byte-wise rANS entropy coder over uint8 symbols, with a per-message frequency table.

32-bit states in ``[2**23, 2**31)``, byte renormalisation (Duda's rANS as in ryg_rans), four
interleaved states sharing one byte stream (their 16 bytes lead the payload).
Frequencies are normalised to a power-of-two total ``2**prob_bits`` and serialised as
``[prob_bits, first symbol, count - 1]`` followed by ``count`` LEB128 varints, so a 16-symbol
table costs ~20 bytes. The decoder kernel checks every read against the payload length and
reports corrupt input through a status code; :func:`decode` turns it into a :class:`CodecError`.
``encode_reference``/``decode_reference`` are a pure-Python implementation producing the
same bytes.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from aiflow_stream.errors import CodecError

RANS_L = 1 << 23
LANES = 4  # interleaved coder states (symbol i uses lane i % 4): independent chains run in parallel
PROB_BITS = 14
MIN_PROB_BITS, MAX_PROB_BITS = 8, 16

_OK, _SHORT, _BAD_STATE, _TRAILING = 0, -1, -2, -3
_STATUS = {
    _SHORT: "payload ends before all symbols are decoded (truncated)",
    _BAD_STATE: "final coder state is wrong (corrupt payload or table)",
    _TRAILING: "payload has bytes left after the last symbol",
}


def normalise(counts: np.ndarray, prob_bits: int = PROB_BITS) -> np.ndarray:
    """Symbol counts -> frequencies summing to ``2**prob_bits``; every seen symbol keeps >= 1."""
    total = int(counts.sum())
    if total <= 0:
        raise CodecError("cannot build a frequency table for zero symbols")
    m = 1 << prob_bits
    if np.count_nonzero(counts) > m:
        raise CodecError(f"{np.count_nonzero(counts)} distinct symbols exceed 2**{prob_bits}")
    freq = (counts.astype(np.int64) * m) // total
    freq[(counts > 0) & (freq == 0)] = 1
    diff = m - int(freq.sum())
    if diff > 0:
        freq[int(np.argmax(freq))] += diff
    while diff < 0:
        # Take from the largest frequencies (which lose least by it), one unit at a time per symbol.
        order = np.argsort(-freq, kind="stable")
        for s in order:
            if diff == 0 or freq[s] <= 1:
                break
            take = min(-diff, int(freq[s]) - 1, max(1, int(freq[s]) // 4))
            freq[s] -= take
            diff += take
    return freq.astype(np.uint32)


def _varint(v: int, out: bytearray) -> None:
    while True:
        byte = v & 0x7F
        v >>= 7
        if v:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def pack_table(freq: np.ndarray, prob_bits: int) -> bytes:
    """Compact serialisation of a normalised table (only the span of used symbols)."""
    used = np.flatnonzero(freq)
    first, last = int(used[0]), int(used[-1])
    out = bytearray((prob_bits, first, last - first))
    for f in freq[first:last + 1]:
        _varint(int(f), out)
    return bytes(out)


def unpack_table(blob: bytes, alphabet: int) -> tuple[np.ndarray, int]:
    """Parse and validate a table -> (freq uint32 (alphabet,), prob_bits)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) < 4:
        raise CodecError("rANS frequency table is missing or shorter than 4 bytes")
    blob = bytes(blob)
    prob_bits, first, count = blob[0], blob[1], blob[2] + 1
    if not MIN_PROB_BITS <= prob_bits <= MAX_PROB_BITS:
        raise CodecError(f"rANS table precision {prob_bits} bits outside "
                         f"[{MIN_PROB_BITS}, {MAX_PROB_BITS}]")
    if first + count > alphabet:
        raise CodecError(f"rANS table covers symbols {first}..{first + count - 1}, "
                         f"alphabet has {alphabet}")
    freq = np.zeros(alphabet, np.uint32)
    pos = 3
    for i in range(count):
        v, shift = 0, 0
        while True:
            if pos >= len(blob) or shift > 21:
                raise CodecError("rANS frequency table is truncated or has an oversized entry")
            b = blob[pos]
            pos += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        freq[first + i] = v
    if pos != len(blob):
        raise CodecError(f"rANS frequency table has {len(blob) - pos} trailing bytes")
    total = int(freq.sum(dtype=np.int64))
    if total != 1 << prob_bits:
        raise CodecError(f"rANS frequencies sum to {total}, expected 2**{prob_bits} = {1 << prob_bits}")
    return freq, prob_bits


@njit(cache=True, nogil=True)
def _encode_kernel(sym, freq, cum, prob_bits, buf):  # pragma: no cover - compiled
    # Division-free encoding with per-symbol reciprocals (ryg_rans' RansEncSymbol): for
    # x < 2**31, q = (x * rcp) >> shift equals x // freq exactly.
    n_sym = freq.shape[0]
    rcp = np.zeros(n_sym, np.uint64)
    shift = np.zeros(n_sym, np.uint64)
    bias = np.zeros(n_sym, np.uint64)
    cmpl = np.zeros(n_sym, np.uint64)
    x_max = np.zeros(n_sym, np.uint64)
    m = 1 << prob_bits
    for s in range(n_sym):
        f = np.int64(freq[s])
        if f == 0:
            continue
        x_max[s] = ((RANS_L >> prob_bits) << 8) * f
        cmpl[s] = m - f
        if f < 2:
            rcp[s] = 0xFFFFFFFF
            shift[s] = 32
            bias[s] = cum[s] + m - 1
        else:
            k = 0
            while f > (1 << k):
                k += 1
            rcp[s] = ((1 << (k + 31)) + f - 1) // f
            shift[s] = k - 1 + 32
            bias[s] = cum[s]
    xs = np.full(LANES, RANS_L, np.uint64)
    ptr = buf.shape[0]
    for i in range(sym.shape[0] - 1, -1, -1):
        s = sym[i]
        lane = i & (LANES - 1)
        x = xs[lane]
        while x >= x_max[s]:
            ptr -= 1
            buf[ptr] = np.uint8(x & np.uint64(0xFF))
            x >>= np.uint64(8)
        q = (x * rcp[s]) >> shift[s]
        xs[lane] = x + bias[s] + q * cmpl[s]
    for lane in range(LANES - 1, -1, -1):  # states: lane 0 first in the stream, big-endian
        x = xs[lane]
        for _ in range(4):
            ptr -= 1
            buf[ptr] = np.uint8(x & np.uint64(0xFF))
            x >>= np.uint64(8)
    return ptr


@njit(cache=True, nogil=True)
def _decode_kernel(data, n, freq, cum, lookup, prob_bits, out):  # pragma: no cover - compiled
    # The caller guarantees len(data) >= 4 * LANES; every later read is checked.
    xs = np.zeros(LANES, np.uint64)
    ptr = 0
    for lane in range(LANES):
        x = np.uint64(0)
        for _ in range(4):
            x = (x << np.uint64(8)) | np.uint64(data[ptr])
            ptr += 1
        xs[lane] = x
    size = data.shape[0]
    mask = np.uint64((1 << prob_bits) - 1)
    for i in range(n):
        lane = i & (LANES - 1)
        x = xs[lane]
        slot = x & mask
        s = lookup[slot]
        out[i] = s
        x = np.uint64(freq[s]) * (x >> np.uint64(prob_bits)) + slot - np.uint64(cum[s])
        while x < np.uint64(RANS_L):
            if ptr >= size:
                return -1
            x = (x << np.uint64(8)) | np.uint64(data[ptr])
            ptr += 1
        xs[lane] = x
    for lane in range(LANES):
        if xs[lane] != np.uint64(RANS_L):
            return -2
    if ptr != size:
        return -3
    return 0


@njit(cache=True, nogil=True)
def _count_kernel(sym, counts):  # pragma: no cover - compiled
    """Histogram of ``sym``; returns the largest symbol (the caller checks it)."""
    top = 0
    c4 = np.zeros((4, 256), np.int64)  # 4 interleaved copies: no store-load stalls on runs
    for i in range(sym.shape[0]):
        v = sym[i]
        c4[i & 3, v] += 1
        if v > top:
            top = v
    for v in range(counts.shape[0]):
        counts[v] = c4[0, v] + c4[1, v] + c4[2, v] + c4[3, v]
    return top


def _cum(freq: np.ndarray) -> np.ndarray:
    cum = np.zeros(freq.size, np.uint32)
    np.cumsum(freq[:-1], out=cum[1:])
    return cum


def encode(sym: np.ndarray, alphabet: int = 256, prob_bits: int = PROB_BITS,
           reference: bool = False) -> tuple[bytes, bytes]:
    """uint8 symbols (< ``alphabet``) -> (payload, table)."""
    sym = np.ascontiguousarray(sym, np.uint8).ravel()
    if sym.size == 0:
        raise CodecError("rANS needs at least one symbol")
    if not 1 <= alphabet <= 256:
        raise CodecError(f"alphabet must be 1..256 symbols, got {alphabet}")
    if reference:
        counts = np.bincount(sym, minlength=alphabet)
        top = counts.size - 1
    else:
        counts = np.zeros(alphabet, np.int64)
        top = _count_kernel(sym, counts)
    if top >= alphabet:
        raise CodecError(f"symbol {top} outside an alphabet of {alphabet}")
    freq = normalise(counts, prob_bits)
    if reference:
        return encode_reference(sym, freq, prob_bits), pack_table(freq, prob_bits)
    buf = np.empty(2 * sym.size + 4 * LANES, np.uint8)
    ptr = _encode_kernel(sym, freq, _cum(freq), prob_bits, buf)
    return buf[ptr:].tobytes(), pack_table(freq, prob_bits)


def decode(payload: bytes | memoryview | np.ndarray, table: bytes, n: int, alphabet: int = 256,
           reference: bool = False) -> np.ndarray:
    """Inverse of :func:`encode`: ``n`` symbols from ``payload`` with the serialised ``table``."""
    freq, prob_bits = unpack_table(table, alphabet)
    data = np.frombuffer(payload, np.uint8) if not isinstance(payload, np.ndarray) else payload
    if data.dtype != np.uint8 or data.ndim != 1:
        raise CodecError("rANS payload must be a flat byte buffer")
    if n < 1:
        raise CodecError(f"rANS symbol count must be >= 1, got {n}")
    if data.size < 4 * LANES:
        raise CodecError(f"rANS payload of {data.size} bytes is shorter than its "
                         f"{4 * LANES}-byte states")
    if data.size > 4 * LANES + 2 * n:
        raise CodecError(f"rANS payload of {data.size} bytes is too long for {n} symbols")
    for lane in range(LANES):
        state = int.from_bytes(data[4 * lane:4 * lane + 4].tobytes(), "big")
        if not RANS_L <= state < RANS_L << 8:
            raise CodecError(f"rANS initial state {state:#x} out of range (corrupt payload)")
    if reference:
        return decode_reference(data.tobytes(), n, freq, prob_bits)
    lookup = np.repeat(np.arange(alphabet, dtype=np.uint8), freq)
    out = np.empty(n, np.uint8)
    status = _decode_kernel(data, n, freq, _cum(freq), lookup, prob_bits, out)
    if status != _OK:
        raise CodecError(f"rANS decode failed: {_STATUS[status]}")
    return out


def encode_reference(sym: np.ndarray, freq: np.ndarray, prob_bits: int) -> bytes:
    """Pure-Python rANS encoder (the same bytes as the kernel)."""
    cum = _cum(freq).tolist()
    fr = freq.tolist()
    xs = [RANS_L] * LANES
    out = bytearray()
    syms = sym.tolist()
    for i in range(len(syms) - 1, -1, -1):
        s, lane = syms[i], i % LANES
        f = fr[s]
        x = xs[lane]
        x_max = ((RANS_L >> prob_bits) << 8) * f
        while x >= x_max:
            out.append(x & 0xFF)
            x >>= 8
        xs[lane] = ((x // f) << prob_bits) + x % f + cum[s]
    for lane in range(LANES - 1, -1, -1):
        out += xs[lane].to_bytes(4, "little")
    return bytes(reversed(out))


def decode_reference(data: bytes, n: int, freq: np.ndarray, prob_bits: int) -> np.ndarray:
    """Pure-Python rANS decoder."""
    cum = _cum(freq).tolist()
    fr = freq.tolist()
    lookup = np.repeat(np.arange(freq.size), freq).tolist()
    mask = (1 << prob_bits) - 1
    xs = [int.from_bytes(data[4 * k:4 * k + 4], "big") for k in range(LANES)]
    ptr = 4 * LANES
    out = np.empty(n, np.uint8)
    for i in range(n):
        x = xs[i % LANES]
        slot = x & mask
        s = lookup[slot]
        out[i] = s
        x = fr[s] * (x >> prob_bits) + slot - cum[s]
        while x < RANS_L:
            if ptr >= len(data):
                raise CodecError(f"rANS decode failed: {_STATUS[_SHORT]}")
            x = (x << 8) | data[ptr]
            ptr += 1
        xs[i % LANES] = x
    if any(x != RANS_L for x in xs):
        raise CodecError(f"rANS decode failed: {_STATUS[_BAD_STATE]}")
    if ptr != len(data):
        raise CodecError(f"rANS decode failed: {_STATUS[_TRAILING]}")
    return out


def warmup() -> None:
    """Compile both kernels on a short message."""
    sym = np.arange(64, dtype=np.uint8) % 5
    payload, table = encode(sym, 16)
    decode(payload, table, sym.size, 16)
