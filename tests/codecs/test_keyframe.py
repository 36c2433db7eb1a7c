"""Key-frame selectors on a small synthetic feed with known scene changes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aiflow_stream import scenes as S
from aiflow_stream.codecs import Decision, EveryNth, KeyframeConfig, KeyframeSelector
from aiflow_stream.errors import CodecError

W, H = 320, 180


def feed(n: int, seed: int = 3, fps: int = 30):
    """(frame, changed) pairs: a new scene every 1-2 s, noise, sinusoidal motion."""
    rng = np.random.default_rng(seed)
    it = S.scenes(seed, "any")
    bank = S.noise_bank(H, W, 6.0 * 0.5, count=3, seed=seed)  # noise std scales ~1/2 at 1/4 size
    scene, nxt = next(it), int(rng.uniform(1, 2) * fps)
    for i in range(n):
        changed = i == nxt
        if changed:
            scene, nxt = next(it), i + int(rng.uniform(1, 2) * fps)
        m = (math.sin(i / 40.0), math.sin(i / 55.0 + 1.0))
        yield S.render(scene, W, H, noise_bank=bank, motion=m, rng=rng), changed


def run(sel, n: int = 300):
    keys, changes, decisions = [], [], []
    for i, (frame, changed) in enumerate(feed(n)):
        d = sel.update(frame)
        decisions.append(d)
        if d.is_key:
            keys.append(i)
        if changed:
            changes.append(i)
    return keys, changes, decisions


def test_selector_catches_every_change_and_keeps_few_frames():
    sel = KeyframeSelector(KeyframeConfig(step=2, max_gap=90))
    keys, changes, decisions = run(sel)
    assert len(changes) >= 6
    k = np.asarray(keys)
    for c in changes:
        assert ((k >= c) & (k <= c + 3)).any(), f"change at frame {c} missed; keys {keys}"
    assert len(keys) / 300 <= 0.15
    assert decisions[0].reason == "first" and decisions[0].is_key
    assert {d.reason for d in decisions if d.is_key} <= {"first", "change", "refresh"}
    # every key frame apart from refreshes follows a real change
    assert sum(d.reason == "change" for d in decisions) <= len(changes) + 2


def test_min_gap_defers_a_change_instead_of_dropping_it():
    sel = KeyframeSelector(KeyframeConfig(step=2, min_gap=3, max_gap=1000))
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    b = 255 - a
    got = [sel.update(f) for f in (a, a, b, a, a, a, a)]
    # frame 2 changes (gap 2 < 3: held back), frame 3 is the first allowed key frame
    assert [d.is_key for d in got] == [True, False, False, True, False, False, False]
    assert got[2].reason == "gap" and got[3].reason == "change"


def test_max_gap_refreshes_a_static_scene():
    sel = KeyframeSelector(KeyframeConfig(step=2, max_gap=10))
    f = np.full((H, W, 3), 80, np.uint8)
    got = [sel.update(f) for _ in range(31)]
    assert [i for i, d in enumerate(got) if d.is_key] == [0, 10, 20, 30]
    assert all(d.reason == "refresh" for d in got[10::10])


def test_adaptive_mode_holds_the_target_rate():
    sel = KeyframeSelector(KeyframeConfig(step=2, adaptive=True, target_rate=0.1, window=60,
                                          min_threshold=0.0, max_gap=1000))
    rng = np.random.default_rng(0)
    base = rng.integers(0, 200, (H, W, 3), dtype=np.uint8)
    keys = 0
    for _ in range(300):
        f = base + rng.integers(0, 40, (H, W, 3), dtype=np.uint8)  # noise only: score noise
        keys += sel.update(f).is_key
    assert 0.05 <= keys / 300 <= 0.16


def test_every_nth_and_confirm():
    sel = EveryNth(4)
    f = np.zeros((8, 8, 3), np.uint8)
    got = [sel.update(f).is_key for _ in range(9)]
    assert got == [True, False, False, False, True, False, False, False, True]
    ks = KeyframeSelector(KeyframeConfig(feature_threshold=0.05))
    feats = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    change = Decision(True, 1.0, "change")
    assert ks.confirm(feats, change)  # nothing sent yet
    assert not ks.confirm(feats * 1.01, change)  # same direction: suppressed
    assert ks.confirm(feats * 1.01, Decision(True, 1.0, "refresh"))  # refresh always passes
    assert ks.confirm(-feats, change)


def test_bad_config_raises():
    with pytest.raises(CodecError):
        KeyframeConfig(min_gap=5, max_gap=2)
    with pytest.raises(CodecError):
        KeyframeConfig(weights=(1.0, 1.0))
    with pytest.raises(CodecError):
        EveryNth(0)
