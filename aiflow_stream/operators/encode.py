"""encode: the device half of the captioner (frames -> features)."""

from __future__ import annotations

import numpy as np

from aiflow_stream.operators.base import Operator, register
from aiflow_stream.runtime.items import Item, ItemKind


@register("encode")
class Encode(Operator):
    def setup(self) -> None:
        from aiflow_stream.models import load_captioner

        self.model = load_captioner(self.ctx.options.get("model", "default"), device=self.ctx.torch_device,
                                    dtype=self.ctx.torch_dtype)

    def process(self, item: Item) -> list[Item]:
        feats = self.model.encode([item.parts[0]])[0]
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        return [item.derive(ItemKind.FEATURES, [feats], meta={"encoder": self.model.name})]
