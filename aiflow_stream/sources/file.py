"""Video files (anything FFmpeg decodes), replayed unpaced with backpressure (Policy.BLOCK)."""

from __future__ import annotations

import os

from aiflow_stream.errors import SourceError
from aiflow_stream.sources._av import AvSource
from aiflow_stream.sources.base import Policy


class FileSource(AvSource):
    """Every frame of the first video stream of ``path``, in order, never dropped.

    ``fps`` is the file's nominal rate once open. Decoding runs on a capture thread a few frames
    ahead of the reader; a file that stops yielding data fails after ``read_timeout``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        open_timeout: float = 10.0,
        read_timeout: float = 10.0,
        prefetch: int = 4,
        uri: str | None = None,
    ) -> None:
        path = os.fspath(path)
        super().__init__(
            uri or f"file://{os.path.abspath(path)}",
            path,
            policy=Policy.BLOCK,
            open_timeout=open_timeout,
            read_timeout=read_timeout,
            capacity=prefetch,
        )
        self.path = path

    def _open(self) -> None:
        if not os.path.isfile(self.path):
            raise SourceError(
                f"{self.uri}: no such video file {self.path!r} "
                "(expected a path like /data/clip.mp4 or file:///data/clip.mp4)"
            )
        super()._open()
