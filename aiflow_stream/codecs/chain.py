"""Feature codec chains declared by a spec string, self-describing on the wire.

A spec lists stages in order, separated by ``|``::

    [bottleneck:d] [delta[:N]] [topk:K[:by=norm|dev][:fill=mean|zero][:merge=M]]
    [fp32 | fp16 | int8|int4|int2[:token|channel]] [rans | lz4]

e.g. ``"fp16"``, ``"int8|rans"``, ``"topk:48|int4|rans"``, ``"delta|int4|rans"``. The encoder
returns payload parts plus a small msgpack-able ``meta`` map (version, spec, shape, kept-token
mask, rANS table, frame ids); the decoder needs nothing else, except for ``delta`` frames, which
also need the previous frame as the receiver decoded it (kept per stream in a
:class:`CodecState`). A delta frame is sent only when it is smaller than the intra frame, and at
most ``N`` (default 8) in a row, so a receiver that lost a frame recovers within ``N`` frames.

Parts: ``[values]`` for fp32/fp16, ``[symbols, params]`` for intN (params: float16 ``lo`` then
``scale`` per row; a delta frame sends only the scales). Everything the decoder reads is checked
against the shape before any kernel runs; bad input raises :class:`CodecError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import lz4.block
import msgpack
import numpy as np

from aiflow_stream.codecs import quant, rans, tokens
from aiflow_stream.codecs.learned import Bottleneck, load_bottleneck
from aiflow_stream.errors import CodecError

log = logging.getLogger(__name__)

VERSION = 1
MAX_ELEMENTS = 1 << 24  # T * D limit on decode (64 MiB of float32)
MAX_SPEC = 200
DEFAULT_DELTA_RUN = 8

# name -> chain; ``get_codec`` accepts either (bench/results/codec.md has the rate-quality trade-off
# behind them). ``default`` works with any model; ``learned`` needs the shipped bottleneck, which
# belongs to the default family's current weights (retrain it when the family is retrained).
PRESETS: dict[str, str] = {
    "raw": "fp32",
    "fp16": "fp16",
    "int8": "int8|rans",
    "int4": "int4|rans",
    "default": "int4|rans",
    "compact": "topk:32:by=dev:merge=4|int4|rans",
    "learned": "bottleneck:32|topk:64|int4:channel|rans",
}


@dataclass(frozen=True)
class Spec:
    """A parsed chain (see the module docstring)."""

    text: str
    bottleneck: int | None = None
    delta: int | None = None  # max deltas in a row; None: no delta stage
    topk: int | None = None
    by: str = "norm"
    fill: str = "mean"
    merge: int = 0  # > 0: dropped tokens merged into this many centroids (intra frames)
    value: str = "fp32"  # fp32, fp16, int8, int4, int2
    per: str = "token"
    entropy: str | None = None  # rans, lz4

    @property
    def bits(self) -> int:
        return {"int8": 8, "int4": 4, "int2": 2}.get(self.value, 0)


_ORDER = {"bottleneck": 0, "delta": 1, "topk": 2, "fp32": 3, "fp16": 3, "int8": 3, "int4": 3,
          "int2": 3, "rans": 4, "lz4": 4}


def _int_arg(stage: str, arg: str, lo: int, hi: int) -> int:
    try:
        v = int(arg)
    except ValueError:
        raise CodecError(f"stage {stage!r}: {arg!r} is not an integer") from None
    if not lo <= v <= hi:
        raise CodecError(f"stage {stage!r}: {v} outside [{lo}, {hi}]")
    return v


@lru_cache(maxsize=256)
def parse_spec(text: str) -> Spec:
    """Parse and validate a chain spec (raises :class:`CodecError` naming the bad stage)."""
    if not isinstance(text, str) or not text or len(text) > MAX_SPEC:
        raise CodecError(f"codec spec must be a non-empty string of <= {MAX_SPEC} chars, got {text!r}")
    fields: dict[str, Any] = {"text": text}
    last = -1
    for stage in text.split("|"):
        name, *args = stage.strip().split(":")
        if name not in _ORDER:
            raise CodecError(f"unknown codec stage {name!r} in {text!r}; stages: {sorted(_ORDER)}")
        if _ORDER[name] <= last:
            raise CodecError(f"stage {name!r} out of order or repeated in {text!r}; order: "
                             "bottleneck, delta, topk, fp32|fp16|intN, rans|lz4")
        last = _ORDER[name]
        if name == "bottleneck":
            if len(args) != 1:
                raise CodecError(f"bottleneck needs a width, e.g. 'bottleneck:16' (in {text!r})")
            fields["bottleneck"] = _int_arg(stage, args[0], 1, 1 << 16)
        elif name == "delta":
            if len(args) > 1:
                raise CodecError(f"delta takes at most one argument (in {text!r})")
            fields["delta"] = _int_arg(stage, args[0], 1, 1 << 16) if args else DEFAULT_DELTA_RUN
        elif name == "topk":
            if not args:
                raise CodecError(f"topk needs a token count, e.g. 'topk:48' (in {text!r})")
            fields["topk"] = _int_arg(stage, args[0], 1, MAX_ELEMENTS)
            for opt in args[1:]:
                key, _, val = opt.partition("=")
                if key == "merge":
                    fields["merge"] = _int_arg(stage, val, 1, 256)
                    continue
                allowed = {"by": tokens.SCORES, "fill": tokens.FILLS}.get(key)
                if allowed is None or val not in allowed:
                    raise CodecError(f"topk option {opt!r} invalid; use by={'|'.join(tokens.SCORES)}, "
                                     f"fill={'|'.join(tokens.FILLS)} or merge=M (1..256)")
                fields[key] = val
        elif name in ("fp32", "fp16"):
            if args:
                raise CodecError(f"{name} takes no arguments (in {text!r})")
            fields["value"] = name
        elif name.startswith("int"):
            fields["value"] = name
            if len(args) > 1 or (args and args[0] not in ("token", "channel", "t", "c")):
                raise CodecError(f"{name} takes one optional axis, 'token' or 'channel' (in {text!r})")
            if args:
                fields["per"] = "channel" if args[0] in ("channel", "c") else "token"
        else:
            if args:
                raise CodecError(f"{name} takes no arguments (in {text!r})")
            fields["entropy"] = name
    spec = Spec(**fields)
    if spec.entropy == "rans" and not spec.bits:
        raise CodecError(f"rans codes quantized symbols: put int8/int4/int2 before it (in {text!r})")
    return spec


@dataclass
class CodecState:
    """Per-stream delta reference: the last frame as the receiver reconstructs it.

    The sender and the receiver each keep one per stream and pass it to every call.
    """

    ref: np.ndarray | None = None
    ref_id: int = -1
    next_id: int = 0
    run: int = 0  # delta frames since the last intra frame


@dataclass
class CodedFeatures:
    """Payload buffers plus the msgpack-able header map that describes them."""

    parts: list[bytes]
    meta: dict[str, Any]
    nbytes_meta: int = field(default=0)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: payloads plus the msgpack-encoded meta."""
        return sum(len(p) for p in self.parts) + self.nbytes_meta


