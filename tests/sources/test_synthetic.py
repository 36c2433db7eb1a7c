"""SyntheticSource: determinism, ground truth, scene-change schedule, pacing, splits."""

from __future__ import annotations

import time

import numpy as np
import pytest

from aiflow_stream import scenes as grammar
from aiflow_stream.errors import SourceError
from aiflow_stream.sources import Frame, Policy, SourceTimeout, SyntheticSource

SMALL = {"width": 192, "height": 108}


def drain(src: SyntheticSource, limit: int = 10_000) -> list[Frame]:
    out = []
    with src:
        for _ in range(limit):
            f = src.read(timeout=2.0)
            if f is None:
                return out
            out.append(f)
    raise AssertionError("stream did not end")


def test_same_seed_same_stream_other_seed_differs() -> None:
    kw = dict(SMALL, fps=10, frames=40, live=False, min_scene_s=0.5, max_scene_s=1.5)
    a, b = drain(SyntheticSource(seed=3, **kw)), drain(SyntheticSource(seed=3, **kw))
    c = drain(SyntheticSource(seed=4, **kw))
    assert len(a) == len(b) == 40
    for fa, fb in zip(a, b):
        assert fa.seq == fb.seq and fa.truth == fb.truth and fa.scene_change == fb.scene_change
        assert np.array_equal(fa.image, fb.image)
    assert SyntheticSource(seed=3, **kw).change_frames() == SyntheticSource(seed=3, **kw).change_frames()
    assert [f.truth for f in a] != [f.truth for f in c]
    # A frame re-rendered on its own equals the streamed one (pure function of seed and index).
    assert np.array_equal(SyntheticSource(seed=3, **kw).render_frame(17), a[17].image)


def test_frames_shape_dtype_seq_and_timestamps() -> None:
    t0 = time.time_ns()
    frames = drain(SyntheticSource(seed=1, frames=5, live=False))
    assert [f.seq for f in frames] == list(range(5))
    for f in frames:
        assert f.image.shape == (720, 1280, 3) and f.image.dtype == np.uint8
        assert t0 <= f.capture_ns <= time.time_ns()
    assert frames[0].scene_change  # the first frame starts the first scene
    assert frames[1].image.std() > 0 and not np.array_equal(frames[0].image, frames[1].image)


def test_scene_changes_spaced_within_bounds_and_flagged() -> None:
    fps, lo, hi = 10.0, 1.0, 2.5
    src = SyntheticSource(seed=11, fps=fps, frames=300, live=False, min_scene_s=lo,
                          max_scene_s=hi, noise=0, **SMALL)
    changes = src.change_frames()
    assert changes[0] == 0 and len(changes) >= 300 / (hi * fps)
    gaps = np.diff(changes)
    assert gaps.min() >= lo * fps and gaps.max() <= hi * fps
    assert len(set(gaps.tolist())) > 1  # really random, not a fixed period
    frames = drain(src)
    assert [f.seq for f in frames if f.scene_change] == changes
    truths = [f.truth for f in frames]
    assert [i for i in range(len(truths)) if i == 0 or truths[i] != truths[i - 1]] == changes
    assert SyntheticSource(seed=11, fps=fps, min_scene_s=lo, max_scene_s=hi).change_frames(300) == changes


def _colour_cells(image: np.ndarray) -> dict[int, set[str]]:
    """Which caption colours appear (as >= 40 near-exact pixels) in each cell of the 3x3 grid."""
    h, w = image.shape[:2]
    out: dict[int, set[str]] = {}
    for cell in range(9):
        r, c = divmod(cell, 3)
        patch = image[r * h // 3:(r + 1) * h // 3, c * w // 3:(c + 1) * w // 3].astype(np.int16)
        found = set()
        for name, rgb in grammar.COLOURS.items():
            near = np.abs(patch - np.asarray(rgb, np.int16)).max(axis=2) <= 24
            if near.sum() >= 40:
                found.add(name)
        out[cell] = found
    return out


def test_truth_matches_rendered_scene() -> None:
    src = SyntheticSource(seed=5, fps=10, frames=200, live=False, noise=0, width=384, height=216,
                          min_scene_s=1, max_scene_s=2)
    checked = 0
    for index in src.change_frames()[:8]:
        scene = src.scene_at(index)
        assert src.truth_at(index) == scene.caption
        want = {cell: set() for cell in range(9)}
        for shape in scene.shapes:
            want[shape.cell] = {shape.colour}
            assert shape.phrase() in scene.caption
        assert _colour_cells(src.render_frame(index)) == want
        checked += 1
    assert checked == 8


def test_heldout_split_is_default() -> None:
    src = SyntheticSource(seed=2, fps=10, min_scene_s=0.5, max_scene_s=0.5)
    truths = {src.truth_at(i) for i in src.change_frames(200)}
    assert len(truths) > 10 and all(grammar.is_heldout(t) for t in truths)
    train = SyntheticSource(seed=2, fps=10, min_scene_s=0.5, max_scene_s=0.5, split="train")
    assert not any(grammar.is_heldout(train.truth_at(i)) for i in train.change_frames(200))


def test_live_pacing_and_policy() -> None:
    fps, n = 40.0, 20
    src = SyntheticSource(seed=0, fps=fps, frames=n, **SMALL)
    assert src.policy is Policy.LATEST and SyntheticSource(live=False).policy is Policy.BLOCK
    start = time.monotonic()
    frames = drain(src)
    elapsed = time.monotonic() - start
    assert [f.seq for f in frames] == list(range(n))  # a fast reader misses nothing
    assert (n - 1) / fps * 0.9 <= elapsed <= (n - 1) / fps + 0.5
    gaps = np.diff([f.capture_ns for f in frames]) / 1e9
    assert np.median(gaps) == pytest.approx(1 / fps, abs=0.01)


def test_live_slow_reader_gets_fresh_frames() -> None:
    fps = 50.0
    with SyntheticSource(seed=0, fps=fps, frames=60, **SMALL) as src:
        seqs = []
        for _ in range(5):
            f = src.read(timeout=1.0)
            assert f is not None
            seqs.append(f.seq)
            time.sleep(0.1)  # five frame periods
    gaps = np.diff(seqs)
    assert gaps.min() >= 4  # frames due while the reader slept are skipped, not queued


def test_read_timeout_is_honoured() -> None:
    with SyntheticSource(seed=0, fps=2.0, **SMALL) as src:
        assert src.read(timeout=1.0) is not None
        start = time.monotonic()
        with pytest.raises(SourceTimeout):
            src.read(timeout=0.05)
        assert time.monotonic() - start < 0.3
        assert src.read(timeout=1.0) is not None  # still alive


def test_bad_options() -> None:
    for bad in ({"fps": 0}, {"split": "test"}, {"min_scene_s": 3, "max_scene_s": 2},
                {"frames": -1}, {"width": 4}):
        with pytest.raises(SourceError, match="synthetic"):
            SyntheticSource(**bad)
    with pytest.raises(ValueError, match="n_frames"):
        SyntheticSource().change_frames()
