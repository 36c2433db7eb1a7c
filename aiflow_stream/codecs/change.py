"""Cheap change features between consecutive frames, in one fused Numba pass.

Computed on a point-subsampled copy of the frame (every ``step``-th pixel of every ``step``-th
row), as Reducto does on cameras, so a 1280x720 frame costs a 320x180 pass:

- ``changed``: fraction of pixels whose luma moved by more than ``diff_thr``;
- ``max_cell``: the largest such fraction over the cells of a coarse ``grid`` (a small object
  that changes a lot shows up here even when ``changed`` is tiny);
- ``edges``: Jaccard distance between the two edge maps (``|gx| + |gy| > edge_thr``, central
  differences with reflect-101 borders, i.e. ``cv2.Sobel(ksize=1)``);
- ``hist``: L1/2 distance between 4x4x4 RGB histograms (``1 - intersection``), in [0, 1].

Luma uses OpenCV's fixed-point RGB->gray weights, so the OpenCV chain in ``bench/keyframe.py``
reproduces these numbers. :func:`change_features_reference` computes the same numbers with numpy.
The kernel is single-threaded (the runtime gives one thread per stage) and releases the GIL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit

from aiflow_stream.errors import CodecError

N_FEATURES = 4
FEATURE_NAMES: tuple[str, ...] = ("changed", "max_cell", "edges", "hist")
HIST_BINS = 64  # 4 x 4 x 4 RGB


@njit(cache=True, nogil=True, fastmath=True)
def _edge_row(luma, edge, prev_edge, r, edge_thr):  # pragma: no cover - compiled
    """Edge bits of row ``r`` (needs rows r-1..r+1 of ``luma``); returns (xor, or) counts."""
    h, w = luma.shape
    cur = luma[r]
    edge_row = r == 0 or r == h - 1  # reflect-101 borders: gy = 0 on the first/last row
    up = cur if edge_row else luma[r - 1]
    dn = cur if edge_row else luma[r + 1]
    erow = edge[r]
    prow = prev_edge[r]
    n_xor = 0
    n_or = 0
    for x in (0, w - 1) if w > 1 else (0, 0):  # first and last column: gx = 0 (reflect-101)
        e = np.uint8(abs(np.int32(dn[x]) - np.int32(up[x])) > edge_thr)
        erow[x] = e
        n_xor += np.int32(e ^ prow[x])
        n_or += np.int32(e | prow[x])
    if w == 1:  # the single column was counted twice
        n_xor //= 2
        n_or //= 2
    for x in range(1, w - 1):  # interior: branch-free, vectorisable
        gx = abs(np.int32(cur[x + 1]) - np.int32(cur[x - 1]))
        gy = abs(np.int32(dn[x]) - np.int32(up[x]))
        e = np.uint8(gx + gy > edge_thr)
        erow[x] = e
        n_xor += np.int32(e ^ prow[x])
        n_or += np.int32(e | prow[x])
    return n_xor, n_or


@njit(cache=True, nogil=True, fastmath=True)
def _change_kernel(frame, step, prev_luma, prev_edge, prev_hist, luma, edge, hist, cells,
                   diff_thr, edge_thr, out):  # pragma: no cover - compiled
    # Per row: one strided pass over the frame (luma + histogram), then short contiguous passes
    # over the subsampled row (change mask, edges of the row above) that LLVM vectorises.
    h, w = luma.shape
    gh, gw = cells.shape
    hist4 = np.zeros(4 * HIST_BINS, np.int32)  # 4 interleaved copies: no store-load stalls
    colsum = np.zeros(w, np.int32)  # changed pixels per column within the current band of cells
    cells[:] = 0
    changed = 0
    n_xor = 0
    n_or = 0
    for y in range(h):
        row = frame[y * step]
        lrow = luma[y]
        for x in range(w):
            sx = x * step
            r = np.int32(row[sx, 0])
            g = np.int32(row[sx, 1])
            b = np.int32(row[sx, 2])
            lrow[x] = (4899 * r + 9617 * g + 1868 * b + 8192) >> 14
            hist4[(((r >> 6) << 4) | ((g >> 6) << 2) | (b >> 6)) * 4 + (x & 3)] += 1
        prow = prev_luma[y]
        for x in range(w):
            d = np.int32(lrow[x]) - np.int32(prow[x])
            colsum[x] += np.int32(abs(d) > diff_thr)
        cy = y * gh // h
        if y == h - 1 or (y + 1) * gh // h != cy:  # last row of this band of cells
            for cx in range(gw):
                s = 0
                for x in range((cx * w + gw - 1) // gw, ((cx + 1) * w + gw - 1) // gw):
                    s += colsum[x]
                    colsum[x] = 0
                cells[cy, cx] = s
                changed += s
        if y >= 1:  # edges lag one row behind: row y-1 needs row y
            a, o = _edge_row(luma, edge, prev_edge, y - 1, edge_thr)
            n_xor += a
            n_or += o
    a, o = _edge_row(luma, edge, prev_edge, h - 1, edge_thr)
    n_xor += a
    n_or += o
    # Largest fraction over grid cells (cells may differ by a row/column when sizes don't divide).
    best = 0.0
    for cy in range(gh):
        rows = (((cy + 1) * h + gh - 1) // gh) - ((cy * h + gh - 1) // gh)
        for cx in range(gw):
            cols = (((cx + 1) * w + gw - 1) // gw) - ((cx * w + gw - 1) // gw)
            area = rows * cols
            if area > 0:
                f = cells[cy, cx] / area
                if f > best:
                    best = f
    inter = 0
    for i in range(HIST_BINS):
        v = hist4[4 * i] + hist4[4 * i + 1] + hist4[4 * i + 2] + hist4[4 * i + 3]
        hist[i] = v
        inter += min(v, prev_hist[i])
    n = h * w
    out[0] = changed / n
    out[1] = best
    out[2] = n_xor / n_or if n_or > 0 else 0.0
    out[3] = 1.0 - inter / n


@dataclass
class ChangeState:
    """Per-stream buffers of the previous frame (subsampled luma, edge bits, histogram)."""

    luma: np.ndarray
    edge: np.ndarray
    hist: np.ndarray
    cells: np.ndarray
    step: int
    frame_shape: tuple[int, int, int] = field(default=(0, 0, 0))


def small_shape(height: int, width: int, step: int) -> tuple[int, int]:
    """Size of the point-subsampled frame (``frame[::step, ::step]``)."""
    return (height + step - 1) // step, (width + step - 1) // step


def new_state(frame_shape: tuple[int, ...], step: int = 4, grid: tuple[int, int] = (16, 9)) -> ChangeState:
    """Empty buffers for frames of ``frame_shape`` (H, W, 3); ``grid`` is (columns, rows)."""
    if len(frame_shape) != 3 or frame_shape[2] != 3:
        raise CodecError(f"expected an RGB frame (H, W, 3), got shape {tuple(frame_shape)}")
    if step < 1:
        raise CodecError(f"step must be >= 1, got {step}")
    h, w = small_shape(frame_shape[0], frame_shape[1], step)
    gw, gh = grid
    if not (1 <= gw <= w and 1 <= gh <= h):
        raise CodecError(f"grid {grid} does not fit a {w}x{h} subsampled frame")
    return ChangeState(
        luma=np.zeros((h, w), np.uint8),
        edge=np.zeros((h, w), np.uint8),
        hist=np.zeros(HIST_BINS, np.int64),
        cells=np.zeros((gh, gw), np.int64),
        step=step,
        frame_shape=(int(frame_shape[0]), int(frame_shape[1]), 3),
    )


def change_features(frame: np.ndarray, prev: ChangeState, cur: ChangeState,
                    diff_thr: int = 25, edge_thr: int = 48) -> np.ndarray:
    """Features of ``frame`` against the frame held in ``prev``; fills ``cur`` with ``frame``'s.

    Returns float64 ``[changed, max_cell, edges, hist]``. The caller swaps ``prev``/``cur``.
    """
    if frame.dtype != np.uint8 or frame.shape != prev.frame_shape or frame.shape != cur.frame_shape:
        raise CodecError(
            f"frame must be uint8 {prev.frame_shape}, got {frame.dtype} {frame.shape}")
    if prev.luma.shape != cur.luma.shape or prev.step != cur.step:
        raise CodecError("prev and cur change states were made for different frames")
    out = np.empty(N_FEATURES, np.float64)
    _change_kernel(frame, cur.step, prev.luma, prev.edge, prev.hist, cur.luma, cur.edge,
                   cur.hist, cur.cells, int(diff_thr), int(edge_thr), out)
    return out


def change_features_reference(frame: np.ndarray, prev_frame: np.ndarray, step: int = 4,
                              grid: tuple[int, int] = (16, 9), diff_thr: int = 25,
                              edge_thr: int = 48) -> np.ndarray:
    """numpy version of :func:`change_features` (the same numbers, ~30x slower)."""
    def luma(f: np.ndarray) -> np.ndarray:
        s = f[::step, ::step].astype(np.int32)
        return (4899 * s[..., 0] + 9617 * s[..., 1] + 1868 * s[..., 2] + 8192) >> 14

    def edges(lum: np.ndarray) -> np.ndarray:
        gx = np.zeros_like(lum)
        gy = np.zeros_like(lum)
        gx[:, 1:-1] = lum[:, 2:] - lum[:, :-2]
        gy[1:-1, :] = lum[2:, :] - lum[:-2, :]
        return (np.abs(gx) + np.abs(gy)) > edge_thr

    def hist(f: np.ndarray) -> np.ndarray:
        s = f[::step, ::step].astype(np.int64) >> 6
        return np.bincount((s[..., 0] * 16 + s[..., 1] * 4 + s[..., 2]).ravel(), minlength=HIST_BINS)

    lc, lp = luma(frame), luma(prev_frame)
    h, w = lc.shape
    gw, gh = grid
    mask = np.abs(lc - lp) > diff_thr
    rows = np.arange(h) * gh // h
    cols = np.arange(w) * gw // w
    counts = np.zeros((gh, gw), np.int64)
    np.add.at(counts, (rows[:, None].repeat(w, 1), cols[None, :].repeat(h, 0)), mask)
    area = np.bincount(rows, minlength=gh)[:, None] * np.bincount(cols, minlength=gw)[None, :]
    ec, ep = edges(lc), edges(lp)
    n_or = int((ec | ep).sum())
    hc, hp = hist(frame), hist(prev_frame)
    return np.array([
        mask.mean(),
        (counts / np.maximum(area, 1)).max(),
        (ec ^ ep).sum() / n_or if n_or else 0.0,
        1.0 - np.minimum(hc, hp).sum() / (h * w),
    ])


def warmup() -> None:
    """Compile the kernel on a dummy frame so the first real frame is not slow."""
    frame = np.zeros((16, 16, 3), np.uint8)
    a, b = new_state(frame.shape, 2, (2, 2)), new_state(frame.shape, 2, (2, 2))
    change_features(frame, a, b)
