"""Affine quantization of feature rows to 8/4/2-bit symbols, and bit packing.

Each row (a token, or a channel when quantizing per channel) gets its own ``lo`` and ``scale``
stored as float16; symbols are ``round((x - lo) / scale)`` clipped to ``[0, 2**bits - 1]``.
The float16 parameters are fixed *before* quantizing (``lo`` rounded down, ``scale`` up), so the
receiver reconstructs exactly what the sender computed. Kernels and numpy references produce
identical symbols and values (plain IEEE arithmetic, no fastmath).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from aiflow_stream.errors import CodecError

BITS: tuple[int, ...] = (1, 2, 4, 8)
RESIDUAL_CLIP = 127.0


@njit(cache=True, nogil=True)
def _minmax_kernel(x, mn, mx):  # pragma: no cover - compiled
    for i in range(x.shape[0]):
        lo = x[i, 0]
        hi = x[i, 0]
        for j in range(1, x.shape[1]):
            v = x[i, j]
            lo = min(lo, v)
            hi = max(hi, v)
        mn[i] = lo
        mx[i] = hi


def affine_params(x: np.ndarray, bits: int, reference: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-row float16 ``lo`` (<= row min) and ``scale`` (>= range / levels, > 0)."""
    levels = (1 << bits) - 1
    if reference:
        mn, mx = x.min(axis=1), x.max(axis=1)
    else:
        mn, mx = np.empty(x.shape[0], np.float32), np.empty(x.shape[0], np.float32)
        _minmax_kernel(x, mn, mx)
    with np.errstate(over="ignore", invalid="ignore"):
        lo = mn.astype(np.float16)
        low = lo.astype(np.float32) > mn
        lo[low] = np.nextafter(lo[low], np.float16(-np.inf))
        span = (mx - lo.astype(np.float32)) / np.float32(levels)
        scale = span.astype(np.float16)
    short = scale.astype(np.float32) < span
    scale[short] = np.nextafter(scale[short], np.float16(np.inf))
    scale[scale <= 0] = np.float16(1.0)  # constant rows: any positive scale decodes to lo
    if not (np.isfinite(lo).all() and np.isfinite(scale).all()):
        raise CodecError("features exceed the float16 range; cannot quantize (use fp32)")
    return lo, scale


@njit(cache=True, nogil=True)
def _quantize_kernel(x, lo, scale, levels, q):  # pragma: no cover - compiled
    rows, cols = x.shape
    for i in range(rows):
        base = np.float64(lo[i])
        s = np.float64(scale[i])
        for j in range(cols):
            v = np.floor((np.float64(x[i, j]) - base) / s + 0.5)
            if v < 0.0:
                v = 0.0
            elif v > levels:
                v = levels
            q[i, j] = np.uint8(v)


@njit(cache=True, nogil=True)
def _dequantize_kernel(q, lo, scale, out):  # pragma: no cover - compiled
    rows, cols = q.shape
    for i in range(rows):
        base = np.float32(lo[i])
        s = np.float32(scale[i])
        for j in range(cols):
            out[i, j] = base + np.float32(q[i, j]) * s


def _rows(x: np.ndarray, per: str) -> np.ndarray:
    if per == "token":
        return x
    if per == "channel":
        return np.ascontiguousarray(x.T)
    raise CodecError(f"quantization axis must be 'token' or 'channel', got {per!r}")


