"""Keeps a source alive: reopen with exponential backoff after a failure (DESIGN.md section 6).

An RTSP outage or an unplugged camera is retried, not fatal. The supervisor runs the inner
source on its own thread, so its ``read(timeout)`` never blocks longer than ``timeout`` even
while the inner source is opening or backing off.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Generator

from aiflow_stream.errors import SourceError
from aiflow_stream.sources._common import Pump
from aiflow_stream.sources.base import Frame, Policy, Source, SourceState, SourceTimeout

log = logging.getLogger(__name__)

_FINAL = (SourceState.FAILED, SourceState.STOPPED)
_POLL_S = 0.25  # how often the worker looks up from a quiet source to check for close


class SupervisedSource:
    """A source that survives failures of the source ``factory`` builds.

    ``factory`` builds an *unopened* source; it is called once here (so a bad configuration
    fails at once and ``uri``/``policy``/``fps`` are known) and again for every reopen.
    On ``SourceError``, or when a live source (``policy`` LATEST and ``endless``) ends, the
    source is closed and reopened after ``backoff_initial`` seconds, doubling up to
    ``backoff_max``; after ``max_retries`` consecutive failed reopens (``None``: never) the state
    becomes FAILED and ``read`` raises. The end of a BLOCK source is the end of the stream.

    ``state`` moves STARTING -> RUNNING -> RETRYING -> RUNNING ... and ends FAILED or STOPPED;
    ``on_state`` is called with each new state (from the worker thread); ``restarts`` counts
    reopens. Frame ``seq`` keeps increasing across reopens.
    """

    def __init__(
        self,
        factory: Callable[[], Source],
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        max_retries: int | None = None,
        on_state: Callable[[SourceState], None] | None = None,
    ) -> None:
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise SourceError(
                f"need 0 < backoff_initial <= backoff_max (got {backoff_initial}, {backoff_max})"
            )
        if max_retries is not None and max_retries < 0:
            raise SourceError(f"max_retries must be >= 0 or None (got {max_retries})")
        self._factory = factory
        self._first: Source | None = factory()
        self.uri: str = self._first.uri
        self.policy: Policy = self._first.policy
        self.fps: float | None = self._first.fps
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.max_retries = max_retries
        self.on_state = on_state
        self.state = SourceState.STARTING
        self.restarts = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._pump: Pump | None = None
        self._closed = False

    def open(self) -> None:
        """Start the worker; returns at once (the first open happens on the worker)."""
        if self._closed:
            raise SourceError(f"{self.uri}: supervised source is closed")
        if self._pump is None:
            capacity = 1 if self.policy is Policy.LATEST else 4
            self._pump = Pump(f"supervised:{self.uri}", self._run, policy=self.policy,
                              capacity=capacity, stall_timeout=None)
            self._pump.start()

    def read(self, timeout: float = 5.0) -> Frame | None:
        self.open()
        assert self._pump is not None
        return self._pump.get(max(0.0, timeout))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._set_state(SourceState.STOPPED, "closed")
        if self._pump is not None:
            self._pump.stop()
        elif self._first is not None:
            self._first.close()

    def __enter__(self) -> SupervisedSource:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SupervisedSource({self.uri!r}, state={self.state.value}, restarts={self.restarts})"

    def _set_state(self, state: SourceState, why: str = "") -> None:
        with self._lock:
            if self.state == state or self.state in _FINAL:
                return
            old, self.state = self.state, state
        level = logging.WARNING if state in (SourceState.RETRYING, SourceState.FAILED) else logging.INFO
        log.log(level, "%s: %s -> %s%s", self.uri, old.value, state.value, f" ({why})" if why else "")
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:  # a broken callback must not kill the source
                log.exception("%s: on_state callback failed", self.uri)

    def _run(self, stop: threading.Event, ready: threading.Event) -> Generator[Frame, None, None]:
        ready.set()
        src, self._first = self._first, None
        failures = 0  # consecutive failed attempts
        last_seq = -1
        try:
            while not stop.is_set():
                offset = last_seq + 1  # the new instance counts from 0 again
                try:
                    if src is None:
                        src = self._factory()
                    src.open()
                    if src.fps:
                        self.fps = src.fps
                    while not stop.is_set():
                        try:
                            frame = src.read(_POLL_S)
                        except SourceTimeout:
                            continue
                        if frame is None:
                            break
                        if failures or self.state is SourceState.STARTING:
                            failures = 0
                            self._set_state(SourceState.RUNNING)
                        last_seq = max(last_seq + 1, frame.seq + offset)
                        yield dataclasses.replace(frame, seq=last_seq)
                    if stop.is_set():
                        return
                    if not (src.policy is Policy.LATEST and getattr(src, "endless", True)):
                        self._set_state(SourceState.STOPPED, "end of stream")
                        return
                    error = f"{self.uri}: live stream ended"
                except SourceError as err:
                    error = str(err)
                except Exception as err:  # a bug in a source is one more failure, not a crash
                    log.exception("%s: source raised a non-SourceError", self.uri)
                    error = f"{self.uri}: {type(err).__name__}: {err}"
                if src is not None:
                    src.close()
                    src = None
                failures += 1
                self.last_error = error
                if self.max_retries is not None and failures > self.max_retries:
                    self._set_state(SourceState.FAILED, error)
                    raise SourceError(
                        f"{self.uri}: gave up after {self.max_retries} retries: {error}"
                    )
                delay = min(self.backoff_max, self.backoff_initial * 2 ** (failures - 1))
                self._set_state(SourceState.RETRYING, error)
                log.info("%s: reopening in %.2f s (attempt %d)", self.uri, delay, failures)
                if stop.wait(delay):
                    return
                self.restarts += 1
        finally:
            if src is not None:
                src.close()