class FeatureCodec:
    """One chain. ``reference=True`` runs the numpy/pure-Python references instead of kernels."""

    def __init__(self, spec: str, reference: bool = False) -> None:
        self.spec = parse_spec(PRESETS.get(spec, spec))
        self.reference = reference
        self._bottleneck: Bottleneck | None = None
        if self.spec.bottleneck is not None:
            self._bottleneck = load_bottleneck(self.spec.bottleneck)

    # -- encode ---------------------------------------------------------------------------
    def encode(self, features: np.ndarray, state: CodecState | None = None) -> CodedFeatures:
        """Code one frame's features (T, D) or (1, T, D), float."""
        x = np.asarray(features)
        shape = list(x.shape)
        if x.ndim == 3 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
            raise CodecError(f"features must be (T, D) or (1, T, D), got shape {tuple(shape)}")
        x = np.ascontiguousarray(x, np.float32)
        if not np.isfinite(x).all():
            raise CodecError("features contain NaN or infinity")
        sp = self.spec
        if self._bottleneck is not None:
            x = self._bottleneck.project(x)
        fid = state.next_id if state is not None else 0
        parts, extra, recon = self._encode_intra(x)
        use_delta = (sp.delta is not None and state is not None and state.ref is not None
                     and state.ref.shape == x.shape and state.run < sp.delta)
        if use_delta:
            assert state is not None and state.ref is not None
            d_parts, d_extra, d_recon = self._encode_delta(x, state.ref)
            if _size(d_parts, d_extra) < _size(parts, extra):
                parts, extra, recon = d_parts, d_extra, d_recon
                extra["ref"] = state.ref_id
        meta: dict[str, Any] = {"v": VERSION, "spec": sp.text, "shape": shape, "id": fid, **extra}
        if state is not None:
            state.run = state.run + 1 if "ref" in meta else 0
            state.ref, state.ref_id, state.next_id = recon, fid, fid + 1
        return CodedFeatures(parts, meta, len(msgpack.packb(meta)))

    def _encode_intra(self, x: np.ndarray) -> tuple[list[bytes], dict[str, Any], np.ndarray]:
        sp = self.spec
        extra: dict[str, Any] = {}
        keep = None
        y = x
        t = x.shape[0]
        labels = dropped = None
        if sp.topk is not None and sp.topk < t:
            keep = tokens.select(x, sp.topk, sp.by)
            extra["keep"] = tokens.mask_bytes(keep, t)
            y = x[keep]
            if sp.merge:
                dropped = np.setdiff1d(np.arange(t), keep)
                cents, labels = tokens.merge(x[dropped], sp.merge)
                y = np.concatenate([y, cents])
                bits = tokens.label_bits(cents.shape[0])
                extra["merge"] = quant.pack(labels, bits, self.reference).tobytes()
        if sp.bits:
            q, lo, scale = quant.quantize(y, sp.bits, sp.per, self.reference)
            recon_y = quant.dequantize(q, lo, scale, sp.per, self.reference)
            parts = [self._code_symbols(q, 1 << sp.bits, extra), np.concatenate([lo, scale]).tobytes()]
        else:
            v = y.astype(np.float16 if sp.value == "fp16" else np.float32)
            recon_y = v.astype(np.float32)
            parts = [self._entropy(v.tobytes())]
        if keep is None:
            recon = recon_y
        elif labels is None:
            recon = tokens.scatter(recon_y, keep, t, sp.fill)
        else:
            recon = tokens.scatter(recon_y[:keep.size], keep, t, "zero")
            recon[dropped] = recon_y[keep.size:][labels]
        return parts, extra, recon

    def _encode_delta(self, x: np.ndarray, ref: np.ndarray) -> tuple[list[bytes], dict[str, Any], np.ndarray]:
        sp = self.spec
        r = x - ref
        extra: dict[str, Any] = {}
        keep = None
        rows = r
        if sp.topk is not None and sp.topk < x.shape[0]:
            keep = tokens.select(r, sp.topk, "norm")
            extra["keep"] = tokens.mask_bytes(keep, x.shape[0])
            rows = r[keep]
        if sp.bits:
            src = x if keep is None else x[keep]
            src_rows = src if sp.per == "token" else src.T
            _, scale = quant.affine_params(np.ascontiguousarray(src_rows), sp.bits, self.reference)
            q = quant.quantize_residual(rows, scale, sp.per, self.reference)
            recon_r = quant.dequantize_residual(q, scale, sp.per, self.reference)
            parts = [self._code_symbols(q, 256, extra), scale.tobytes()]
        else:
            v = rows.astype(np.float16 if sp.value == "fp16" else np.float32)
            recon_r = v.astype(np.float32)
            parts = [self._entropy(v.tobytes())]
        full = recon_r if keep is None else tokens.scatter(recon_r, keep, x.shape[0], "zero")
        return parts, extra, ref + full

    def _code_symbols(self, q: np.ndarray, alphabet: int, extra: dict[str, Any]) -> bytes:
        sp = self.spec
        if sp.entropy == "rans":
            payload, table = rans.encode(q, alphabet, reference=self.reference)
            extra["table"] = table
            return payload
        bits = sp.bits if alphabet == 1 << sp.bits else 8
        return self._entropy(quant.pack(q, bits, self.reference).tobytes())

    def _entropy(self, raw: bytes) -> bytes:
        return lz4.block.compress(raw, store_size=False) if self.spec.entropy == "lz4" else raw

    # -- decode ---------------------------------------------------------------------------
    def decode(self, parts: list[Any], meta: dict[str, Any], state: CodecState | None = None) -> np.ndarray:
        """Rebuild the features (float32, the shape given to ``encode``) from parts + meta."""
        sp = self.spec
        if not isinstance(meta, dict):
            raise CodecError(f"meta must be a map, got {type(meta).__name__}")
        if meta.get("v") != VERSION:
            raise CodecError(f"unsupported codec meta version {meta.get('v')!r} (expected {VERSION})")
        if meta.get("spec") != sp.text:
            raise CodecError(f"meta spec {meta.get('spec')!r} does not match this codec ({sp.text!r})")
        shape = _check_shape(meta.get("shape"))
        t = shape[-2]
        d = self._bottleneck.width if self._bottleneck is not None else shape[-1]
        if self._bottleneck is not None and shape[-1] != self._bottleneck.dim:
            raise CodecError(f"bottleneck expects D={self._bottleneck.dim}, meta says {shape[-1]}")
        fid = meta.get("id", 0)
        if not isinstance(fid, int):
            raise CodecError("meta 'id' must be an integer")
        delta = "ref" in meta
        if delta:
            if sp.delta is None:
                raise CodecError(f"meta marks a delta frame but spec {sp.text!r} has no delta stage")
            if state is None or state.ref is None or state.ref_id != meta["ref"] or state.ref.shape != (t, d):
                held = None if state is None or state.ref is None else state.ref_id
                raise CodecError(f"delta frame {fid} refers to frame {meta['ref']!r} but the receiver "
                                 f"holds {held}: a frame was lost; the next intra frame resyncs")
        keep = None
        if "keep" in meta:
            if sp.topk is None:
                raise CodecError(f"meta has a kept-token mask but spec {sp.text!r} has no topk stage")
            keep = tokens.mask_indices(meta["keep"], t)
        k = t if keep is None else keep.size
        labels = None
        if "merge" in meta:
            if delta or not sp.merge or keep is None or keep.size == t:
                raise CodecError("meta carries merged-token labels this frame cannot have")
            n_drop = t - keep.size
            n_cent = min(sp.merge, n_drop)
            blob = meta["merge"]
            bits = tokens.label_bits(n_cent)
            if not isinstance(blob, (bytes, bytearray)) or len(blob) != quant.packed_size(n_drop, bits):
                raise CodecError(f"merged-token labels must be {quant.packed_size(n_drop, bits)} bytes "
                                 f"for {n_drop} dropped tokens")
            labels = quant.unpack(np.frombuffer(bytes(blob), np.uint8), bits, n_drop, self.reference)
            if labels.max() >= n_cent:
                raise CodecError(f"merged-token label {labels.max()} >= {n_cent} centroids")
            k += n_cent
        elif sp.merge and keep is not None and keep.size < t and not delta:
            raise CodecError(f"spec {sp.text!r} merges dropped tokens but meta has no 'merge' labels")
        bufs = [_as_bytes(p) for p in (parts if isinstance(parts, (list, tuple)) else [None])]
        n_parts = 2 if sp.bits else 1
        if len(bufs) != n_parts:
            raise CodecError(f"spec {sp.text!r} needs {n_parts} payload parts, got {len(bufs)}")
        if sp.bits:
            n_rows = k if sp.per == "token" else d
            params = np.frombuffer(bufs[1], np.float16) if len(bufs[1]) % 2 == 0 else np.empty(0, np.float16)
            want = n_rows * (1 if delta else 2)
            if params.size != want:
                raise CodecError(f"quantization params: expected {want} float16 values "
                                 f"({n_rows} rows), got {len(bufs[1])} bytes")
            if not np.isfinite(params).all() or (params[-n_rows:] <= 0).any():
                raise CodecError("quantization params hold a non-finite or non-positive scale")
            alphabet = 256 if delta else 1 << sp.bits
            q = self._decode_symbols(bufs[0], k * d, alphabet, meta).reshape(k, d)
            if delta:
                rows = quant.dequantize_residual(q, params, sp.per, self.reference)
            else:
                rows = quant.dequantize(q, params[:n_rows], params[n_rows:], sp.per, self.reference)
        else:
            dtype = np.float16 if sp.value == "fp16" else np.float32
            raw = self._unentropy(bufs[0], k * d * np.dtype(dtype).itemsize)
            if len(raw) != k * d * np.dtype(dtype).itemsize:
                raise CodecError(f"expected {k}x{d} {np.dtype(dtype).name} values "
                                 f"({k * d * np.dtype(dtype).itemsize} bytes), got {len(raw)} bytes")
            rows = np.frombuffer(raw, dtype).reshape(k, d).astype(np.float32)
            if not np.isfinite(rows).all():
                raise CodecError("decoded values contain NaN or infinity")
        if keep is None:
            full = rows
        elif labels is not None:
            full = tokens.scatter(rows[:keep.size], keep, t, "zero")
            full[np.setdiff1d(np.arange(t), keep)] = rows[keep.size:][labels]
        else:
            full = tokens.scatter(rows, keep, t, "zero" if delta else sp.fill)
        if delta:
            assert state is not None and state.ref is not None
            full = state.ref + full
        if state is not None:
            state.ref, state.ref_id, state.run = full, fid, (state.run + 1 if delta else 0)
        out = self._bottleneck.restore(full) if self._bottleneck is not None else full
        return out.reshape(shape)

    def _decode_symbols(self, buf: bytes, n: int, alphabet: int, meta: dict[str, Any]) -> np.ndarray:
        sp = self.spec
        if sp.entropy == "rans":
            table = meta.get("table")
            if not isinstance(table, (bytes, bytearray)):
                raise CodecError("rans frame carries no frequency table in meta 'table'")
            return rans.decode(buf, bytes(table), n, alphabet, self.reference)
        bits = sp.bits if alphabet == 1 << sp.bits else 8
        raw = self._unentropy(buf, quant.packed_size(n, bits))
        return quant.unpack(np.frombuffer(raw, np.uint8), bits, n, self.reference)

    def _unentropy(self, buf: bytes, size: int) -> bytes:
        if self.spec.entropy != "lz4":
            return buf
        try:
            return lz4.block.decompress(buf, uncompressed_size=size)
        except Exception as err:  # lz4 raises LZ4BlockError (a bare Exception subclass)
            raise CodecError(f"lz4 payload does not decompress to {size} bytes: {err}") from err


