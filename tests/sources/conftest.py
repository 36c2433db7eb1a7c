"""Fixtures for the source tests: a GStreamer RTSP server owned (and always killed) by the test."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SYSTEM_PYTHON = os.environ.get("AIFLOW_SYSTEM_PYTHON", "/usr/bin/python3")
SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")
_CHECK = (
    "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
    "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
    "assert Gst.ElementFactory.find('x264enc') and Gst.ElementFactory.find('rtph264pay')"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RtspServer:
    """``tests/sources/rtsp_server.py`` as a child process on 127.0.0.1:``port``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"rtsp://127.0.0.1:{port}/test"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "server already running"
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(SERVER_SCRIPT), str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"RTSP server exited with {self.proc.returncode}")
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready and self.proc.stdout.readline().startswith(b"READY"):
                break
        else:
            self.kill()
            raise RuntimeError(f"RTSP server not ready within {timeout} s")
        while time.monotonic() < deadline:  # READY means bound; make sure it accepts too
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"RTSP server does not accept on port {self.port}")

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but no data flows (a hung server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # works on a stopped process too
            self.proc.wait(5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


_have_rtsp: bool | None = None


def have_rtsp_server() -> bool:
    global _have_rtsp
    if _have_rtsp is None:
        try:
            done = subprocess.run([SYSTEM_PYTHON, "-c", _CHECK], capture_output=True, timeout=30)
            _have_rtsp = done.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _have_rtsp = False
    return _have_rtsp


@pytest.fixture
def rtsp_server() -> Iterator[RtspServer]:
    if not have_rtsp_server():
        pytest.skip(
            f"GStreamer RTSP server not available to {SYSTEM_PYTHON} "
            "(install it with scripts/install_rtsp_deps.sh)"
        )
    server = RtspServer(free_port())
    try:
        server.start()
        yield server
    finally:
        server.kill()
