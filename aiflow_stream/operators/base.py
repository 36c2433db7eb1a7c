"""The operator lifecycle: ``setup`` (load models, warm up kernels), ``process``, ``close``.

Operators never open sockets: what crosses a process boundary (a verifier, a caption
publisher) is handed to them by the runtime through :class:`OperatorContext`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiflow_stream.runtime.items import Counters, Item


class PartialBatchError(Exception):
    """Raised by :meth:`Operator.process_batch` when it failed part-way, after some outputs
    already went out: the items at ``finished`` are done, the others failed with ``cause``
    (and are not retried: their work may have been half done)."""

    def __init__(self, finished: set[int], cause: BaseException) -> None:
        super().__init__(str(cause))
        self.finished = finished
        self.cause = cause


class VerifierClient(Protocol):
    """A round trip to a verifier step (in this process or over a link)."""

    def call(self, meta: dict[str, Any], parts: list[Any] | None = None, timeout: float = 30.0) -> dict[str, Any]: ...

    def call_many(self, calls: list[tuple[dict[str, Any], list[Any] | None]],
                  timeout: float = 30.0) -> list[dict[str, Any]]:
        """Several calls in one round trip, answers in order."""
        ...


class CaptionSink(Protocol):
    def send(self, topic: str, record: dict[str, Any]) -> None: ...


@dataclass
class OperatorContext:
    tier: str
    step: str
    options: Mapping[str, Any]
    counters: Counters
    log: logging.LoggerAdapter
    verifier: VerifierClient | None = None
    sink: CaptionSink | None = None
    torch_device: str = "cpu"
    torch_dtype: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class Operator:
    """Base class: subclasses override what they need."""

    kind = "operator"
    max_batch = 1  # how many queued items the runtime may hand to process_batch at once

    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx

    def setup(self) -> None:
        """Load what the step needs (models, kernels); runs once, in the tier process."""

    def process(self, item: Item) -> list[Item]:
        """Turn one input item into zero or more output items."""
        raise NotImplementedError

    def process_batch(self, items: list[Item]) -> list[Item]:
        """Several input items at once (at most ``max_batch``, all already queued); the default
        processes them one by one. An operator that can do better (one batched forward pass)
        overrides it; if it raises, the runtime retries the items one by one with
        :meth:`process`, so one bad item is dropped alone; :class:`PartialBatchError` says
        instead which items were already done, and the others are counted as failed."""
        return [out for item in items for out in self.process(item)]

    def close(self) -> list[Item]:
        """Flush state at end of stream; may emit final items."""
        return []


_REGISTRY: dict[str, Callable[[OperatorContext], Operator]] = {}


def register(kind: str) -> Callable[[type[Operator]], type[Operator]]:
    def deco(cls: type[Operator]) -> type[Operator]:
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return deco


def create(kind: str, ctx: OperatorContext) -> Operator:
    from aiflow_stream.operators import load_all

    load_all()  # built-ins register on first import; a graph's own operators may already be here
    try:
        factory = _REGISTRY[kind]
    except KeyError:
        raise KeyError(f"no operator of kind {kind!r}; known: {', '.join(sorted(_REGISTRY))}") from None
    return factory(ctx)
