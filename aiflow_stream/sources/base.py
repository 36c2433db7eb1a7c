"""What every frame source provides: frames with capture timestamps, a drop policy, a state."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from aiflow_stream.errors import SourceError


class SourceTimeout(SourceError, TimeoutError):
    """``read`` saw no frame within its ``timeout``; the source is still alive, call again.

    A subclass of ``SourceError`` so code that treats any error as a failure stays correct;
    a stalled source (a frozen server) raises a plain ``SourceError`` instead."""


class Policy(str, enum.Enum):
    """What a bounded queue does when its consumer falls behind (DESIGN.md section 5)."""

    LATEST = "latest"  # live sources: drop the oldest, and drop frames older than max_staleness
    BLOCK = "block"  # files and replays: never drop, the producer waits


class SourceState(str, enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RETRYING = "retrying"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass
class Frame:
    """One captured frame. ``image`` is RGB uint8 (H, W, 3)."""

    image: np.ndarray
    seq: int
    capture_ns: int  # time.time_ns() when the frame was captured
    truth: str | None = None  # ground-truth caption, where the source knows it (synthetic)
    scene_change: bool = False  # first frame of a new scene, where the source knows it


@runtime_checkable
class Source(Protocol):
    """A frame source. ``read`` returns the next frame, or ``None`` at end of stream; it raises
    ``SourceError`` on failure (``SourceTimeout`` when no frame came within ``timeout`` but the
    source is still alive) and never blocks longer than ``timeout`` seconds."""

    uri: str
    policy: Policy
    fps: float | None  # nominal rate where known (live pacing), else None

    def open(self) -> None: ...

    def read(self, timeout: float = 5.0) -> Frame | None: ...

    def close(self) -> None: ...
