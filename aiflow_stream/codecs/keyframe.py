"""Key-frame selectors: decide, frame by frame, which frames are worth encoding and sending.

:class:`KeyframeSelector` scores each frame against the previous one with the fused change
kernel (:mod:`aiflow_stream.codecs.change`), combines the four features into one score and
applies a threshold, a minimum gap (a change seen inside it is kept pending, not lost), a
maximum gap (periodic refresh) and, optionally, an adaptive threshold that holds a target
key-frame rate. :meth:`KeyframeSelector.confirm` is an optional second check on the encoder's
features (cosine distance to the last sent key frame). :class:`EveryNth` is the simplest
honest baseline with the same interface.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from aiflow_stream.codecs import change as _change
from aiflow_stream.errors import CodecError

log = logging.getLogger(__name__)

REASONS: tuple[str, ...] = ("first", "change", "refresh", "skip", "gap", "resize")


@dataclass(frozen=True)
class Decision:
    """The verdict on one frame. ``reason`` is ``first``, ``change``, ``refresh`` or ``resize``
    for a key frame, ``skip`` (no change) or ``gap`` (change held back by ``min_gap``) otherwise.
    ``features`` are the raw change features (see ``change.FEATURE_NAMES``)."""

    is_key: bool
    score: float
    reason: str
    features: tuple[float, ...] = ()


@dataclass(frozen=True)
class KeyframeConfig:
    """Selector settings. Gaps are in frames.

    ``score = sum(weights * [changed, max_cell, edges, hist])``; a frame is a candidate when the
    score reaches ``threshold``, or in adaptive mode the running ``1 - target_rate`` quantile of
    the last ``window`` scores (never below ``min_threshold``, so a static scene is not padded
    with noise frames), which holds the key-frame rate near ``target_rate``.
    """

    threshold: float = 0.4
    weights: tuple[float, float, float, float] = (2.0, 0.5, 0.1, 2.0)
    min_gap: int = 2
    max_gap: int = 150
    adaptive: bool = False
    target_rate: float = 0.05
    min_threshold: float = 0.05
    window: int = 300
    step: int = 4
    grid: tuple[int, int] = (16, 9)
    diff_thr: int = 25
    edge_thr: int = 48
    feature_threshold: float | None = None

    def __post_init__(self) -> None:
        if len(self.weights) != _change.N_FEATURES:
            raise CodecError(f"weights needs {_change.N_FEATURES} values, got {len(self.weights)}")
        if not 1 <= self.min_gap <= self.max_gap:
            raise CodecError(f"need 1 <= min_gap <= max_gap, got {self.min_gap}, {self.max_gap}")
        if not 0.0 < self.target_rate <= 1.0:
            raise CodecError(f"target_rate must be in (0, 1], got {self.target_rate}")
        if self.window < 10:
            raise CodecError(f"window must be >= 10 frames, got {self.window}")


class KeyframeSelector:
    """Stateful per-stream selector: ``update(frame)`` for every captured RGB uint8 frame."""

    def __init__(self, config: KeyframeConfig | None = None) -> None:
        self.config = config or KeyframeConfig()
        self._weights = np.asarray(self.config.weights, np.float64)
        self._prev: _change.ChangeState | None = None
        self._cur: _change.ChangeState | None = None
        self._since_key = 0
        self._pending = False
        self._scores: deque[float] = deque(maxlen=self.config.window)
        self._last_feat: np.ndarray | None = None
        self.frames = 0
        self.keys = 0

    @staticmethod
    def warmup() -> None:
        """Compile the change kernel (call from the operator's ``setup``)."""
        _change.warmup()

    def reset(self) -> None:
        """Forget the stream (the next frame is a ``first`` key frame)."""
        self._prev = self._cur = None
        self._pending = False
        self._scores.clear()
        self._last_feat = None

    def current_threshold(self) -> float:
        """The threshold in force now (the adaptive one when ``adaptive`` is set)."""
        cfg = self.config
        if not cfg.adaptive or len(self._scores) < 10:
            return cfg.threshold
        q = float(np.quantile(np.fromiter(self._scores, np.float64), 1.0 - cfg.target_rate))
        return max(q, cfg.min_threshold)

    def update(self, frame: np.ndarray) -> Decision:
        """Score ``frame`` (H, W, 3 uint8) against the previous frame and decide."""
        cfg = self.config
        self.frames += 1
        if self._prev is None or self._prev.frame_shape != frame.shape:
            reason = "first" if self._prev is None else "resize"
            self._prev = _change.new_state(frame.shape, cfg.step, cfg.grid)
            self._cur = _change.new_state(frame.shape, cfg.step, cfg.grid)
            _change.change_features(frame, self._prev, self._cur, cfg.diff_thr, cfg.edge_thr)
            self._prev, self._cur = self._cur, self._prev
            return self._key(reason, 1.0, ())
        assert self._cur is not None
        feats = _change.change_features(frame, self._prev, self._cur, cfg.diff_thr, cfg.edge_thr)
        self._prev, self._cur = self._cur, self._prev
        score = float(self._weights @ feats)
        thr = self.current_threshold()
        self._scores.append(score)
        self._since_key += 1
        ftuple = tuple(float(v) for v in feats)
        if score >= thr:
            self._pending = True
        if self._pending and self._since_key >= cfg.min_gap:
            return self._key("change", score, ftuple)
        if self._since_key >= cfg.max_gap:
            return self._key("refresh", score, ftuple)
        return Decision(False, score, "gap" if self._pending else "skip", ftuple)

    def _key(self, reason: str, score: float, feats: tuple[float, ...]) -> Decision:
        self._since_key = 0
        self._pending = False
        self.keys += 1
        return Decision(True, score, reason, feats)

    def confirm(self, features: np.ndarray, decision: Decision | None = None) -> bool:
        """Second check on encoder features (T, D) of a key frame: send it only if its mean
        token is at least ``feature_threshold`` (cosine distance) away from the last one sent.
        ``first``/``refresh``/``resize`` key frames always pass. Call only for frames sent on."""
        thr = self.config.feature_threshold
        f = np.asarray(features, np.float32).reshape(-1, np.shape(features)[-1]).mean(axis=0)
        forced = decision is not None and decision.reason != "change"
        if thr is None or forced or self._last_feat is None:
            self._last_feat = f
            return True
        dist = cosine_distance(f, self._last_feat)
        if dist < thr:
            log.debug("key frame suppressed: cosine distance %.4f < %.4f", dist, thr)
            return False
        self._last_feat = f
        return True


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``1 - cos(a, b)`` of two vectors (0 for identical directions; 1 if either is zero)."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0
    return 1.0 - float(np.dot(a, b)) / (na * nb)


class EveryNth:
    """Keep every ``n``-th frame (the first one included): the baseline selector."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise CodecError(f"n must be >= 1, got {n}")
        self.n = n
        self.frames = 0
        self.keys = 0

    @staticmethod
    def warmup() -> None:
        """Nothing to compile; here so both selectors share one interface."""

    def reset(self) -> None:
        self.frames = 0

    def update(self, frame: np.ndarray) -> Decision:
        first = self.frames == 0
        is_key = self.frames % self.n == 0
        self.frames += 1
        self.keys += int(is_key)
        reason = "first" if first else ("refresh" if is_key else "skip")
        return Decision(is_key, 1.0 if is_key else 0.0, reason)

    def confirm(self, features: np.ndarray, decision: Decision | None = None) -> bool:
        return True