def _size(parts: list[bytes], extra: dict[str, Any]) -> int:
    return sum(map(len, parts)) + len(extra.get("keep", b"")) + len(extra.get("table", b""))


def _check_shape(shape: Any) -> tuple[int, ...]:
    if (not isinstance(shape, (list, tuple)) or len(shape) not in (2, 3)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)
            or (len(shape) == 3 and shape[0] != 1)):
        raise CodecError(f"meta 'shape' must be [T, D] or [1, T, D] of positive ints, got {shape!r}")
    if shape[-1] * shape[-2] > MAX_ELEMENTS:
        raise CodecError(f"meta 'shape' {shape} exceeds {MAX_ELEMENTS} elements")
    return tuple(shape)


def _as_bytes(part: Any) -> bytes:
    if isinstance(part, bytes):
        return part
    try:
        return memoryview(part).cast("B").tobytes()
    except (TypeError, ValueError) as err:
        raise CodecError(f"payload part of type {type(part).__name__} is not a contiguous buffer") from err


@lru_cache(maxsize=64)
def get_codec(spec: str, reference: bool = False) -> FeatureCodec:
    """The codec for a chain spec or preset name (cached; codecs are stateless)."""
    return FeatureCodec(spec, reference)


def available_codecs() -> dict[str, str]:
    """Preset names and their chains (any valid chain spec works with :func:`get_codec` too)."""
    return dict(PRESETS)


def encode(features: np.ndarray, spec: str, state: CodecState | None = None) -> CodedFeatures:
    """Code ``features`` with the chain ``spec`` (a preset name or a chain)."""
    return get_codec(spec).encode(features, state)


def decode(parts: list[Any], meta: dict[str, Any], state: CodecState | None = None) -> np.ndarray:
    """Decode from the parts and the meta map alone (plus ``state`` for delta chains)."""
    spec = meta.get("spec") if isinstance(meta, dict) else None
    if not isinstance(spec, str):
        raise CodecError("meta must be a map with a string 'spec'")
    return get_codec(spec).decode(parts, meta, state)


def warmup() -> None:
    """Compile every kernel the chains use."""
    quant.warmup()
    rans.warmup()
