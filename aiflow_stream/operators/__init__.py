"""Operators: one module per stage kind, each a small class with setup/process/close."""

from __future__ import annotations

from aiflow_stream.operators.base import Operator, OperatorContext, create, register

__all__ = ["Operator", "OperatorContext", "create", "register", "load_all"]


def load_all() -> None:
    """Import every operator module so each registers its kind."""
    from aiflow_stream.operators import (  # noqa: F401
        caption,
        capture,
        compress,
        encode,
        keyframe,
        publish,
    )
