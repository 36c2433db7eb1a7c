"""Quantization and bit-packing kernels against their numpy references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aiflow_stream.codecs import quant as Q
from aiflow_stream.errors import CodecError

finite = st.floats(-1e3, 1e3, width=32, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=40), elements=finite),
       bits=st.sampled_from([2, 4, 8]), per=st.sampled_from(["token", "channel"]))
def test_quantize_matches_reference_and_bounds_error(x, bits, per):
    q, lo, scale = Q.quantize(x, bits, per)
    q2, lo2, scale2 = Q.quantize(x, bits, per, reference=True)
    np.testing.assert_array_equal(q, q2)
    assert q.max() < (1 << bits)
    y = Q.dequantize(q, lo, scale, per)
    np.testing.assert_array_equal(y, Q.dequantize(q, lo, scale, per, reference=True))
    step = scale.astype(np.float32)[:, None] if per == "token" else scale.astype(np.float32)[None, :]
    # half a step of rounding, plus float16 rounding of lo (relative) and float32 arithmetic
    tol = 0.5 * step + 1e-3 * np.abs(x).max() + 1e-6
    assert np.all(np.abs(y - x) <= tol)


@settings(max_examples=40, deadline=None)
@given(r=hnp.arrays(np.float32, (7, 9), elements=st.floats(-50, 50, width=32)),
       per=st.sampled_from(["token", "channel"]))
def test_residual_quantization_matches_reference(r, per):
    scale = np.full(7 if per == "token" else 9, 0.25, np.float16)
    q = Q.quantize_residual(r, scale, per)
    np.testing.assert_array_equal(q, Q.quantize_residual(r, scale, per, reference=True))
    y = Q.dequantize_residual(q, scale, per)
    np.testing.assert_array_equal(y, Q.dequantize_residual(q, scale, per, reference=True))
    inside = np.abs(r) < 0.25 * 127
    assert np.all(np.abs(y - r)[inside] <= 0.125 + 1e-6)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), n=st.integers(0, 300), seed=st.integers(0, 2**31))
def test_pack_roundtrip_and_reference(bits, n, seed):
    q = np.random.default_rng(seed).integers(0, 1 << bits, n, dtype=np.uint8)
    packed = Q.pack(q, bits)
    np.testing.assert_array_equal(packed, Q.pack(q, bits, reference=True))
    assert packed.size == Q.packed_size(n, bits)
    np.testing.assert_array_equal(Q.unpack(packed, bits, n), q)
    np.testing.assert_array_equal(Q.unpack(packed, bits, n, reference=True), q)


def test_constant_rows_and_bad_arguments():
    x = np.full((3, 5), 2.5, np.float32)
    q, lo, scale = Q.quantize(x, 4)
    np.testing.assert_allclose(Q.dequantize(q, lo, scale), x, atol=1e-3)
    with pytest.raises(CodecError):
        Q.quantize(x, 3)
    with pytest.raises(CodecError):
        Q.unpack(np.zeros(3, np.uint8), 4, 7)  # 7 nibbles need 4 bytes
    with pytest.raises(CodecError):
        Q.quantize(np.array([[-1e9, 1e9]], np.float32), 8)  # beyond float16
    with pytest.raises(CodecError):
        Q.dequantize(q, lo[:2], scale)
