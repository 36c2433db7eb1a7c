"""Feature codec chains: round trips, numba == reference, delta state, and hostile input."""

from __future__ import annotations

import copy

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiflow_stream.codecs import (
    CodecState,
    available_codecs,
    decode,
    encode,
    get_codec,
    parse_spec,
)
from aiflow_stream.errors import CodecError

SPECS = ["fp32", "fp16", "fp16|lz4", "int8", "int8|rans", "int4|rans", "int4:channel|rans",
         "int2|rans", "int4|lz4", "topk:12|int4|rans", "topk:5:by=dev:fill=zero|int8",
         "topk:8:by=dev:merge=3|int4|rans", "delta|topk:8:merge=2|int4|rans",
         "delta|int4|rans", "delta:3|topk:10|int4:c|rans", "delta|fp16"]


def features(t: int = 33, d: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, d)).astype(np.float32)
    x[:, 3] *= 10  # an outlier channel, as ViT hidden states have
    return x


def tolerance(spec: str, x: np.ndarray) -> float:
    bits = parse_spec(spec).bits
    if not bits:
        return 0.05 if "fp16" in spec else 0.0
    rng = float(np.ptp(x))
    return rng / ((1 << bits) - 1)  # at most one step (max row range) of error


@pytest.mark.parametrize("spec", SPECS)
def test_roundtrip_and_reference_bytes(spec):
    x = features()
    coded = encode(x, spec)
    ref = get_codec(spec, reference=True).encode(x)
    assert coded.parts == ref.parts and coded.meta == ref.meta
    msgpack.packb(coded.meta)  # the header map must travel as msgpack
    y = decode(coded.parts, coded.meta)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_array_equal(y, get_codec(spec, reference=True).decode(coded.parts, coded.meta))
    if parse_spec(spec).topk is None:
        assert np.abs(y - x).max() <= tolerance(spec, x) + 1e-6


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (113, 160), (1, 113, 160), (3, 2)])
def test_any_shape_and_batch_of_one(shape):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    for spec in ("int4|rans", "topk:2|int2|rans", "fp16"):
        y = decode(*_pm(encode(x, spec)))
        assert y.shape == x.shape


def _pm(coded):
    return coded.parts, coded.meta


def test_sizes_shrink_along_the_chain():
    x = features(113, 160)
    sizes = {s: encode(x, s).nbytes for s in ("fp16", "int8|rans", "int4|rans", "topk:48|int4|rans")}
    assert sizes["fp16"] > sizes["int8|rans"] > sizes["int4|rans"] > sizes["topk:48|int4|rans"]
    assert sizes["fp16"] < 113 * 160 * 2 + 200  # meta stays small


def test_topk_keeps_cls_and_fills_dropped_tokens():
    x = features(20, 8)
    x[0] = 0.0  # CLS with the smallest norm is still kept
    y = decode(*_pm(encode(x, "topk:4|fp32")))
    np.testing.assert_array_equal(y[0], x[0])
    kept = [i for i in range(20) if np.array_equal(y[i], x[i])]
    assert len(kept) == 4
    dropped = [i for i in range(20) if i not in kept]
    np.testing.assert_allclose(y[dropped[0]], x[kept[1:]].mean(axis=0), rtol=1e-5)
    z = decode(*_pm(encode(x, "topk:4:fill=zero|fp32")))
    assert not z[dropped].any()


def test_merge_sends_centroids_of_the_dropped_tokens():
    rng = np.random.default_rng(2)
    x = np.zeros((40, 8), np.float32)
    x[:8] = rng.standard_normal((8, 8)) * 10  # informative tokens (large norm)
    x[8:24] = 1.0 + 0.01 * rng.standard_normal((16, 8))  # two tight background clusters
    x[24:] = -1.0 + 0.01 * rng.standard_normal((16, 8))
    c = encode(x, "topk:8:merge=2|fp32")
    assert len(c.meta["merge"]) == 4  # 32 dropped tokens, 1 bit each
    y = decode(c.parts, c.meta)
    np.testing.assert_array_equal(y[:8], x[:8])
    assert np.abs(y[8:] - x[8:]).max() < 0.05
    meta = dict(c.meta, merge=b"\xff" * 4)
    decode(c.parts, meta)  # labels 0/1 only: every bit pattern is valid with 2 centroids
    for bad in (b"", b"\x00" * 5, None):
        with pytest.raises(CodecError):
            decode(c.parts, dict(c.meta, merge=bad))
    with pytest.raises(CodecError):
        decode(c.parts, {k: v for k, v in c.meta.items() if k != "merge"})
    c3 = encode(x, "topk:8:merge=3|fp32")
    with pytest.raises(CodecError, match="label"):
        decode(c3.parts, dict(c3.meta, merge=b"\xff" * 8))  # label 3 with 3 centroids


