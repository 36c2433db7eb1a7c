"""Transport: the wire format, ZeroMQ links with credit flow control, CurveZMQ keys."""

from aiflow_stream.transport.curve import CurveKeys, generate_keypair
from aiflow_stream.transport.link import (
    DEFAULT_WINDOW_BYTES,
    DEFAULT_WINDOW_MSGS,
    Inlet,
    InletStats,
    Outlet,
    OutletStats,
)
from aiflow_stream.transport.wire import (
    CONTROL_KINDS,
    PROTOCOL_VERSION,
    BadMessage,
    Header,
    Kind,
    Limits,
    Message,
    PartSpec,
    Reason,
    SeqTracker,
    decode,
    encode,
)

__all__ = [
    "CONTROL_KINDS",
    "DEFAULT_WINDOW_BYTES",
    "DEFAULT_WINDOW_MSGS",
    "PROTOCOL_VERSION",
    "BadMessage",
    "CurveKeys",
    "Header",
    "Inlet",
    "InletStats",
    "Kind",
    "Limits",
    "Message",
    "Outlet",
    "OutletStats",
    "PartSpec",
    "Reason",
    "SeqTracker",
    "decode",
    "encode",
    "generate_keypair",
]
