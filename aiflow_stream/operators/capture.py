"""capture: read frames from a source string; live sources run under a supervisor."""

from __future__ import annotations

import time

from aiflow_stream.errors import SourceError
from aiflow_stream.operators.base import Operator, register
from aiflow_stream.runtime.items import Item, ItemKind
from aiflow_stream.sources.base import Frame, Policy, Source


@register("capture")
class Capture(Operator):
    """Not a transform: the runtime calls :meth:`read` in the step's own thread."""

    def setup(self) -> None:
        from aiflow_stream.sources import SupervisedSource, open_source

        uri = self.ctx.options["source"]
        extra = {k: v for k, v in self.ctx.options.items()
                 if k not in ("source", "max_staleness", "policy", "stream", "retries")}
        probe = open_source(uri, **extra)
        self.policy = probe.policy
        self.stream = str(self.ctx.options.get("stream") or self.ctx.step)
        if probe.policy is Policy.LATEST:
            # Live sources: an outage is retried with backoff, never fatal on its own.
            self.source: Source = SupervisedSource(lambda: open_source(uri, **extra),
                                           max_retries=self.ctx.options.get("retries"))
        else:
            self.source = probe
        # Opened at the first read, once the whole graph is set up: a live source opened here
        # would stream (and drop) frames while the models are still loading.
        self._opened = False
        self._seq = 0

    def read(self, timeout: float = 1.0) -> Item | None:
        """Next frame as an item; an EOS item at end of stream; None if nothing arrived in time."""
        if not self._opened:
            self.source.open()
            self._opened = True
        try:
            frame: Frame | None = self.source.read(timeout)
        except TimeoutError:
            return None
        except SourceError:
            raise
        if frame is None:
            return Item.eos(self.stream, self.ctx.step)
        meta: dict = {"scene_change": bool(frame.scene_change)}
        if frame.truth is not None:
            meta["truth"] = frame.truth
        item = Item(ItemKind.FRAME, self.stream, self._seq, frame.capture_ns, [frame.image], meta,
                    {self.ctx.step: time.time_ns()}, ["raw"], origin=self.ctx.step)
        self._seq += 1
        return item

    def process(self, item: Item) -> list[Item]:  # pragma: no cover - capture has no input
        raise TypeError("capture has no input")

    def close(self) -> list[Item]:
        src = getattr(self, "source", None)
        if src is not None:
            src.close()
        return []

    @property
    def state(self) -> str:
        st = getattr(self.source, "state", None)
        return st.value if st is not None else "running"
