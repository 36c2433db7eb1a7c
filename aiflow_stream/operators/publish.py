"""publish: captions out on the tier's ZeroMQ PUB socket (topic = stream id)."""

from __future__ import annotations

import time

from aiflow_stream.operators.base import Operator, register
from aiflow_stream.runtime.items import Item


def latency_breakdown(item: Item, now_ns: int) -> dict[str, float]:
    """Milliseconds spent reaching each stage, in the order the stages stamped the item."""
    out: dict[str, float] = {}
    prev = item.capture_ns
    for stage, ns in sorted(item.stamps.items(), key=lambda kv: kv[1]):
        out[stage] = round((ns - prev) / 1e6, 3)
        prev = ns
    out["publish"] = round((now_ns - prev) / 1e6, 3)
    out["total"] = round((now_ns - item.capture_ns) / 1e6, 3)
    return out


@register("publish")
class Publish(Operator):
    def setup(self) -> None:
        if self.ctx.sink is None:
            raise RuntimeError(f"publish step {self.ctx.step!r} has no caption sink (runtime bug)")

    def process(self, item: Item) -> list[Item]:
        now = time.time_ns()
        record = {
            "stream": item.stream,
            "seq": item.seq,
            "capture_ns": item.capture_ns,
            "publish_ns": now,
            "text": item.meta.get("text", ""),
            "model": item.meta.get("model", ""),
            "revision": int(item.meta.get("revision", 0)),
            "final": bool(item.meta.get("final", True)),
            "truth": item.meta.get("truth"),
            "latency_ms": latency_breakdown(item, now),
            "stats": item.meta.get("stats", {}),
        }
        assert self.ctx.sink is not None
        self.ctx.sink.send(item.stream, record)
        return []
