"""Numba kernels and the feature codec registry: pure functions over numpy arrays, no I/O.

Key-frame selection (device, before the encoder)::

    sel = KeyframeSelector(KeyframeConfig(max_gap=150))   # or EveryNth(30)
    sel.warmup()                                          # in the operator's setup()
    d = sel.update(frame_rgb)                             # Decision(is_key, score, reason, ...)
    if d.is_key and sel.confirm(features, d): ...         # optional check on encoder features

Feature codecs (device compresses, receiver decodes from parts + meta alone)::

    tx, rx = CodecState(), CodecState()                   # one per stream on each side
    coded = encode(features, "topk:48|int4|rans", tx)     # CodedFeatures(parts, meta)
    feats = decode(coded.parts, coded.meta, rx)           # (T, D) float32
"""

from aiflow_stream.codecs.chain import (
    PRESETS,
    CodecState,
    CodedFeatures,
    FeatureCodec,
    available_codecs,
    decode,
    encode,
    get_codec,
    parse_spec,
)
from aiflow_stream.codecs.chain import warmup as warmup_codecs
from aiflow_stream.codecs.keyframe import (
    Decision,
    EveryNth,
    KeyframeConfig,
    KeyframeSelector,
    cosine_distance,
)

__all__ = [
    "PRESETS",
    "CodecState",
    "CodedFeatures",
    "Decision",
    "EveryNth",
    "FeatureCodec",
    "KeyframeConfig",
    "KeyframeSelector",
    "available_codecs",
    "cosine_distance",
    "decode",
    "encode",
    "get_codec",
    "parse_spec",
    "warmup_codecs",
]
