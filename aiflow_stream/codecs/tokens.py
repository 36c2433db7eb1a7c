"""Token reduction: keep the k most informative tokens (CLS always), scatter them back.

Scores are per-token L2 norm (``norm``) or distance from the mean token (``dev``: background
patches sit near the mean, objects stand out). The kept positions travel as a little-endian
bitmask of ``ceil(T / 8)`` bytes. Dropped positions are filled on the receiver with the mean of
the kept patch tokens (``mean``, free: computed from what arrived) or zeros (``zero``).
"""

from __future__ import annotations

import numpy as np

from aiflow_stream.errors import CodecError

SCORES: tuple[str, ...] = ("norm", "dev")
FILLS: tuple[str, ...] = ("mean", "zero")


def select(x: np.ndarray, k: int, by: str = "norm") -> np.ndarray:
    """Sorted indices of the ``k`` kept tokens of ``x`` (T, D); index 0 (CLS) is always kept."""
    t = x.shape[0]
    if k >= t:
        return np.arange(t)
    if by == "norm":
        score = np.einsum("td,td->t", x, x)
    elif by == "dev":
        d = x - x[1:].mean(axis=0) if t > 1 else x
        score = np.einsum("td,td->t", d, d)
    else:
        raise CodecError(f"token score must be one of {SCORES}, got {by!r}")
    if k <= 1:
        return np.zeros(1, np.int64)
    rest = np.argsort(-score[1:], kind="stable")[: k - 1] + 1
    return np.concatenate([[0], np.sort(rest)]).astype(np.int64)


def mask_bytes(keep: np.ndarray, t: int) -> bytes:
    mask = np.zeros(t, np.uint8)
    mask[keep] = 1
    return np.packbits(mask, bitorder="little").tobytes()


def mask_indices(blob: object, t: int) -> np.ndarray:
    """Validate a kept-positions bitmask for ``t`` tokens -> sorted indices."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) != (t + 7) // 8:
        raise CodecError(f"kept-token mask must be {(t + 7) // 8} bytes for {t} tokens")
    bits = np.unpackbits(np.frombuffer(bytes(blob), np.uint8), bitorder="little")
    if bits[t:].any():
        raise CodecError(f"kept-token mask marks positions beyond {t} tokens")
    keep = np.flatnonzero(bits[:t])
    if keep.size == 0:
        raise CodecError("kept-token mask keeps no token")
    return keep


def scatter(kept: np.ndarray, keep: np.ndarray, t: int, fill: str) -> np.ndarray:
    """(K, D) kept tokens -> (T, D), dropped positions filled per ``fill``."""
    d = kept.shape[1]
    if fill == "zero" or keep.size == t:
        out = np.zeros((t, d), np.float32)
    elif fill == "mean":
        patches = kept[keep != 0] if (keep != 0).any() else kept
        out = np.broadcast_to(patches.mean(axis=0, dtype=np.float32), (t, d)).copy()
    else:
        raise CodecError(f"fill must be one of {FILLS}, got {fill!r}")
    out[keep] = kept
    return out
