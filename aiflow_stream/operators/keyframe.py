"""keyframe: pass on only the frames that add something to the caption."""

from __future__ import annotations

from typing import Any

from aiflow_stream.operators.base import Operator, register
from aiflow_stream.runtime.items import Item


@register("keyframe")
class Keyframe(Operator):
    def setup(self) -> None:
        from aiflow_stream.codecs.keyframe import make_selector

        opts: dict[str, Any] = dict(self.ctx.options)
        self.selector = make_selector(**opts)
        self._last_meta: dict[str, Any] = {}

    def process(self, item: Item) -> list[Item]:
        decision = self.selector.update(item.parts[0])
        if not decision.is_key:
            return []
        item.meta["key_reason"] = decision.reason
        item.meta["key_score"] = float(decision.score)
        return [item]