def test_delta_is_used_when_cheaper_and_tracks_the_state():
    x = features(113, 160)
    tx, rx = CodecState(), CodecState()
    sizes, kinds = [], []
    for i in range(5):
        xi = x + 0.01 * i
        c = encode(xi, "delta:3|int4|rans", tx)
        y = decode(c.parts, c.meta, rx)
        np.testing.assert_array_equal(y, tx.ref)
        assert np.abs(y - xi).max() <= tolerance("int4", xi) + 1e-5
        sizes.append(c.nbytes)
        kinds.append("ref" in c.meta)
    assert kinds == [False, True, True, True, False]  # at most 3 deltas in a row
    assert max(sizes[1:4]) < sizes[0] / 3


def test_lost_delta_reference_is_a_clear_error_and_intra_resyncs():
    x = features()
    tx, rx = CodecState(), CodecState()
    first = encode(x, "delta:2|int8|rans", tx)
    second = encode(x + 0.001, "delta:2|int8|rans", tx)
    assert "ref" in second.meta
    with pytest.raises(CodecError, match="lost"):
        decode(second.parts, second.meta, rx)  # receiver never saw the first frame
    with pytest.raises(CodecError):
        decode(second.parts, second.meta, None)
    decode(first.parts, first.meta, rx)
    decode(second.parts, second.meta, rx)
    third = encode(x + 0.002, "delta:2|int8|rans", tx)
    fourth = encode(x, "delta:2|int8|rans", tx)  # run of 2 reached: intra
    assert "ref" in third.meta and "ref" not in fourth.meta
    decode(fourth.parts, fourth.meta, CodecState())  # a fresh receiver can start here


@pytest.mark.parametrize("spec", ["", "int3", "rans", "fp16|rans", "int4|topk:3", "topk", "topk:0",
                                  "topk:4:by=attn", "delta:x", "int4:diag", "lz4|int4", "fp16|fp16",
                                  "bottleneck:7|int8"])
def test_bad_specs_raise(spec):
    with pytest.raises(CodecError):
        get_codec(spec)


def test_presets_resolve():
    names = available_codecs()
    assert "default" in names and "fp16" in names
    for name in names:
        if "bottleneck" not in names[name]:
            x = features()
            assert decode(*_pm(encode(x, name))).shape == x.shape


def test_non_finite_features_refused():
    x = features()
    x[3, 4] = np.nan
    with pytest.raises(CodecError):
        encode(x, "int8|rans")
    with pytest.raises(CodecError):
        encode(np.zeros((2, 3, 4), np.float32), "fp16")


@pytest.mark.parametrize("spec", ["int4|rans", "topk:12|int2", "fp16|lz4", "int8", "fp32"])
def test_truncated_and_extended_parts_raise(spec):
    c = encode(features(), spec)
    for i, part in enumerate(c.parts):
        for bad in (part[:-1], part[: len(part) // 2], b"", part + b"\x00"):
            parts = list(c.parts)
            parts[i] = bad
            with pytest.raises(CodecError):
                decode(parts, c.meta)
    with pytest.raises(CodecError):
        decode(c.parts[:-1], c.meta)
    with pytest.raises(CodecError):
        decode([*c.parts, b"x"], c.meta)


def test_bad_meta_raises():
    c = encode(features(), "topk:12|int4|rans")
    mutations = {
        "shape": [[33, 25], [41, 24], [0, 24], [2, 33, 24], "33x24", [33.0, 24], [1 << 20, 1 << 20]],
        "keep": [b"", c.meta["keep"] + b"\x00", b"\x00" * len(c.meta["keep"]), b"\xff" * 5, 7],
        "merge": [b"\x00"],
        "table": [b"", c.meta["table"][:-1], b"\x0e\x00\x00\x01", None],
        "v": [2, None],
        "spec": ["int4|lz4", "nope", 3],
        "ref": [0],
    }
    for key, values in mutations.items():
        for v in values:
            meta = copy.deepcopy(c.meta)
            meta[key] = v
            with pytest.raises(CodecError):
                decode(c.parts, meta)
    with pytest.raises(CodecError):
        decode(c.parts, [1, 2])  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        decode(c.parts, {k: v for k, v in c.meta.items() if k != "table"})


meta_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.binary(max_size=20),
                        st.text(max_size=10), st.lists(st.integers(-2, 200), max_size=4))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.sampled_from(SPECS), parts=st.lists(st.binary(max_size=300), max_size=3),
       shape=st.lists(st.integers(1, 40), min_size=2, max_size=2),
       keep=st.binary(max_size=6), table=st.binary(max_size=12),
       extra=st.dictionaries(st.sampled_from(["ref", "id", "keep", "table", "shape", "merge"]), meta_values,
                             max_size=2))
