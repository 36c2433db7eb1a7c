"""Token reduction: keep the k most informative tokens (CLS always), scatter them back.

Scores are per-token L2 norm (``norm``) or distance from the mean token (``dev``: background
patches sit near the mean, objects stand out). The kept positions travel as a little-endian
bitmask of ``ceil(T / 8)`` bytes. Dropped positions are filled on the receiver with the mean of
the kept patch tokens (``mean``, free: computed from what arrived) or zeros (``zero``), or, with
``merge=M``, the dropped tokens are merged into ``M`` centroids (k-means) that travel as extra
rows, each dropped position carrying its centroid index (a few bits).
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


def merge(dropped: np.ndarray, m: int, iters: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """k-means of ``dropped`` (N, D) into ``min(m, N)`` centroids -> (centroids, uint8 labels).

    Deterministic: centroids start at tokens evenly spaced in norm order.
    """
    n = dropped.shape[0]
    m = min(m, n)
    order = np.argsort(np.einsum("td,td->t", dropped, dropped), kind="stable")
    cents = dropped[order[(np.arange(m) * n) // m]].astype(np.float32)
    labels = np.zeros(n, np.uint8)
    sq = np.einsum("td,td->t", dropped, dropped)[:, None]
    for _ in range(iters):
        dist = sq - 2.0 * dropped @ cents.T + np.einsum("md,md->m", cents, cents)[None, :]
        labels = np.argmin(dist, axis=1).astype(np.uint8)
        for c in range(m):
            members = labels == c
            if members.any():
                cents[c] = dropped[members].mean(axis=0)
    return cents, labels


def label_bits(m: int) -> int:
    """Bits per centroid index for ``m`` centroids (a width the bit packer supports)."""
    return next(b for b in (1, 2, 4, 8) if m <= 1 << b)
