"""The fused change kernel against its numpy reference and on rendered scenes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiflow_stream import scenes as S
from aiflow_stream.codecs import change as C
from aiflow_stream.errors import CodecError


def _kernel_pair(f0: np.ndarray, f1: np.ndarray, step: int, grid: tuple[int, int]) -> np.ndarray:
    a, b = C.new_state(f0.shape, step, grid), C.new_state(f0.shape, step, grid)
    C.change_features(f0, a, b)
    return C.change_features(f1, b, a)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(3, 40), w=st.integers(3, 40), step=st.integers(1, 4), seed=st.integers(0, 2**31),
       diff_thr=st.integers(0, 80), edge_thr=st.integers(0, 120))
def test_kernel_matches_reference(h, w, step, seed, diff_thr, edge_thr):
    rng = np.random.default_rng(seed)
    f0 = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    f1 = f0.copy()
    f1[: h // 2] = rng.integers(0, 256, (h // 2, w, 3), dtype=np.uint8)
    sh, sw = C.small_shape(h, w, step)
    grid = (min(4, sw), min(3, sh))
    a, b = C.new_state(f0.shape, step, grid), C.new_state(f0.shape, step, grid)
    C.change_features(f0, a, b, diff_thr, edge_thr)
    got = C.change_features(f1, b, a, diff_thr, edge_thr)
    want = C.change_features_reference(f1, f0, step, grid, diff_thr, edge_thr)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_scene_change_stands_out_from_noise_and_motion():
    bank = S.noise_bank(180, 320, 6.0)
    one, two = S.heldout_scenes(2)
    rng = np.random.default_rng(0)
    f0 = S.render(one, 320, 180, noise_bank=bank, motion=(0.0, 0.0), rng=rng)
    f1 = S.render(one, 320, 180, noise_bank=bank, motion=(0.02, 0.0), rng=rng)
    f2 = S.render(two, 320, 180, noise_bank=bank, motion=(0.02, 0.0), rng=rng)
    same = _kernel_pair(f0, f1, 2, (16, 9))
    cut = _kernel_pair(f1, f2, 2, (16, 9))
    assert same[0] < 0.01 and same[1] < 0.2
    assert cut[1] > 0.5 and cut[1] > 5 * same[1]
    assert np.all((cut >= 0) & (cut <= 1)) and np.all((same >= 0) & (same <= 1))


def test_identical_frames_score_zero():
    f = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_kernel_pair(f, f, 4, (8, 4)), np.zeros(4))


def test_bad_frames_raise_codec_error():
    a, b = C.new_state((32, 32, 3), 1), C.new_state((32, 32, 3), 1)
    with pytest.raises(CodecError):
        C.change_features(np.zeros((32, 32, 3), np.float32), a, b)
    with pytest.raises(CodecError):
        C.change_features(np.zeros((16, 32, 3), np.uint8), a, b)
    with pytest.raises(CodecError):
        C.new_state((32, 32), 4)
    with pytest.raises(CodecError):
        C.new_state((32, 32, 3), 4, (16, 9))  # 8x8 subsampled frame cannot hold a 16x9 grid
