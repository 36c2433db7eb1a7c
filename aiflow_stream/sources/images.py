"""A folder of still images (png/jpg), read in name order as a stream (Policy.BLOCK)."""

from __future__ import annotations

import logging
import os
import time

import cv2

from aiflow_stream.errors import SourceError
from aiflow_stream.sources._common import BaseSource
from aiflow_stream.sources.base import Frame, Policy

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg")


class ImageFolderSource(BaseSource):
    """Each image of ``folder`` once, sorted by file name; ``fps`` is only a label (no pacing)."""

    def __init__(
        self, folder: str | os.PathLike[str], *, fps: float | None = None, uri: str | None = None
    ) -> None:
        folder = os.fspath(folder)
        super().__init__(uri or f"images://{os.path.abspath(folder)}", Policy.BLOCK, fps)
        self.folder = folder
        self.paths: list[str] = []
        self._next = 0

    def _open(self) -> None:
        if not os.path.isdir(self.folder):
            raise SourceError(
                f"{self.uri}: no such folder {self.folder!r} "
                "(expected a folder of .png/.jpg images, e.g. images:///data/frames)"
            )
        names = sorted(n for n in os.listdir(self.folder) if n.lower().endswith(EXTENSIONS))
        if not names:
            raise SourceError(f"{self.uri}: no .png or .jpg images in {self.folder!r}")
        self.paths = [os.path.join(self.folder, n) for n in names]
        log.debug("%s: %d images", self.uri, len(self.paths))

    def _read(self, timeout: float) -> Frame | None:
        if self._next >= len(self.paths):
            return None
        path = self.paths[self._next]
        capture_ns = time.time_ns()
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise SourceError(f"{self.uri}: cannot decode image {path!r} (corrupt or not an image)")
        frame = Frame(image=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), seq=self._next, capture_ns=capture_ns)
        self._next += 1
        return frame

    def _close(self) -> None:
        self.paths = []