def test_hypothesis_payloads_never_crash(spec, parts, shape, keep, table, extra):
    meta = {"v": 1, "spec": spec, "shape": shape, "id": 0, "keep": keep, "table": table, **extra}
    if parse_spec(spec).topk is None:
        meta.pop("keep", None) if "keep" not in extra else None
    try:
        y = decode(parts, meta, CodecState())
    except CodecError:
        return
    assert y.dtype == np.float32 and list(y.shape) == list(meta["shape"])
    assert np.isfinite(y).all()


@settings(max_examples=100, deadline=None)
@given(spec=st.sampled_from(SPECS), seed=st.integers(0, 2**31), flips=st.integers(1, 4))
def test_bit_flipped_payloads_never_crash(spec, seed, flips):
    rng = np.random.default_rng(seed)
    c = encode(features(seed=seed % 7), spec)
    parts = [bytearray(p) for p in c.parts]
    for _ in range(flips):
        p = parts[int(rng.integers(len(parts)))]
        if p:
            p[int(rng.integers(len(p)))] ^= 1 << int(rng.integers(8))
    try:
        y = decode([bytes(p) for p in parts], c.meta)
    except CodecError:
        return
    assert y.shape == (33, 24)


def test_bottleneck_stage_projects_and_restores(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    from aiflow_stream.codecs import chain, learned

    d, w = 24, 6
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))
    comp = q[:w].astype(np.float32)  # orthonormal rows: restore(project(x)) = x inside the span
    save_file({"down.weight": comp, "down.bias": np.zeros(w, np.float32), "up.weight": comp.T.copy(),
               "up.bias": np.zeros(d, np.float32)}, str(tmp_path / f"default_d{w}.safetensors"))
    monkeypatch.setattr(learned, "BOTTLENECK_DIR", tmp_path)
    learned.load_bottleneck.cache_clear()
    chain.get_codec.cache_clear()
    try:
        x = (np.random.default_rng(1).standard_normal((33, w)) @ comp).astype(np.float32)
        c = encode(x, f"bottleneck:{w}|int8|rans")
        assert len(c.parts[0]) < 33 * w  # only d = 6 channels travel
        y = decode(c.parts, c.meta)
        assert y.shape == x.shape and np.abs(y - x).max() < 0.05
        with pytest.raises(CodecError):
            encode(np.zeros((3, 7), np.float32), f"bottleneck:{w}|fp16")  # wrong D
        with pytest.raises(CodecError, match="train one"):
            get_codec("bottleneck:5|fp16")
    finally:
        learned.load_bottleneck.cache_clear()
        chain.get_codec.cache_clear()


def test_shipped_learned_preset_roundtrips():
    from aiflow_stream.codecs.learned import bottleneck_path

    width = parse_spec(available_codecs()["learned"]).bottleneck
    if not bottleneck_path(width).exists():
        pytest.skip("no learned bottleneck shipped")
    x = np.random.default_rng(3).standard_normal((113, 160)).astype(np.float32)
    c = encode(x, "learned")
    assert c.nbytes < 113 * 160 * 2 / 10
    assert decode(c.parts, c.meta).shape == (113, 160)
