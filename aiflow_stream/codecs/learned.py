"""Learned bottleneck: a linear projection D -> d on the device and its inverse on the receiver.

Trained with the caption loss on frozen encoder features and a frozen target decoder
(``python -m aiflow_stream.codecs.train_bottleneck``), shipped as small safetensors files in
``codecs/bottleneck/`` named ``{family}_d{d}.safetensors`` holding ``down.weight`` (d, D),
``down.bias`` (d), ``up.weight`` (D, d), ``up.bias`` (D), float32. Selected in a chain with
``bottleneck:d``; only numpy is needed to apply it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from aiflow_stream.errors import CodecError

BOTTLENECK_DIR = Path(__file__).resolve().parent / "bottleneck"
FAMILY = "default"


def bottleneck_path(width: int, family: str = FAMILY) -> Path:
    return BOTTLENECK_DIR / f"{family}_d{width}.safetensors"


@dataclass(frozen=True)
class Bottleneck:
    """``project``: (T, D) -> (T, d) on the device; ``restore``: (T, d) -> (T, D) on the receiver."""

    down_w: np.ndarray  # (d, D)
    down_b: np.ndarray  # (d,)
    up_w: np.ndarray  # (D, d)
    up_b: np.ndarray  # (D,)

    @property
    def dim(self) -> int:
        return int(self.down_w.shape[1])

    @property
    def width(self) -> int:
        return int(self.down_w.shape[0])

    def project(self, x: np.ndarray) -> np.ndarray:
        if x.shape[-1] != self.dim:
            raise CodecError(f"bottleneck expects D={self.dim} features, got D={x.shape[-1]}")
        return np.ascontiguousarray(x @ self.down_w.T + self.down_b, np.float32)

    def restore(self, z: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(z @ self.up_w.T + self.up_b, np.float32)


@lru_cache(maxsize=8)
def load_bottleneck(width: int, family: str = FAMILY) -> Bottleneck:
    """Load the shipped bottleneck of width ``width`` (CodecError if none was trained)."""
    path = bottleneck_path(width, family)
    if not path.exists():
        have = sorted(p.stem for p in BOTTLENECK_DIR.glob("*.safetensors"))
        raise CodecError(f"no learned bottleneck of width {width} for {family!r} at {path}; "
                         f"available: {have or 'none'} (train one with "
                         f"python -m aiflow_stream.codecs.train_bottleneck --width {width})")
    from safetensors.numpy import load_file

    t = load_file(str(path))
    try:
        b = Bottleneck(*(np.asarray(t[k], np.float32) for k in
                         ("down.weight", "down.bias", "up.weight", "up.bias")))
    except KeyError as err:
        raise CodecError(f"{path} lacks tensor {err}") from err
    if b.down_w.shape != (width, b.dim) or b.up_w.shape != (b.dim, width) or \
            b.down_b.shape != (width,) or b.up_b.shape != (b.dim,):
        raise CodecError(f"{path} holds tensors of inconsistent shapes")
    return b
