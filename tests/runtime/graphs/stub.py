"""A model-free graph for runtime tests: device -> edge (-> cloud) with stub operators.

device: capture -> keyframe(every=N) -> compress (lossless lz4 by default)
edge:   caption (``stub_caption``: decodes the packet, sleeps ``delay`` s, captions it with the
        CRC-32 of the decoded frame) -> publish
cloud:  (with ``verify``) a ``stub_verifier`` the caption step calls once per key frame with the
        packet; it answers the packet's CRC, which the caption step checks (``stats.verified``)

The caption text lets a test check that every key frame crossed the link intact (the synthetic
source re-renders any frame exactly). Every tier process loads this file on its own, so the
module-level ``pipeline`` takes its knobs from the environment (see :func:`from_env`).
"""

from __future__ import annotations

import os
import time
import zlib
from typing import Any

import numpy as np

from aiflow_stream import Pipeline, QueueSpec
from aiflow_stream.operators import Operator, register
from aiflow_stream.operators.compress import decode_packet
from aiflow_stream.runtime.items import Item, ItemKind

SOURCE = "synthetic://?seed=3&live=0&frames=20&width=160&height=96"


def frame_text(image: Any) -> str:
    """What :class:`StubCaption` says about a decoded frame."""
    return f"crc {zlib.crc32(np.ascontiguousarray(image).tobytes()):08x} {image.shape[1]}x{image.shape[0]}"


def _crc(part: Any) -> str:
    return f"{zlib.crc32(np.frombuffer(part, np.uint8).tobytes()):08x}"


@register("stub_caption")
class StubCaption(Operator):
    """Captions a packet with the CRC-32 of the frame it decodes to; ``delay`` s per item (per
    batch with ``batch`` > 1: batched work costs one delay), ``setup_s`` s to set up (as a
    model load would). A batch is verified with one ``call_many``."""

    def setup(self) -> None:
        time.sleep(float(self.ctx.options.get("setup_s", 0.0)))
        self.delay = float(self.ctx.options.get("delay", 0.0))
        self.max_batch = int(self.ctx.options.get("batch", 1))
        self._state: dict[str, Any] = {}

    def process(self, item: Item) -> list[Item]:
        return self.process_batch([item])

    def process_batch(self, items: list[Item]) -> list[Item]:
        images = [decode_packet(item, self._state)[1] for item in items]  # a bad packet raises here
        if self.delay:
            time.sleep(self.delay)
        stats: list[dict[str, Any]] = [{"batch": len(items)} for _ in items]
        if self.ctx.verifier is not None:
            replies = self.ctx.verifier.call_many([({"op": "crc"}, [item.parts[0]]) for item in items])
            for st, item, reply in zip(stats, items, replies):
                st.update(verified=reply.get("crc") == _crc(item.parts[0]), calls=reply.get("calls"))
        outs = []
        for item, image, st in zip(items, images, stats):
            out = item.derive(ItemKind.CAPTION, [], meta={"text": frame_text(image), "model": "stub",
                                                           "revision": 0, "final": True, "stats": st})
            out.meta.pop("packet", None)
            outs.append(out)
        return outs


@register("stub_verifier")
class StubVerifier(Operator):
    """Answers each call with the CRC-32 of its first part (and how many calls it served)."""

    def setup(self) -> None:
        self.calls = 0

    def handle(self, peer: str, meta: dict[str, Any], parts: list[Any]) -> dict[str, Any]:
        self.calls += 1
        return {"crc": _crc(parts[0]) if parts else "", "calls": self.calls}


def build(*, every: int = 5, codec: str = "lz4", delay: float = 0.0, max_items: int = 8,
          verify: bool = False, setup_s: float = 0.0, source: str = SOURCE, batch: int = 1) -> Pipeline:
    p = Pipeline("stub")
    with p.on("device"):
        frames = p.capture("capture", source)
        keys = p.keyframe("keyframe", frames, every=every)
        packets = p.compress("compress", keys, codec=codec)
    verifier = None
    if verify:
        with p.on("cloud"):
            verifier = p.verifier("verify", operator="stub_verifier")
    with p.on("edge"):
        captions = p.caption("caption", packets, operator="stub_caption", delay=delay, setup_s=setup_s,
                             verifier=verifier, batch=batch,
                             queue=QueueSpec(max_items=max_items))
        p.publish("publish", captions)
    return p


def from_env() -> Pipeline:
    """AIFLOW_TEST_EVERY, _CODEC, _DELAY, _MAX_ITEMS, _VERIFY (1 or 0), _SETUP_S."""
    env = os.environ.get
    return build(every=int(env("AIFLOW_TEST_EVERY", "5")), codec=env("AIFLOW_TEST_CODEC", "lz4"),
                 delay=float(env("AIFLOW_TEST_DELAY", "0")), max_items=int(env("AIFLOW_TEST_MAX_ITEMS", "8")),
                 verify=env("AIFLOW_TEST_VERIFY", "0") == "1", setup_s=float(env("AIFLOW_TEST_SETUP_S", "0")))


pipeline = from_env()