def quantize(x: np.ndarray, bits: int, per: str = "token", reference: bool = False
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``x`` (R, C) float32 -> (symbols uint8 (R, C), lo fp16, scale fp16) per row or column."""
    if bits not in BITS:
        raise CodecError(f"bits must be one of {BITS}, got {bits}")
    rows = _rows(np.ascontiguousarray(x, np.float32), per)
    lo, scale = affine_params(rows, bits, reference)
    levels = (1 << bits) - 1
    if reference:
        v = (rows.astype(np.float64) - lo.astype(np.float64)[:, None]) / scale.astype(np.float64)[:, None]
        q = np.clip(np.floor(v + 0.5), 0, levels).astype(np.uint8)
    else:
        q = np.empty(rows.shape, np.uint8)
        _quantize_kernel(rows, lo.astype(np.float32), scale.astype(np.float32), float(levels), q)
    return (q if per == "token" else np.ascontiguousarray(q.T)), lo, scale


def dequantize(q: np.ndarray, lo: np.ndarray, scale: np.ndarray, per: str = "token",
               reference: bool = False) -> np.ndarray:
    """Inverse of :func:`quantize` (float32, same shape as ``q``)."""
    rows = _rows(q, per)
    if lo.shape != (rows.shape[0],) or scale.shape != lo.shape:
        raise CodecError(f"{rows.shape[0]} quantization rows but {lo.size} offsets and "
                         f"{scale.size} scales")
    if reference:
        out = lo.astype(np.float32)[:, None] + rows.astype(np.float32) * scale.astype(np.float32)[:, None]
    else:
        out = np.empty(rows.shape, np.float32)
        _dequantize_kernel(rows, lo.astype(np.float32), scale.astype(np.float32), out)
    return out if per == "token" else np.ascontiguousarray(out.T)


@njit(cache=True, nogil=True)
def _residual_kernel(r, scale, q):  # pragma: no cover - compiled
    rows, cols = r.shape
    for i in range(rows):
        s = np.float64(scale[i])
        for j in range(cols):
            v = np.floor(np.float64(r[i, j]) / s + 0.5)
            if v < -RESIDUAL_CLIP:
                v = -RESIDUAL_CLIP
            elif v > RESIDUAL_CLIP:
                v = RESIDUAL_CLIP
            q[i, j] = np.uint8(v + 128.0)


@njit(cache=True, nogil=True)
def _unresidual_kernel(q, scale, out):  # pragma: no cover - compiled
    rows, cols = q.shape
    for i in range(rows):
        s = np.float32(scale[i])
        for j in range(cols):
            out[i, j] = np.float32(np.int32(q[i, j]) - 128) * s


def quantize_residual(r: np.ndarray, scale: np.ndarray, per: str = "token",
                      reference: bool = False) -> np.ndarray:
    """Residual (R, C) -> zero-centred symbols ``round(r / scale) + 128`` (clipped to +-127
    steps), with the *intra* step ``scale`` of each row: the same precision as an intra frame,
    but near-static content maps to a few symbols around 128 that rANS codes in well under a bit."""
    rows = _rows(np.ascontiguousarray(r, np.float32), per)
    if scale.shape != (rows.shape[0],):
        raise CodecError(f"{rows.shape[0]} rows but {scale.size} scales")
    if reference:
        v = np.floor(rows.astype(np.float64) / scale.astype(np.float64)[:, None] + 0.5)
        q = (np.clip(v, -RESIDUAL_CLIP, RESIDUAL_CLIP) + 128).astype(np.uint8)
    else:
        q = np.empty(rows.shape, np.uint8)
        _residual_kernel(rows, scale.astype(np.float32), q)
    return q if per == "token" else np.ascontiguousarray(q.T)


def dequantize_residual(q: np.ndarray, scale: np.ndarray, per: str = "token",
                        reference: bool = False) -> np.ndarray:
    """Inverse of :func:`quantize_residual`."""
    rows = _rows(q, per)
    if scale.shape != (rows.shape[0],):
        raise CodecError(f"{rows.shape[0]} quantization rows but {scale.size} scales")
    if reference:
        out = (rows.astype(np.int32) - 128).astype(np.float32) * scale.astype(np.float32)[:, None]
    else:
        out = np.empty(rows.shape, np.float32)
        _unresidual_kernel(rows, scale.astype(np.float32), out)
    return out if per == "token" else np.ascontiguousarray(out.T)


@njit(cache=True, nogil=True)
def _pack_kernel(q, bits, out):  # pragma: no cover - compiled
    per = 8 // bits
    out[:] = 0
    for i in range(q.shape[0]):
        out[i // per] |= np.uint8(q[i] << ((i % per) * bits))


@njit(cache=True, nogil=True)
def _unpack_kernel(buf, bits, n, out):  # pragma: no cover - compiled
    per = 8 // bits
    mask = (1 << bits) - 1
    for i in range(n):
        out[i] = (buf[i // per] >> ((i % per) * bits)) & mask


def packed_size(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack(q: np.ndarray, bits: int, reference: bool = False) -> np.ndarray:
    """Symbols (< 2**bits) -> bytes, ``8 // bits`` per byte, low bits first."""
    if bits not in BITS:
        raise CodecError(f"bits must be one of {BITS}, got {bits}")
    flat = np.ascontiguousarray(q, np.uint8).ravel()
    if bits == 8:
        return flat.copy()
    if reference:
        per = 8 // bits
        pad = np.zeros(-flat.size % per, np.uint8)
        groups = np.concatenate([flat, pad]).reshape(-1, per).astype(np.uint8)
        shifts = (np.arange(per, dtype=np.uint8) * bits)[None, :]
        return np.bitwise_or.reduce(groups << shifts, axis=1).astype(np.uint8)
    out = np.empty(packed_size(flat.size, bits), np.uint8)
    _pack_kernel(flat, bits, out)
    return out


def unpack(buf: np.ndarray, bits: int, n: int, reference: bool = False) -> np.ndarray:
    """Inverse of :func:`pack`; ``buf`` must hold exactly ``packed_size(n, bits)`` bytes."""
    if bits not in BITS:
        raise CodecError(f"bits must be one of {BITS}, got {bits}")
    if n < 0 or buf.size != packed_size(n, bits):
        raise CodecError(f"{n} symbols of {bits} bits need {packed_size(max(n, 0), bits)} bytes, "
                         f"payload has {buf.size}")
    if bits == 8:
        return buf.copy()
    if reference:
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint8) * bits)[None, :]
        return ((buf[:, None] >> shifts) & ((1 << bits) - 1)).astype(np.uint8).ravel()[:n]
    out = np.empty(n, np.uint8)
    _unpack_kernel(buf, bits, n, out)
    return out


def warmup() -> None:
    """Compile the kernels on a dummy array."""
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(4, 8)
    for bits in (2, 4):
        q, lo, s = quantize(x, bits)
        dequantize(q, lo, s)
        unpack(pack(q, bits), bits, q.size)
        dequantize_residual(quantize_residual(x, s), s)
