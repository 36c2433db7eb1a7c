"""SupervisedSource: backoff and reopen after failures, final states, bounded reads."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from aiflow_stream.errors import SourceError
from aiflow_stream.sources import (
    Frame,
    Policy,
    SourceState,
    SourceTimeout,
    SupervisedSource,
    open_source,
)


class Flaky:
    """A live test source: delivers ``good`` frames per instance, then fails (or ends).
    ``opens_fail`` makes the first N opens across all instances fail."""

    def __init__(self, shared: dict, *, good: int = 3, end_instead: bool = False) -> None:
        self.uri, self.policy, self.fps = "flaky://", Policy.LATEST, 100.0
        self.endless = True
        self.shared, self.good, self.end_instead = shared, good, end_instead
        self.n = 0
        shared["built"] = shared.get("built", 0) + 1

    def open(self) -> None:
        self.shared["opens"] = self.shared.get("opens", 0) + 1
        if self.shared["opens"] <= self.shared.get("opens_fail", 0):
            raise SourceError("flaky://: refused")

    def read(self, timeout: float = 5.0) -> Frame | None:
        if self.n >= self.good:
            if self.end_instead:
                return None
            raise SourceError("flaky://: connection lost")
        time.sleep(0.002)
        self.n += 1
        return Frame(np.full((2, 2, 3), self.n, np.uint8), seq=self.n - 1, capture_ns=time.time_ns())

    def close(self) -> None:
        self.shared["closes"] = self.shared.get("closes", 0) + 1


def collect(src: SupervisedSource, n: int, budget: float = 10.0) -> list[Frame]:
    out: list[Frame] = []
    deadline = time.monotonic() + budget
    while len(out) < n and time.monotonic() < deadline:
        try:
            f = src.read(timeout=0.5)
        except SourceTimeout:
            continue
        assert f is not None
        out.append(f)
    return out


@pytest.mark.parametrize("end_instead", [False, True])
def test_reopens_after_failure_or_live_end(end_instead: bool) -> None:
    shared: dict = {}
    states: list[SourceState] = []
    src = SupervisedSource(lambda: Flaky(shared, end_instead=end_instead),
                           backoff_initial=0.02, backoff_max=0.05, on_state=states.append)
    with src:
        frames = collect(src, 10)
    assert len(frames) == 10
    seqs = [f.seq for f in frames]
    assert seqs == sorted(set(seqs))  # strictly increasing across reopens
    assert src.restarts >= 3 and shared["built"] >= 4
    assert states[:3] == [SourceState.RUNNING, SourceState.RETRYING, SourceState.RUNNING]
    assert states[-1] is SourceState.STOPPED and src.state is SourceState.STOPPED
    assert "connection lost" in (src.last_error or "") or end_instead


def test_gives_up_after_max_retries() -> None:
    shared: dict = {"opens_fail": 100}
    states: list[SourceState] = []
    src = SupervisedSource(lambda: Flaky(shared), backoff_initial=0.02, max_retries=2,
                           on_state=states.append)
    start = time.monotonic()
    with src, pytest.raises(SourceError, match="gave up after 2 retries.*refused"):
        while time.monotonic() - start < 5:
            try:
                src.read(timeout=0.2)
            except SourceTimeout:
                continue
    assert shared["opens"] == 3 and src.restarts == 2
    assert states == [SourceState.RETRYING, SourceState.FAILED]
    assert time.monotonic() - start < 2.0


def test_backoff_grows_and_recovers() -> None:
    shared: dict = {"opens_fail": 3}
    stamps: list[float] = []
    src = SupervisedSource(lambda: Flaky(shared, good=1000), backoff_initial=0.05,
                           on_state=lambda s: stamps.append(time.monotonic()))
    start = time.monotonic()
    with src:
        frames = collect(src, 5)
    assert len(frames) == 5 and [f.seq for f in frames] == list(range(5))
    # three failed opens wait 0.05 + 0.1 + 0.2 s before the fourth succeeds
    assert stamps[1] - start >= 0.34
    assert src.restarts == 3


def test_read_never_blocks_past_timeout_while_backing_off() -> None:
    shared: dict = {"opens_fail": 100}
    src = SupervisedSource(lambda: Flaky(shared), backoff_initial=5.0)
    with src:
        for _ in range(3):
            start = time.monotonic()
            with pytest.raises(SourceTimeout):
                src.read(timeout=0.1)
            assert time.monotonic() - start < 0.3
        assert src.state is SourceState.RETRYING
    assert src.state is SourceState.STOPPED


def test_block_source_end_is_end_of_stream() -> None:
    states: list[SourceState] = []
    src = SupervisedSource(lambda: open_source("synthetic://?frames=7&live=0&width=64&height=36"),
                           on_state=states.append)
    assert src.policy is Policy.BLOCK and src.uri.startswith("synthetic://")
    with src:
        frames = collect(src, 7)
        assert src.read(timeout=2.0) is None
    assert [f.seq for f in frames] == list(range(7)) and frames[0].truth
    assert states == [SourceState.RUNNING, SourceState.STOPPED] and src.restarts == 0


def test_bad_configuration_fails_at_construction() -> None:
    with pytest.raises(SourceError, match="unknown source kind"):
        SupervisedSource(lambda: open_source("bogus://x"))


def test_close_stops_worker_promptly() -> None:
    shared: dict = {}
    src = SupervisedSource(lambda: Flaky(shared, good=10**9))
    src.open()
    assert collect(src, 2)
    start = time.monotonic()
    src.close()
    assert time.monotonic() - start < 1.0
    time.sleep(0.3)
    assert shared.get("closes", 0) >= 1
    assert not any(t.name == "source:supervised:flaky://" for t in threading.enumerate())


def test_factory_failing_on_reopen_counts_as_a_failed_attempt() -> None:
    shared: dict = {}
    calls = {"n": 0}

    def factory() -> Flaky:
        calls["n"] += 1
        if calls["n"] == 2:  # the first reopen cannot even build the source
            raise SourceError("flaky://: config vanished")
        return Flaky(shared, good=3)

    states: list[SourceState] = []
    src = SupervisedSource(factory, backoff_initial=0.02, on_state=states.append)
    with src:
        frames = collect(src, 5)
    assert len(frames) == 5 and calls["n"] >= 3
    assert states[:3] == [SourceState.RUNNING, SourceState.RETRYING, SourceState.RUNNING]
