"""compress / decompress: features through a codec chain, or frames as JPEG / PNG / lz4 / raw.

A packet is self-describing: ``meta["codec"]`` holds everything the receiver needs, so the
decoder on the other tier works from the header alone.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from aiflow_stream.errors import CodecError
from aiflow_stream.operators.base import Operator, register
from aiflow_stream.runtime.items import Item, ItemKind

FRAME_CODECS = ("jpeg", "png", "lz4", "raw")


def encode_frame(image: np.ndarray, spec: str) -> tuple[list[Any], dict[str, Any]]:
    name, _, arg = spec.partition(":")
    meta: dict[str, Any] = {"content": "frames", "spec": spec, "shape": list(image.shape)}
    if name == "jpeg":
        quality = int(arg or 75)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise CodecError(f"JPEG encoding failed for a frame of shape {image.shape}")
        return [buf.tobytes()], meta
    if name == "png":
        ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise CodecError(f"PNG encoding failed for a frame of shape {image.shape}")
        return [buf.tobytes()], meta
    if name == "lz4":
        import lz4.frame

        return [lz4.frame.compress(np.ascontiguousarray(image), compression_level=0)], meta
    if name == "raw":
        return [np.ascontiguousarray(image)], meta
    raise CodecError(f"unknown frame codec {spec!r}; use one of {', '.join(FRAME_CODECS)} (e.g. 'jpeg:75')")


def decode_frame(parts: list[Any], meta: dict[str, Any]) -> np.ndarray:
    name = str(meta.get("spec", "")).partition(":")[0]
    shape = tuple(int(v) for v in meta.get("shape", ()))
    if len(parts) != 1 or len(shape) != 3 or shape[2] != 3 or min(shape) <= 0:
        raise CodecError(f"frame packet: expected one part and an HxWx3 shape, got {len(parts)} parts, shape {shape}")
    buf = memoryview(parts[0]).cast("B")
    if name in ("jpeg", "png"):
        img = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR)
        if img is None or img.shape != shape:
            raise CodecError(f"frame packet: corrupt {name} data ({len(buf)} bytes) for shape {shape}")
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if name == "lz4":
        import lz4.frame

        try:
            raw = lz4.frame.decompress(bytes(buf))
        except RuntimeError as err:
            raise CodecError(f"frame packet: corrupt lz4 data ({len(buf)} bytes)") from err
        buf = memoryview(raw)
    if name in ("lz4", "raw"):
        if len(buf) != int(np.prod(shape)):
            raise CodecError(f"frame packet: {len(buf)} bytes for shape {shape}")
        return np.frombuffer(buf, np.uint8).reshape(shape)
    raise CodecError(f"frame packet: unknown codec {name!r}")


def _codec_state(states: dict[str, Any], stream: str) -> Any:
    """Per-stream codec state (the delta stage keeps the previous key frame's tokens)."""
    from aiflow_stream.codecs import CodecState

    if stream not in states:
        states[stream] = CodecState()
    return states[stream]


def decode_packet(item: Item, states: dict[str, Any]) -> tuple[str, np.ndarray]:
    """Decode a packet item: ("features", (T, D) float32) or ("frames", HxWx3 uint8)."""
    from aiflow_stream.codecs import decode as codec_decode

    meta = item.meta.get("packet")
    if not isinstance(meta, dict):
        raise CodecError(f"packet {item.stream}#{item.seq} carries no codec description")
    if meta.get("content") == "frames":
        return "frames", decode_frame(item.parts, meta)
    codec_meta = meta.get("codec")
    if not isinstance(codec_meta, dict):
        raise CodecError(f"feature packet {item.stream}#{item.seq}: missing codec parameters")
    return "features", codec_decode(list(item.parts), codec_meta, _codec_state(states, item.stream))


@register("compress")
class Compress(Operator):
    def setup(self) -> None:
        from aiflow_stream.codecs import get_codec, warmup_codecs

        self.spec = str(self.ctx.options.get("codec", "fp16"))
        self._states: dict[str, Any] = {}
        if self.spec.partition(":")[0] not in FRAME_CODECS:
            self.codec = get_codec(self.spec)  # a bad spec fails here, before the first frame
            warmup_codecs()

    def process(self, item: Item) -> list[Item]:
        if item.kind is ItemKind.FRAME:
            spec = self.spec if self.spec.partition(":")[0] in FRAME_CODECS else "jpeg:75"
            parts, meta = encode_frame(item.parts[0], spec)
        else:
            coded = self.codec.encode(np.asarray(item.parts[0], np.float32), _codec_state(self._states, item.stream))
            parts, meta = list(coded.parts), {"content": "features", "spec": self.spec, "codec": coded.meta}
        out = item.derive(ItemKind.PACKET, parts, meta={"packet": meta}, codecs=[meta["spec"]] * len(parts))
        return [out]


@register("decompress")
class Decompress(Operator):
    def setup(self) -> None:
        self._state: dict[str, Any] = {}

    def process(self, item: Item) -> list[Item]:
        content, value = decode_packet(item, self._state)
        kind = ItemKind.FEATURES if content == "features" else ItemKind.FRAME
        return [item.derive(kind, [value])]
