"""Pieces every source shares: the open/read/close lifecycle and a background capture thread.

The thread (:class:`Pump`) exists because the libraries underneath (PyAV, OpenCV) block in C
without a way to interrupt them; running them on a daemon thread lets ``read(timeout)`` honour
its timeout and lets ``close`` return even when a frozen server leaves the thread stuck.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Generator

import numpy as np

from aiflow_stream.errors import SourceError
from aiflow_stream.sources.base import Frame, Policy, SourceTimeout

log = logging.getLogger(__name__)

# A producer opens its resources, sets ``ready``, then yields RGB uint8 images (numbered and
# timestamped by the pump) or whole Frames (passed through); it frees its resources in
# ``finally`` (the pump closes the generator on stop). ``stop`` is set when the pump stops.
Producer = Callable[[threading.Event, threading.Event], Generator["np.ndarray | Frame", None, None]]


class BaseSource:
    """Lifecycle shared by the concrete sources: ``open`` is idempotent, ``read`` opens on first
    use, ``close`` is idempotent, and the source is a context manager."""

    uri: str
    policy: Policy
    fps: float | None
    # True for sources whose end is an outage (camera, RTSP), so a supervisor reopens them.
    endless: bool = False

    def __init__(self, uri: str, policy: Policy, fps: float | None) -> None:
        self.uri = uri
        self.policy = policy
        self.fps = fps
        self._opened = False
        self._closed = False

    def open(self) -> None:
        if self._closed:
            raise SourceError(f"{self.uri}: source is closed; build a new one to reopen")
        if not self._opened:
            self._open()
            self._opened = True

    def read(self, timeout: float = 5.0) -> Frame | None:
        self.open()
        return self._read(max(0.0, timeout))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._opened:
                self._close()

    def __enter__(self) -> BaseSource:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r}, policy={self.policy.value}, fps={self.fps})"

    def _open(self) -> None:
        raise NotImplementedError

    def _read(self, timeout: float) -> Frame | None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class Pump:
    """Runs a producer on a daemon thread and hands its frames over through a bounded buffer.

    ``Policy.LATEST``: the buffer keeps the newest ``capacity`` frames and drops the oldest
    (counted in ``dropped``). ``Policy.BLOCK``: the producer waits for room, nothing is dropped.
    Frames are numbered at capture, so frames dropped here show as gaps in ``seq``.
    If no frame arrives for ``stall_timeout`` seconds while the consumer waits, the source is
    declared stalled (the thread, possibly stuck in C, is abandoned and exits on its own).
    """

    def __init__(
        self,
        name: str,
        producer: Producer,
        *,
        policy: Policy,
        capacity: int = 2,
        stall_timeout: float | None = 10.0,
    ) -> None:
        self.name = name
        self.dropped = 0
        self._producer = producer
        self._policy = policy
        self._capacity = max(1, capacity)
        self._stall_timeout = stall_timeout
        self._buf: collections.deque[Frame] = collections.deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._eof = False
        self._seq = 0
        self._progress = time.monotonic()  # last frame put (BLOCK: or room made for one)
        self._thread = threading.Thread(target=self._run, name=f"source:{name}", daemon=True)

    def start(self, wait: float | None = None) -> None:
        """Start the thread; with ``wait``, block until the producer is ready (``SourceError``
        if it fails or is not ready within ``wait`` seconds)."""
        self._progress = time.monotonic()
        self._thread.start()
        if wait is None:
            return
        deadline = time.monotonic() + wait
        while not self._ready.wait(0.02):
            with self._cond:
                err, eof = self._error, self._eof
            if err is not None:
                raise _as_source_error(self.name, err)
            if eof:
                return
            if time.monotonic() > deadline:
                self.stop(0.0)
                raise SourceError(f"{self.name}: not open after {wait:g} s (timed out)")
        with self._cond:  # the stall timer starts once the source is open
            self._progress = max(self._progress, time.monotonic())

    def get(self, timeout: float) -> Frame | None:
        """The next frame, ``None`` at end of stream; ``SourceError`` on failure or stall,
        ``SourceTimeout`` when nothing came within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._buf:
                    frame = self._buf.popleft()
                    if self._policy is Policy.BLOCK:  # a producer waiting for room is not stalled
                        self._progress = max(self._progress, time.monotonic())
                    self._cond.notify_all()
                    return frame
                if self._error is not None:
                    raise _as_source_error(self.name, self._error)
                if self._eof:
                    return None
                now = time.monotonic()
                if self._stall_timeout is not None and now - self._progress > self._stall_timeout:
                    self._stop.set()
                    raise SourceError(
                        f"{self.name}: no frame for {now - self._progress:.1f} s "
                        f"(stalled; limit {self._stall_timeout:g} s)"
                    )
                if now >= deadline:
                    raise SourceTimeout(f"{self.name}: no frame within {timeout:g} s")
                wait = deadline - now
                if self._stall_timeout is not None:
                    wait = min(wait, self._progress + self._stall_timeout - now + 0.01)
                self._cond.wait(max(0.001, wait))

    def stop(self, join_timeout: float = 0.5) -> None:
        """Ask the producer to stop; wait a little for it, never longer than ``join_timeout``."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(join_timeout)
            if self._thread.is_alive():
                log.debug("%s: capture thread still busy after close; it exits on its own", self.name)

    def _put(self, item: np.ndarray | Frame, capture_ns: int) -> None:
        with self._cond:
            if self._policy is Policy.BLOCK:
                while len(self._buf) >= self._capacity and not self._stop.is_set():
                    self._cond.wait(0.1)
                if self._stop.is_set():
                    return
            elif len(self._buf) >= self._capacity:
                self._buf.popleft()
                self.dropped += 1
            if isinstance(item, Frame):
                self._buf.append(item)
            else:
                self._buf.append(Frame(image=item, seq=self._seq, capture_ns=capture_ns))
                self._seq += 1
            self._progress = time.monotonic()
            self._cond.notify_all()

    def _run(self) -> None:
        gen = self._producer(self._stop, self._ready)
        try:
            while not self._stop.is_set():
                try:
                    item = next(gen)
                except StopIteration:
                    with self._cond:
                        self._eof = True
                    return
                self._put(item, time.time_ns())
        except BaseException as err:  # handed to the consumer, who raises it as SourceError
            if not self._stop.is_set():
                log.debug("%s: capture thread failed: %s", self.name, err)
            with self._cond:
                self._error = err
        finally:
            gen.close()
            with self._cond:
                self._cond.notify_all()


def _as_source_error(name: str, err: BaseException) -> SourceError:
    if isinstance(err, SourceError):
        new = SourceError(str(err))
    else:
        new = SourceError(f"{name}: {type(err).__name__}: {err}")
    new.__cause__ = err
    return new
