"""aiflow_stream: a streaming dataflow engine that moves intelligence, not video.

Declare a pipeline once, place its steps on device, edge and cloud tiers, and read captions
from a ZeroMQ subscriber. Nothing heavy is imported here: models, Numba kernels and sockets
load only when a tier runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiflow_stream.errors import (
    AiflowError,
    CodecError,
    GraphError,
    ModelError,
    RuntimeFault,
    SourceError,
    TransportError,
    WireError,
)
from aiflow_stream.graph import Pipeline, QueueSpec, Stream, StreamType, Tier, load_pipeline

if TYPE_CHECKING:
    from aiflow_stream.transport.pubsub import CaptionRecord

__version__ = "0.1.0"

__all__ = [
    "AiflowError",
    "CaptionRecord",
    "CodecError",
    "GraphError",
    "ModelError",
    "Pipeline",
    "QueueSpec",
    "RuntimeFault",
    "SourceError",
    "Stream",
    "StreamType",
    "Tier",
    "TransportError",
    "WireError",
    "load_pipeline",
    "subscribe",
]


def subscribe(address: str, streams: Any = None, **kwargs: Any) -> Any:
    """Yield :class:`CaptionRecord` s published at ``address`` (see ``transport.pubsub.subscribe``)."""
    from aiflow_stream.transport.pubsub import subscribe as _subscribe

    return _subscribe(address, streams, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "CaptionRecord":
        from aiflow_stream.transport.pubsub import CaptionRecord

        return CaptionRecord
    raise AttributeError(f"module 'aiflow_stream' has no attribute {name!r}")
