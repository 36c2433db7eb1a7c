"""One exception hierarchy for the whole engine.

Every class also subclasses the matching built-in, so callers that already catch
``ValueError`` or ``ConnectionError`` keep working.
"""

from __future__ import annotations


class AiflowError(Exception):
    """Base of every error raised by aiflow_stream."""


class GraphError(AiflowError, ValueError):
    """A pipeline declaration is invalid (raised before anything runs)."""


class WireError(AiflowError, ValueError):
    """A message on the wire is malformed, too large or of an unknown version."""


class TransportError(AiflowError, ConnectionError):
    """A link could not be opened, or a peer is unreachable or dead."""


class SourceError(AiflowError, IOError):
    """A frame source could not be opened or stopped delivering frames."""


class CodecError(AiflowError, ValueError):
    """A coded payload is corrupt, truncated or inconsistent with its header."""


class ModelError(AiflowError, RuntimeError):
    """A captioner could not be found, loaded or run."""


class RuntimeFault(AiflowError, RuntimeError):
    """A tier process failed while running a graph."""
