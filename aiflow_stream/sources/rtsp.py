"""RTSP cameras and servers through PyAV, with timeouts so a dead or frozen server never hangs.

Without them a frozen server blocks PyAV forever (and OpenCV for ~30 s). Here the connection
must open within ``open_timeout`` and a read that gets no data for ``read_timeout`` fails; the
end of the stream is an outage too (``SourceError``), for a supervisor to retry.
"""

from __future__ import annotations

from aiflow_stream.errors import SourceError
from aiflow_stream.sources._av import AvSource
from aiflow_stream.sources.base import Policy

_TRANSPORTS = ("tcp", "udp", "udp_multicast", "http")


class RtspSource(AvSource):
    """Live frames from ``url`` (``rtsp://`` or ``rtsps://``), Policy.LATEST: the capture thread
    keeps only the newest ``buffer`` frames, so a slow reader gets fresh frames, not old ones."""

    def __init__(
        self,
        url: str,
        *,
        transport: str = "tcp",
        open_timeout: float = 5.0,
        read_timeout: float = 5.0,
        buffer: int = 1,
    ) -> None:
        if transport not in _TRANSPORTS:
            raise SourceError(
                f"{url}: transport must be one of {', '.join(_TRANSPORTS)} (got {transport!r})"
            )
        options = {
            "rtsp_transport": transport,
            # Socket I/O timeout in microseconds (FFmpeg >= 5 calls it "timeout").
            "timeout": str(int(read_timeout * 1e6)),
            "fflags": "nobuffer",
            "flags": "low_delay",
            "analyzeduration": "500000",
            "probesize": "65536",
        }
        super().__init__(
            url,
            url,
            policy=Policy.LATEST,
            options=options,
            open_timeout=open_timeout,
            read_timeout=read_timeout,
            capacity=buffer,
            endless=True,
        )
