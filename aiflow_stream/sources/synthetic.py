"""Synthetic camera: procedural scenes with a ground-truth caption on every frame.

The stream is a sequence of scenes from :mod:`aiflow_stream.scenes`, each held for a random
``min_scene_s``..``max_scene_s`` seconds of frames at the nominal ``fps``. Everything is a pure
function of ``seed`` and the frame index (the scene, the scene-change indices, the drift of the
shapes and the noise tile), so a frame can be re-rendered exactly and the keyframe benchmark can
score recall against :meth:`SyntheticSource.change_frames`.

Live mode (``live=True``, the default) behaves like a camera: frame ``i`` is due at
``t0 + i / fps``; ``read`` sleeps until the next frame is due, and a reader that falls behind gets
the frame due *now* (the ones it missed are gone, leaving gaps in ``seq``, which is always the
frame index). ``live=False`` renders every frame as fast as it is read and never drops.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
import time
from collections.abc import Iterator

import numpy as np

from aiflow_stream import scenes as grammar
from aiflow_stream.errors import SourceError
from aiflow_stream.sources._common import BaseSource
from aiflow_stream.sources.base import Frame, Policy, SourceTimeout

log = logging.getLogger(__name__)

SPLITS = ("heldout", "train", "any")
_MOTION_PERIOD_S = 7.0  # one slow drift cycle of the shapes


@functools.lru_cache(maxsize=2)
def _noise_bank(height: int, width: int, std: float, seed: int) -> np.ndarray:
    # ~1 s and 11 MB at 1280x720, so one bank is shared by every source with the same settings.
    bank = grammar.noise_bank(height, width, std, count=4, seed=seed)
    bank.setflags(write=False)
    return bank


class SyntheticSource(BaseSource):
    """Procedural scenes at ``width x height``, ``fps`` nominal, ``frames`` long (None: endless)."""

    def __init__(
        self,
        *,
        seed: int = 0,
        fps: float = 30.0,
        width: int = 1280,
        height: int = 720,
        frames: int | None = None,
        noise: float = 6.0,
        min_scene_s: float = 2.0,
        max_scene_s: float = 6.0,
        live: bool = True,
        split: str = "heldout",
        motion: float = 1.0,
        uri: str | None = None,
    ) -> None:
        problems = []
        if not fps > 0:
            problems.append(f"fps must be > 0 (got {fps})")
        if width < 16 or height < 16:
            problems.append(f"width and height must be >= 16 (got {width}x{height})")
        if frames is not None and frames < 0:
            problems.append(f"frames must be >= 0 or omitted for endless (got {frames})")
        if noise < 0:
            problems.append(f"noise must be >= 0 (got {noise})")
        if not 0 < min_scene_s <= max_scene_s:
            problems.append(
                f"need 0 < min_scene_s <= max_scene_s (got {min_scene_s} and {max_scene_s})"
            )
        if split not in SPLITS:
            problems.append(f"split must be one of {', '.join(SPLITS)} (got {split!r})")
        if not 0 <= motion <= 1:
            problems.append(f"motion must be in [0, 1] (got {motion})")
        if problems:
            raise SourceError(
                "synthetic source: " + "; ".join(problems)
                + " (example: synthetic://?seed=7&fps=30&width=1280&height=720)"
            )
        super().__init__(
            uri or f"synthetic://?seed={seed}",
            Policy.LATEST if live else Policy.BLOCK,
            float(fps),
        )
        self.seed = int(seed)
        self.width, self.height = int(width), int(height)
        self.frames = None if frames is None else int(frames)
        self.endless = self.frames is None
        self.noise = float(noise)
        self.live = bool(live)
        self.split = split
        self.motion = float(motion)
        # Scene lengths in frames: every change lies min..max seconds after the previous one.
        self._min_len = max(1, math.ceil(min_scene_s * fps - 1e-9))
        self._max_len = max(self._min_len, math.floor(max_scene_s * fps + 1e-9))
        self._len_rng = np.random.default_rng([self.seed, 0x5CE])
        self._scene_iter: Iterator[grammar.Scene] = grammar.scenes(self.seed, split)
        self._starts: list[int] = [0]  # first frame index of each scene
        self._scenes: list[grammar.Scene] = [next(self._scene_iter)]
        self._bank: np.ndarray | None = None
        self._t0: float | None = None
        self._next = 0  # lowest frame index not yet delivered
        self._last_scene = -1  # scene index of the last delivered frame

    # -- ground truth ---------------------------------------------------------------------------

    def change_frames(self, n_frames: int | None = None) -> list[int]:
        """Frame indices where a new scene starts, below ``n_frames`` (default: the whole stream;
        required for an endless stream). Index 0, the first scene's start, is included."""
        n = self.frames if n_frames is None else n_frames
        if n is None:
            raise ValueError("change_frames needs n_frames for an endless synthetic stream")
        if n <= 0:
            return []
        self._extend(n - 1)
        return self._starts[: bisect.bisect_left(self._starts, n)]

    def scene_index(self, index: int) -> int:
        """Which scene (0, 1, ...) frame ``index`` shows."""
        if index < 0:
            raise ValueError(f"frame index must be >= 0, got {index}")
        self._extend(index)
        return bisect.bisect_right(self._starts, index) - 1

    def scene_at(self, index: int) -> grammar.Scene:
        """The scene frame ``index`` shows."""
        return self._scenes[self.scene_index(index)]

    def truth_at(self, index: int) -> str:
        """The ground-truth caption of frame ``index``."""
        return self.scene_at(index).caption

    def render_frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as RGB uint8 (H, W, 3), the same image every time."""
        scene = self.scene_at(index)
        t = index / self.fps  # type: ignore[operator]
        phase = 2 * math.pi * t / _MOTION_PERIOD_S
        drift = (self.motion * math.sin(phase), self.motion * math.sin(0.7 * phase + 1.0))
        if self.noise > 0 and self._bank is None:
            self._bank = _noise_bank(self.height, self.width, self.noise, self.seed)
        return grammar.render(
            scene,
            self.width,
            self.height,
            noise=self.noise,
            motion=drift,
            rng=np.random.default_rng([self.seed, index]),
            noise_bank=self._bank,
        )

    def _extend(self, index: int) -> None:
        while self._starts[-1] <= index:
            start = self._starts[-1] + int(self._len_rng.integers(self._min_len, self._max_len + 1))
            scene = next(self._scene_iter)
            while scene.caption == self._scenes[-1].caption:  # a change must change the caption
                scene = next(self._scene_iter)
            self._starts.append(start)
            self._scenes.append(scene)

    # -- Source -------------------------------------------------------------------------------

    def _open(self) -> None:
        if self.noise > 0:
            self._bank = _noise_bank(self.height, self.width, self.noise, self.seed)
        self._t0 = None  # the clock starts at the first read, like a camera that starts streaming
        log.debug("%s: open (%dx%d @ %g fps, live=%s)", self.uri, self.width, self.height,
                  self.fps, self.live)

    def _read(self, timeout: float) -> Frame | None:
        index = self._next
        if self.frames is not None and index >= self.frames:
            return None
        if self.live:
            period = 1.0 / self.fps  # type: ignore[operator]
            now = time.monotonic()
            if self._t0 is None:
                self._t0 = now - index * period
            # A late reader gets the frame due now, as a camera would.
            index = max(index, int((now - self._t0) / period))
            due = self._t0 + index * period
            if due - now > timeout:
                time.sleep(timeout)
                raise SourceTimeout(f"{self.uri}: next frame due in {due - now:.3f} s")
            if due > now:
                time.sleep(due - now)
        if self.frames is not None and index >= self.frames:
            return None
        capture_ns = time.time_ns()
        scene = self.scene_index(index)
        image = self.render_frame(index)
        self._next = index + 1
        change = scene != self._last_scene
        self._last_scene = scene
        return Frame(
            image=image,
            seq=index,
            capture_ns=capture_ns,
            truth=self._scenes[scene].caption,
            scene_change=change,
        )

    def _close(self) -> None:
        self._bank = None
