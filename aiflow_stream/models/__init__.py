"""Captioner adapters, the default model family and speculative decoding.

The names below load lazily: importing this package does not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Captioner": "adapters",
    "DecoderState": "adapters",
    "load_captioner": "adapters",
    "Drafter": "speculative",
    "Verifier": "speculative",
    "VerifyResult": "speculative",
    "SpecResult": "speculative",
    "speculative_generate": "speculative",
    "choose_gamma": "speculative",
    "draft_caption": "speculative",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
