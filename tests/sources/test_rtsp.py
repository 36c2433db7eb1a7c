"""RtspSource against a real GStreamer RTSP server on 127.0.0.1: outage, freeze, recovery.

The server tests are marked ``rtsp`` and skip when GStreamer's RTSP server is not installed
(``scripts/install_rtsp_deps.sh`` installs it). The refused-connection tests need no server.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from aiflow_stream.errors import SourceError
from aiflow_stream.sources import (
    Frame,
    Policy,
    RtspSource,
    SourceState,
    SourceTimeout,
    SupervisedSource,
    open_source,
)
from tests.sources.conftest import RtspServer, free_port


def next_frame(src: SupervisedSource, budget: float) -> Frame:
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        try:
            f = src.read(timeout=0.5)
        except SourceTimeout:
            continue
        assert f is not None
        return f
    raise AssertionError(f"no frame within {budget} s (state {src.state.value})")


def wait_state(src: SupervisedSource, states: list[SourceState], want: SourceState,
               budget: float) -> float:
    """Keep reading (as a capture loop would) until ``want`` is reached; the seconds it took."""
    start = time.monotonic()
    while want not in states:
        assert time.monotonic() - start < budget, f"no {want.value} within {budget} s: {states}"
        try:
            src.read(timeout=0.2)
        except SourceTimeout:
            pass
    return time.monotonic() - start


def test_nothing_listening_fails_fast() -> None:
    url = f"rtsp://127.0.0.1:{free_port()}/test"
    src = open_source(url, open_timeout=3.0)
    assert isinstance(src, RtspSource) and src.policy is Policy.LATEST
    start = time.monotonic()
    with pytest.raises(SourceError, match=f"{url}: cannot open"):
        src.open()
    assert time.monotonic() - start < 2.0


def test_nothing_listening_supervised_retries_then_fails() -> None:
    url = f"rtsp://127.0.0.1:{free_port()}/test"
    states: list[SourceState] = []
    src = SupervisedSource(lambda: open_source(url, open_timeout=3.0), backoff_initial=0.05,
                           max_retries=2, on_state=states.append)
    start = time.monotonic()
    with src, pytest.raises(SourceError, match="gave up after 2 retries"):
        wait_state(src, states, SourceState.FAILED, budget=10.0)
        src.read(timeout=0.5)
    assert states == [SourceState.RETRYING, SourceState.FAILED] and src.restarts == 2
    assert time.monotonic() - start < 5.0


@pytest.mark.rtsp
def test_server_outage_is_retried_and_recovers(rtsp_server: RtspServer) -> None:
    states: list[SourceState] = []
    src = SupervisedSource(lambda: open_source(rtsp_server.url, read_timeout=2.0),
                           backoff_initial=0.2, backoff_max=1.0, on_state=states.append)
    with src:
        first = [next_frame(src, budget=10.0) for _ in range(5)]
        assert all(f.image.shape == (240, 320, 3) and f.image.dtype == np.uint8 for f in first)
        assert states == [SourceState.RUNNING] and src.fps and src.fps > 0
        rtsp_server.kill()
        wait_state(src, states, SourceState.RETRYING, budget=8.0)
        outage = time.monotonic()
        rtsp_server.start()  # same port
        after = [next_frame(src, budget=15.0) for _ in range(5)]
        recovered = time.monotonic() - outage
        assert states == [SourceState.RUNNING, SourceState.RETRYING, SourceState.RUNNING]
        assert src.state is SourceState.RUNNING and src.restarts >= 1
        assert recovered < 10.0
    seqs = [f.seq for f in first + after]
    assert seqs == sorted(set(seqs))
    assert after[0].capture_ns > first[-1].capture_ns


@pytest.mark.rtsp
def test_frozen_server_never_hangs(rtsp_server: RtspServer) -> None:
    src = RtspSource(rtsp_server.url, read_timeout=1.5)
    with src:
        deadline = time.monotonic() + 10.0
        while True:
            try:
                if src.read(timeout=0.5) is not None:
                    break
            except SourceTimeout:
                assert time.monotonic() < deadline
        rtsp_server.freeze()
        start = time.monotonic()
        with pytest.raises(SourceError) as info:  # a plain SourceError: the stream is dead
            while time.monotonic() - start < 8.0:
                try:
                    src.read(timeout=0.5)
                except SourceTimeout:
                    continue
        assert not isinstance(info.value, SourceTimeout)
        waited = time.monotonic() - start
        assert waited < 3.5, f"took {waited:.1f} s to notice the frozen server"
    close_start = time.monotonic()
    src.close()
    assert time.monotonic() - close_start < 1.0
