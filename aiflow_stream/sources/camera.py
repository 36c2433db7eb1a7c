"""Local cameras through OpenCV (V4L2 on Linux), Policy.LATEST."""

from __future__ import annotations

import glob
import logging
import os
import sys
import threading
from collections.abc import Generator

import cv2
import numpy as np

from aiflow_stream.errors import SourceError
from aiflow_stream.sources._common import BaseSource, Pump
from aiflow_stream.sources.base import Frame, Policy

log = logging.getLogger(__name__)


class CameraSource(BaseSource):
    """Frames from camera ``index`` (``/dev/video<index>`` on Linux). A capture thread keeps only
    the newest ``buffer`` frames; a camera that stops delivering for ``read_timeout`` seconds, or
    is unplugged, fails with ``SourceError`` (a supervisor then retries)."""

    endless = True

    def __init__(
        self,
        index: int,
        *,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
        open_timeout: float = 10.0,
        read_timeout: float = 5.0,
        buffer: int = 1,
    ) -> None:
        super().__init__(f"camera://{index}", Policy.LATEST, fps)
        self.index = int(index)
        self._size = (width, height)
        self._open_timeout = float(open_timeout)
        self._read_timeout = float(read_timeout)
        self._buffer = buffer
        self._pump: Pump | None = None

    @property
    def device(self) -> str:
        return f"/dev/video{self.index}"

    def _open(self) -> None:
        if sys.platform.startswith("linux") and not os.path.exists(self.device):
            found = sorted(glob.glob("/dev/video*"))
            seen = f"found {', '.join(found)}" if found else "no /dev/video* devices at all"
            raise SourceError(
                f"{self.uri}: no video device {self.device} ({seen}; is it plugged in? "
                "`v4l2-ctl --list-devices` lists them)"
            )
        self._pump = Pump(
            self.uri, self._produce, policy=Policy.LATEST, capacity=self._buffer,
            stall_timeout=self._read_timeout,
        )
        self._pump.start(wait=self._open_timeout)

    def _read(self, timeout: float) -> Frame | None:
        assert self._pump is not None
        return self._pump.get(timeout)

    def _close(self) -> None:
        if self._pump is not None:
            self._pump.stop()

    def _produce(self, stop: threading.Event, ready: threading.Event) -> Generator[np.ndarray, None, None]:
        backend = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
        cap = cv2.VideoCapture(self.index, backend)
        try:
            if not cap.isOpened():
                raise SourceError(
                    f"{self.uri}: cannot open {self.device} (busy, or not a capture device?)"
                )
            width, height = self._size
            if width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            if height:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
            if self.fps:
                cap.set(cv2.CAP_PROP_FPS, self.fps)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # keep the driver from queueing stale frames
            actual = cap.get(cv2.CAP_PROP_FPS)
            if actual and actual > 0:
                self.fps = float(actual)
            ready.set()
            while not stop.is_set():
                ok, bgr = cap.read()
                if not ok or bgr is None:
                    raise SourceError(
                        f"{self.uri}: {self.device} stopped delivering frames (unplugged?)"
                    )
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        finally:
            cap.release()
