"""keyframe: pass on only the frames that add something to the caption.

``p.keyframe("keyframe", frames)`` uses the fused change scorer (``codecs.keyframe``) with its
defaults; keyword options set :class:`~aiflow_stream.codecs.keyframe.KeyframeConfig` fields, and
``every=N`` selects the simplest honest policy, every Nth frame.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiflow_stream.errors import GraphError
from aiflow_stream.operators.base import Operator, register
from aiflow_stream.runtime.items import Item


def make_selector(options: dict[str, Any]) -> Any:
    from aiflow_stream.codecs.keyframe import EveryNth, KeyframeConfig, KeyframeSelector

    opts = dict(options)
    if "every" in opts:
        return EveryNth(int(opts.pop("every")))
    known = {f.name for f in dataclasses.fields(KeyframeConfig)}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise GraphError(f"keyframe: unknown option(s) {', '.join(unknown)}; use every=N or any of "
                         f"{', '.join(sorted(known))}")
    for k in ("weights", "grid"):
        if k in opts:
            opts[k] = tuple(opts[k])
    return KeyframeSelector(KeyframeConfig(**opts))


@register("keyframe")
class Keyframe(Operator):
    def setup(self) -> None:
        self.selector = make_selector(dict(self.ctx.options))
        self.selector.warmup()  # compile the Numba kernel before the first frame

    def process(self, item: Item) -> list[Item]:
        decision = self.selector.update(item.parts[0])
        if not decision.is_key:
            return []
        item.meta["key_reason"] = decision.reason
        item.meta["key_score"] = round(float(decision.score), 4)
        return [item]
