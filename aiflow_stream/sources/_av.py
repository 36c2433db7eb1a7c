"""PyAV decoding on a capture thread, shared by the file and RTSP sources.

Every blocking call into FFmpeg runs under PyAV's ``timeout=(open, read)`` interrupt, and the
thread is watched by the pump's stall timer, so neither a corrupt file nor a frozen server can
hang the caller: ``open`` returns or fails within ``open_timeout``, ``read`` within its timeout.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Generator

import numpy as np

from aiflow_stream.errors import SourceError
from aiflow_stream.sources._common import BaseSource, Pump
from aiflow_stream.sources.base import Frame, Policy

log = logging.getLogger(__name__)


class AvSource(BaseSource):
    """Decodes the first video stream of ``url`` (anything FFmpeg opens) to RGB frames."""

    def __init__(
        self,
        uri: str,
        url: str,
        *,
        policy: Policy,
        options: dict[str, str] | None = None,
        open_timeout: float = 10.0,
        read_timeout: float = 5.0,
        capacity: int = 2,
        endless: bool = False,
    ) -> None:
        if open_timeout <= 0 or read_timeout <= 0:
            raise SourceError(
                f"{uri}: open_timeout and read_timeout must be > 0 "
                f"(got {open_timeout} and {read_timeout})"
            )
        super().__init__(uri, policy, None)
        self.endless = endless
        self._url = url
        self._options = dict(options or {})
        self._open_timeout = float(open_timeout)
        self._read_timeout = float(read_timeout)
        self._capacity = capacity
        self._pump: Pump | None = None

    @property
    def dropped(self) -> int:
        """Frames dropped because the reader fell behind (LATEST policy only)."""
        return self._pump.dropped if self._pump is not None else 0

    def _open(self) -> None:
        self._pump = Pump(
            self.uri,
            self._produce,
            policy=self.policy,
            capacity=self._capacity,
            # PyAV's interrupt fires only after ~2x read_timeout (FFmpeg retries the read), and
            # never for a hang outside its I/O; the pump's timer declares the stall on time.
            stall_timeout=self._read_timeout,
        )
        self._pump.start(wait=self._open_timeout + 1.0)

    def _read(self, timeout: float) -> Frame | None:
        assert self._pump is not None
        return self._pump.get(timeout)

    def _close(self) -> None:
        if self._pump is not None:
            self._pump.stop()

    def _produce(self, stop: threading.Event, ready: threading.Event) -> Generator[np.ndarray, None, None]:
        import av  # ~70 ms, so only when a file or stream is actually opened

        try:
            container = av.open(
                self._url,
                options=self._options,
                timeout=(self._open_timeout, self._read_timeout),
            )
        except (av.FFmpegError, OSError) as err:
            raise SourceError(f"{self.uri}: cannot open: {_describe(err)}") from err
        try:
            if not container.streams.video:
                raise SourceError(f"{self.uri}: has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if rate:
                self.fps = float(rate)
            log.debug("%s: opened (%s, %s fps)", self.uri, stream.codec_context.name, self.fps)
            ready.set()
            for frame in container.decode(stream):
                if stop.is_set():
                    return
                yield frame.to_ndarray(format="rgb24")
            if self.endless and not stop.is_set():
                raise SourceError(f"{self.uri}: the stream ended (server closed it)")
        except av.FFmpegError as err:
            if stop.is_set():
                return
            raise SourceError(f"{self.uri}: read failed: {_describe(err)}") from err
        finally:
            container.close()


def _describe(err: BaseException) -> str:
    import av

    if isinstance(err, av.error.ExitError):
        return "timed out (no data from the peer)"
    return str(err)
