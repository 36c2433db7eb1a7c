"""Userspace TCP relay that emulates a constrained network link (rate, delay, bounded buffer).

The kernel here has no netem, so link conditions for benchmarks come from this relay: a client
connects to ``listen``, the relay connects to ``target`` and forwards real bytes both ways. Each
direction is one shared *link* (all connections of the emulator compete for it, as flows do on a
real uplink) made of:

* a FIFO buffer bounded at ``queue_bytes``;
* a serialiser: a token bucket at ``rate_bps`` with a small bucket (``burst_bytes``) that takes
  packets of at most ``packet_bytes`` off the buffer; a packet finishes serialising at
  ``start + size * 8 / rate`` in *virtual* time (computed from read timestamps, so a late wake-up
  of the scheduler does not cost throughput);
* a delay line: each packet is written to the receiver ``delay_s`` after it finished serialising.

Full buffer: a real router drops the packet (drop-tail) and TCP backs off. A relay terminates
TCP on both sides, so a drop here would silently corrupt the byte stream; instead, when the buffer
is full the relay stops reading from the sender, the sender's socket buffers fill and its
``send`` blocks: TCP backpressure, the same end effect on the sender without loss. Nothing is
ever dropped (``LinkStats`` counts backpressure time instead of drops). Memory stays bounded: at
most ``queue_bytes`` queued, ``rate * delay`` in flight, and a small per-connection write buffer
(reading stops for a connection whose receiver is not keeping up).

FIN and RST travel in order behind the data that preceded them (a half-close is forwarded as a
half-close after the delay). Connection setup is not delayed: the relay accepts at once and
connects to the target at once. Timing runs on one thread with a scheduler on
``time.monotonic`` deadlines (epoll for long waits, a short sleep for the last millisecond).

Command line: ``python -m aiflow_stream.transport.emulator --listen 127.0.0.1:7001
--target 127.0.0.1:7000 --rate 1mbit --delay 10ms [--down-rate ... --down-delay ...]``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import errno
import json
import logging
import re
import selectors
import signal
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from aiflow_stream.errors import TransportError

__all__ = [
    "DirectionStats",
    "LinkEmulator",
    "LinkSpec",
    "LinkStats",
    "main",
    "measure_link",
    "parse_delay",
    "parse_rate",
    "parse_size",
]

logger = logging.getLogger(__name__)

_READ_CHUNK = 65536
_OUT_LIMIT = 65536  # bytes awaiting a slow receiver before its sender is no longer read
_DATA, _FIN, _RST = 0, 1, 2
_LINGER0 = struct.pack("ii", 1, 0)


@dataclasses.dataclass(frozen=True)
class LinkSpec:
    """One direction of the emulated link."""

    rate_bps: float
    delay_s: float
    queue_bytes: int
    burst_bytes: int
    packet_bytes: int

    @classmethod
    def build(
        cls,
        rate_bps: float,
        delay_s: float,
        queue_bytes: int | None = None,
        burst_bytes: int | None = None,
        packet_bytes: int | None = None,
    ) -> LinkSpec:
        """Fill defaults: packets of ~1 ms of rate (>= 1500 B), a one-packet bucket and a
        buffer of 100 ms of rate (>= 2 packets); raises ``ValueError`` on nonsense."""
        if not rate_bps > 0:
            raise ValueError(f"rate_bps must be > 0 bits/s, got {rate_bps!r}")
        if not delay_s >= 0:
            raise ValueError(f"delay_s must be >= 0 s, got {delay_s!r}")
        if packet_bytes is None:
            packet_bytes = min(65536, max(1500, int(rate_bps * 0.001 / 8)))
        if burst_bytes is None:
            burst_bytes = 1500
        if queue_bytes is None:
            queue_bytes = max(2 * packet_bytes, int(rate_bps * 0.1 / 8))
        if packet_bytes < 1 or queue_bytes < 1 or burst_bytes < 0:
            raise ValueError(
                f"need packet_bytes >= 1, queue_bytes >= 1, burst_bytes >= 0; got "
                f"{packet_bytes}, {queue_bytes}, {burst_bytes}"
            )
        return cls(float(rate_bps), float(delay_s), int(queue_bytes), int(burst_bytes),
                   int(packet_bytes))


@dataclasses.dataclass(frozen=True)
class DirectionStats:
    """Counters of one direction, summed over all connections."""

    bytes_in: int = 0  # read from the sending endpoint
    bytes_out: int = 0  # written to the receiving endpoint
    packets: int = 0
    max_queue_bytes: int = 0  # highest buffer occupancy seen (never above queue_bytes)
    backpressure_s: float = 0.0  # time the buffer was full and senders were not read
    max_late_s: float = 0.0  # worst delivery lateness versus schedule (emulator health)


@dataclasses.dataclass(frozen=True)
class LinkStats:
    """Snapshot of an emulator's counters; ``up`` is client -> target."""

    up: DirectionStats
    down: DirectionStats
    connections: int = 0
    open_connections: int = 0
    connect_failures: int = 0
    resets: int = 0

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class _Link:
    """Shared buffer + serialiser + delay line of one direction."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self.byte_s = 8.0 / spec.rate_bps
        self.burst_s = spec.burst_bytes * self.byte_s
        self.queue: collections.deque[_Entry] = collections.deque()
        self.queued = 0
        self.free_at = 0.0  # virtual time the serialiser becomes free
        self.line: collections.deque[tuple[float, _Half, int, bytes]] = collections.deque()
        self.halves: set[_Half] = set()
        self.full_since: float | None = None
        # counters
        self.bytes_in = 0
        self.bytes_out = 0
        self.packets = 0
        self.max_queued = 0
        self.backpressure_s = 0.0
        self.max_late_s = 0.0

    @property
    def full(self) -> bool:
        return self.queued >= self.spec.queue_bytes

    def snapshot(self, now: float) -> DirectionStats:
        bp = self.backpressure_s
        if self.full_since is not None:
            bp += now - self.full_since
        return DirectionStats(self.bytes_in, self.bytes_out, self.packets, self.max_queued,
                              bp, self.max_late_s)


class _Entry:
    __slots__ = ("half", "kind", "data", "t")

    def __init__(self, half: _Half, kind: int, data: memoryview | None, t: float) -> None:
        self.half = half
        self.kind = kind
        self.data = data
        self.t = t


class _Half:
    """One direction of one connection: reads ``src``, writes ``dst`` through ``link``."""

    __slots__ = ("conn", "src", "dst", "link", "eof", "dead", "queued", "out", "fin_due",
                 "fin_sent")

    def __init__(self, conn: _Conn, src: socket.socket, dst: socket.socket, link: _Link) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.link = link
        self.eof = False  # nothing more will be read from src (FIN, reset or abort)
        self.dead = False  # dst is gone: discard everything for it
        self.queued = 0  # bytes of this half in link.queue
        self.out = bytearray()  # delivered, not yet accepted by dst's kernel
        self.fin_due = False  # FIN delivered: shutdown dst once out is flushed
        self.fin_sent = False

    def can_read(self) -> bool:
        return (not self.eof and not self.dead and self.conn.connected
                and not self.link.full and len(self.out) < _OUT_LIMIT)


class _Conn:
    __slots__ = ("a", "b", "up", "down", "connected", "closed", "masks")

    def __init__(self, a: socket.socket, b: socket.socket, up: _Link, down: _Link) -> None:
        self.a = a
        self.b = b
        self.connected = False
        self.closed = False
        self.up = _Half(self, a, b, up)
        self.down = _Half(self, b, a, down)
        self.masks = {a.fileno(): 0, b.fileno(): 0}


def _split_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class LinkEmulator:
    """TCP relay from ``listen`` to ``target`` emulating a link; ``up`` is client -> target.

    Put it in front of the side that binds: for a device that connects to an edge, ``up`` is the
    device's uplink. ``down_*`` default to the ``up`` values. Defaults per direction: packets of
    ~1 ms of rate (at least 1500 B), ``burst_bytes`` 1500 (0 = every packet pays its full
    serialisation time), ``queue_bytes`` 100 ms of rate (at least two packets).
    ``socket_buffer_bytes`` caps the relay's own kernel socket buffers so that they add little
    hidden buffering (``None`` = kernel autotuning). Use as a context manager, or ``start()`` /
    ``stop()``; one background thread; ``stats`` may be read from any thread.
    """

    def __init__(
        self,
        listen: str = "127.0.0.1:0",
        target: str = "",
        rate_bps: float = 1e6,
        delay_s: float = 0.010,
        queue_bytes: int | None = None,
        *,
        down_rate_bps: float | None = None,
        down_delay_s: float | None = None,
        down_queue_bytes: int | None = None,
        burst_bytes: int | None = None,
        packet_bytes: int | None = None,
        socket_buffer_bytes: int | None = 65536,
    ) -> None:
        self._listen_at = _split_hostport(listen)
        self._target = _split_hostport(target)
        if self._target[1] == 0:
            raise ValueError(f"target needs the server's port, got {target!r}")
        self.up = LinkSpec.build(rate_bps, delay_s, queue_bytes, burst_bytes, packet_bytes)
        self.down = LinkSpec.build(
            rate_bps if down_rate_bps is None else down_rate_bps,
            delay_s if down_delay_s is None else down_delay_s,
            queue_bytes if down_queue_bytes is None else down_queue_bytes,
            burst_bytes,
            packet_bytes,
        )
        self._sockbuf = socket_buffer_bytes
        self._links = (_Link(self.up), _Link(self.down))
        self._conns: set[_Conn] = set()
        self._owner: dict[int, _Conn] = {}
        self._lsock: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None
        self._address = ""
        self._n_conns = 0
        self._n_fail = 0
        self._n_reset = 0

    # -- public -----------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """Bound ``host:port`` to connect to (valid after ``start()``)."""
        return self._address

    @property
    def stats(self) -> LinkStats:
        now = time.monotonic()
        up, down = self._links
        return LinkStats(up.snapshot(now), down.snapshot(now), self._n_conns, len(self._conns),
                         self._n_fail, self._n_reset)

    def start(self) -> LinkEmulator:
        """Bind ``listen`` and start relaying; raises ``TransportError`` if the bind fails."""
        if self._thread is not None:
            raise TransportError("LinkEmulator already started; create a new one to restart")
        host, port = self._listen_at
        try:
            lsock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host
                                         else socket.AF_INET, backlog=128)
        except OSError as err:
            raise TransportError(f"cannot listen on {host}:{port}: {err}") from err
        if self._sockbuf:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._sockbuf)
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sockbuf)
        lsock.setblocking(False)
        self._lsock = lsock
        bound = lsock.getsockname()
        self._address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(lsock, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name=f"link-emulator:{self._address}",
                                        daemon=True)
        self._thread.start()
        logger.info("link emulator %s -> %s:%d up %s down %s", self._address, *self._target,
                    self.up, self.down)
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """Close every socket (connections are aborted with RST) and join the thread."""
        thread = self._thread
        if thread is None or self._stopping:
            return
        self._stopping = True
        try:
            assert self._wake_w is not None
            self._wake_w.send(b"x")
        except OSError:
            pass
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("link emulator %s did not stop within %.1f s", self._address, timeout)
        if self._error is not None:
            raise TransportError(f"link emulator {self._address} failed: {self._error!r}") \
                from self._error

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- event loop -------------------------------------------------------------------------

    def _run(self) -> None:
        assert self._sel is not None
        sel = self._sel
        try:
            while not self._stopping:
                deadline = self._tick(time.monotonic())
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is None or timeout >= 0.0015:
                    # epoll rounds up to whole ms: wake up to 1 ms early, then sleep the rest
                    events = sel.select(None if timeout is None else timeout - 0.001)
                elif timeout > 0:
                    time.sleep(timeout)
                    events = sel.select(0)
                else:
                    events = sel.select(0)
                for key, mask in events:
                    self._on_event(key.fileobj, mask)  # type: ignore[arg-type]
        except BaseException as err:  # reported by stop()
            logger.exception("link emulator %s crashed", self._address)
            self._error = err
        finally:
            self._shutdown()

    def _tick(self, now: float) -> float | None:
        """Run due serialiser and delivery events; return the next deadline."""
        nxt: float | None = None
        for link in self._links:
            self._serialise(link, now)
            self._deliver(link, now)
            for t in (link.free_at if link.queue else None,
                      link.line[0][0] if link.line else None):
                if t is not None and (nxt is None or t < nxt):
                    nxt = t
        return nxt

    def _serialise(self, link: _Link, now: float) -> None:
        was_full = link.full
        spec = link.spec
        while link.queue and link.free_at <= now:
            e = link.queue[0]
            half = e.half
            if half.dead:
                link.queue.popleft()
                continue
            if e.kind != _DATA:
                link.queue.popleft()
                link.line.append((max(link.free_at, e.t) + spec.delay_s, half, e.kind, b""))
                continue
            assert e.data is not None
            n = min(len(e.data), spec.packet_bytes)
            pkt = bytes(e.data[:n])
            if n == len(e.data):
                link.queue.popleft()
            else:
                e.data = e.data[n:]
            start = max(link.free_at, e.t - link.burst_s)
            link.free_at = start + n * link.byte_s
            link.queued -= n
            half.queued -= n
            link.packets += 1
            link.line.append((max(link.free_at, e.t) + spec.delay_s, half, _DATA, pkt))
        if was_full and not link.full:
            self._set_full(link, False, now)

    def _deliver(self, link: _Link, now: float) -> None:
        touched: list[_Half] = []
        while link.line and link.line[0][0] <= now:
            due, half, kind, data = link.line.popleft()
            late = now - due
            if late > link.max_late_s:
                link.max_late_s = late
            if half.dead or half.conn.closed:
                continue
            if kind == _DATA:
                half.out += data
            elif kind == _FIN:
                half.fin_due = True
            else:
                self._deliver_reset(half)
                continue
            touched.append(half)
        for half in touched:
            if not half.conn.closed and not half.dead:
                self._flush(half)

    def _on_event(self, sock: socket.socket, mask: int) -> None:
        if sock is self._lsock:
            self._accept()
            return
        if sock is self._wake_r:
            try:
                sock.recv(64)
            except OSError:
                pass
            return
        conn = self._owner.get(sock.fileno())
        if conn is None or conn.closed:
            return
        if mask & selectors.EVENT_WRITE:
            if sock is conn.b and not conn.connected:
                self._on_connected(conn)
            else:
                self._flush(conn.down if sock is conn.a else conn.up)
        if mask & selectors.EVENT_READ and not conn.closed:
            self._read(conn.up if sock is conn.a else conn.down)

    def _accept(self) -> None:
        assert self._lsock is not None
        while True:
            try:
                a, _ = self._lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                logger.warning("accept failed on %s: %s", self._address, err)
                return
            a.setblocking(False)
            a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            b = socket.socket(socket.AF_INET6 if ":" in self._target[0] else socket.AF_INET,
                              socket.SOCK_STREAM)
            b.setblocking(False)
            b.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._sockbuf:
                b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._sockbuf)
                b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sockbuf)
            conn = _Conn(a, b, *self._links)
            self._conns.add(conn)
            self._owner[a.fileno()] = conn
            self._owner[b.fileno()] = conn
            self._links[0].halves.add(conn.up)
            self._links[1].halves.add(conn.down)
            self._n_conns += 1
            rc = b.connect_ex(self._target)
            if rc not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                self._connect_failed(conn, rc)
                continue
            self._update(conn)

    def _on_connected(self, conn: _Conn) -> None:
        rc = conn.b.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if rc:
            self._connect_failed(conn, rc)
            return
        conn.connected = True
        logger.debug("%s: connection %s -> %s:%d open", self._address,
                     conn.a.getpeername(), *self._target)
        self._flush(conn.up)
        self._update(conn)

    def _connect_failed(self, conn: _Conn, rc: int) -> None:
        self._n_fail += 1
        logger.info("%s: cannot connect to target %s:%d: %s", self._address, *self._target,
                    errno.errorcode.get(rc, rc))
        self._close(conn, abort=True)

    def _read(self, half: _Half) -> None:
        if not half.can_read():
            self._update(half.conn)
            return
        link = half.link
        try:
            data = half.src.recv(min(_READ_CHUNK, link.spec.queue_bytes - link.queued))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._on_reset(half.src, err)
            return
        now = time.monotonic()
        if not data:
            half.eof = True
            link.queue.append(_Entry(half, _FIN, None, now))
            self._update(half.conn)
            return
        n = len(data)
        link.queue.append(_Entry(half, _DATA, memoryview(data), now))
        link.queued += n
        half.queued += n
        link.bytes_in += n
        if link.queued > link.max_queued:
            link.max_queued = link.queued
        if link.full:
            self._set_full(link, True, now)

    def _flush(self, half: _Half) -> None:
        """Write ``half.out`` to its receiver; forward a due FIN once everything is written."""
        conn = half.conn
        if not conn.connected:
            return
        if half.out:
            try:
                n = half.dst.send(half.out)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as err:
                self._on_reset(half.dst, err)
                return
            if n:
                del half.out[:n]
                half.link.bytes_out += n
        if not half.out and half.fin_due and not half.fin_sent:
            half.fin_sent = True
            try:
                half.dst.shutdown(socket.SHUT_WR)
            except OSError as err:
                self._on_reset(half.dst, err)
                return
            other = conn.down if half is conn.up else conn.up
            if other.fin_sent or other.dead:
                self._close(conn, abort=False)
                return
        self._update(conn)

    def _on_reset(self, dead: socket.socket, err: OSError) -> None:
        """``dead``'s peer reset: drop what was going to it, forward RST behind its data."""
        conn = self._owner.get(dead.fileno())
        if conn is None or conn.closed:
            return
        self._n_reset += 1
        logger.debug("%s: reset on %s side: %s", self._address,
                     "client" if dead is conn.a else "target", err)
        into, out_of = (conn.down, conn.up) if dead is conn.a else (conn.up, conn.down)
        self._kill(into)
        out_of.eof = True  # even after its FIN: the peer must still learn of the reset
        out_of.link.queue.append(_Entry(out_of, _RST, None, time.monotonic()))
        if out_of.dead or not conn.connected:
            self._close(conn, abort=True)
        else:
            self._update(conn)

    def _deliver_reset(self, half: _Half) -> None:
        if half.out:
            try:
                half.dst.send(half.out)
            except OSError:
                pass
        self._close(half.conn, abort=True)

    def _kill(self, half: _Half) -> None:
        """Discard everything still headed to ``half.dst`` and stop reading ``half.src``."""
        if half.dead:
            return
        half.dead = True
        half.eof = True
        half.out.clear()
        link = half.link
        was_full = link.full
        link.queued -= half.queued
        half.queued = 0
        if was_full and not link.full:
            self._set_full(link, False, time.monotonic())

    def _set_full(self, link: _Link, full: bool, now: float) -> None:
        if full:
            link.full_since = now
        elif link.full_since is not None:
            link.backpressure_s += now - link.full_since
            link.full_since = None
        for half in list(link.halves):
            self._update(half.conn)

    def _update(self, conn: _Conn) -> None:
        """Register the selector interest each socket of ``conn`` needs now."""
        if conn.closed:
            return
        assert self._sel is not None
        for sock, rd, wr in ((conn.a, conn.up, conn.down), (conn.b, conn.down, conn.up)):
            mask = 0
            if rd.can_read():
                mask |= selectors.EVENT_READ
            if (wr.out and conn.connected) or (sock is conn.b and not conn.connected):
                mask |= selectors.EVENT_WRITE
            fd = sock.fileno()
            old = conn.masks[fd]
            if mask == old:
                continue
            if not old:
                self._sel.register(sock, mask)
            elif not mask:
                self._sel.unregister(sock)
            else:
                self._sel.modify(sock, mask)
            conn.masks[fd] = mask

    def _close(self, conn: _Conn, *, abort: bool) -> None:
        if conn.closed:
            return
        for half in (conn.up, conn.down):
            self._kill(half)
            half.link.halves.discard(half)
        conn.closed = True
        self._conns.discard(conn)
        for sock in (conn.a, conn.b):
            fd = sock.fileno()
            if conn.masks.get(fd) and self._sel is not None:
                self._sel.unregister(sock)
            self._owner.pop(fd, None)
            if abort:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
                except OSError:
                    pass
            sock.close()

    def _shutdown(self) -> None:
        for conn in list(self._conns):
            self._close(conn, abort=True)
        for link in self._links:
            if link.full_since is not None:
                self._set_full(link, False, time.monotonic())
        for sock in (self._lsock, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._sel is not None:
            self._sel.close()


# -- measuring ------------------------------------------------------------------------------


def _probe_serve(conn: socket.socket, sinks: list[tuple[int, float, int, float]]) -> None:
    """Probe server connection: ``e`` echo, ``s`` sink (timestamps), ``g<count>`` generate."""
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode = conn.recv(1)
        if mode == b"e":
            while data := conn.recv(65536):
                conn.sendall(data)
        elif mode == b"s":
            sinks.append(_read_timed(conn))
        elif mode == b"g":
            count = struct.unpack("<q", conn.recv(8, socket.MSG_WAITALL))[0]
            conn.sendall(bytes(count))
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)


def _read_timed(sock: socket.socket) -> tuple[int, float, int, float]:
    """Read to EOF: (total bytes, first arrival, size of first read, last arrival)."""
    total = first_n = 0
    first = last = 0.0
    while data := sock.recv(65536):
        last = time.monotonic()
        if not total:
            first, first_n = last, len(data)
        total += len(data)
    return total, first, first_n, last


def measure_link(seconds: float = 1.0, pings: int = 20, **emulator_kwargs: Any) -> dict[str, float]:
    """Measure a ``LinkEmulator(**emulator_kwargs)`` on this machine, end to end through
    sockets: median RTT of 64-byte pings and bulk throughput each way (``seconds`` of data at
    the configured rate), each beside its configured value. ``target`` is set here."""
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        sinks: list[tuple[int, float, int, float]] = []
        threads: list[threading.Thread] = []
        emulator_kwargs["target"] = f"127.0.0.1:{lsock.getsockname()[1]}"
        with LinkEmulator(**emulator_kwargs) as emu:
            host, _, port = emu.address.rpartition(":")

            def connect(hello: bytes) -> socket.socket:
                lsock.settimeout(10)
                sock = socket.create_connection((host.strip("[]"), int(port)), timeout=30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(hello)
                conn, _ = lsock.accept()
                threads.append(threading.Thread(target=_probe_serve, args=(conn, sinks)))
                threads[-1].start()
                return sock

            rtts = []
            with connect(b"e") as sock:
                for _ in range(pings):
                    t0 = time.monotonic()
                    sock.sendall(bytes(64))
                    if len(sock.recv(64, socket.MSG_WAITALL)) != 64:
                        raise TransportError("probe: echo connection closed early")
                    rtts.append(time.monotonic() - t0)
            with connect(b"s") as sock:
                sock.sendall(bytes(int(emu.up.rate_bps * seconds / 8)))
                sock.shutdown(socket.SHUT_WR)
                sock.recv(1)
            count = int(emu.down.rate_bps * seconds / 8)
            with connect(b"g" + struct.pack("<q", count)) as sock:
                down = _read_timed(sock)
            for th in threads:
                th.join(30)
            up, dn = emu.up, emu.down

    def rate(t: tuple[int, float, int, float]) -> float:
        return (t[0] - t[2]) * 8 / max(t[3] - t[1], 1e-9)

    return {"rtt_s": statistics.median(rtts) if rtts else float("nan"),
            "rtt_configured_s": up.delay_s + dn.delay_s,
            "up_bps": rate(sinks[0]), "up_configured_bps": up.rate_bps,
            "down_bps": rate(down), "down_configured_bps": dn.rate_bps}


# -- parsing and command line ---------------------------------------------------------------

_RATE_UNITS = {"": 1.0, "bit": 1.0, "k": 1e3, "kbit": 1e3, "m": 1e6, "mbit": 1e6, "g": 1e9,
               "gbit": 1e9}
_DELAY_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1 << 20, "mb": 1 << 20,
               "mib": 1 << 20}
_NUM = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)(?:/s)?\s*$")


def _parse(text: str, units: Mapping[str, float], what: str, hint: str) -> float:
    m = _NUM.match(text.lower())
    if m is None or m.group(2) not in units:
        raise ValueError(f"cannot parse {what} {text!r}; expected e.g. {hint}")
    return float(m.group(1)) * units[m.group(2)]


def parse_rate(text: str) -> float:
    """``'250kbit'``, ``'1mbit'``, ``'20mbit'``, ``'1gbit'`` or plain bits/s -> bits/s."""
    return _parse(text, _RATE_UNITS, "rate", "250kbit, 1mbit, 100mbit (bits per second)")


def parse_delay(text: str) -> float:
    """``'10ms'``, ``'0.5s'``, ``'250us'`` or ``'0'`` -> seconds (a unit is required)."""
    if text.strip() in ("0", "0.0"):
        return 0.0
    return _parse(text, _DELAY_UNITS, "delay", "10ms, 0.05s, 500us")


def parse_size(text: str) -> int:
    """``'64k'``, ``'1m'``, ``'1500'`` -> bytes (k = 1024)."""
    return int(_parse(text, _SIZE_UNITS, "size", "1500, 64k, 1m (bytes)"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run an emulator until SIGINT/SIGTERM and print its stats as JSON."""
    ap = argparse.ArgumentParser(prog="python -m aiflow_stream.transport.emulator",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", help="host:port to accept clients on")
    ap.add_argument("--target", help="host:port of the server to relay to")
    ap.add_argument("--probe", type=float, metavar="SECONDS",
                    help="instead of relaying: measure RTT and SECONDS of bulk each way through "
                    "a local server, print JSON and exit")
    ap.add_argument("--rate", type=parse_rate, required=True, help="up rate, e.g. 1mbit")
    ap.add_argument("--delay", type=parse_delay, required=True, help="up one-way delay, e.g. 10ms")
    ap.add_argument("--queue", type=parse_size, help="up buffer bytes (default 100 ms of rate)")
    ap.add_argument("--down-rate", type=parse_rate, help="down rate (default: --rate)")
    ap.add_argument("--down-delay", type=parse_delay, help="down delay (default: --delay)")
    ap.add_argument("--down-queue", type=parse_size, help="down buffer bytes (default: --queue)")
    ap.add_argument("--burst", type=parse_size, help="token bucket depth (default 1500)")
    ap.add_argument("--packet", type=parse_size, help="packet size (default ~1 ms of rate)")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    link = dict(rate_bps=args.rate, delay_s=args.delay, queue_bytes=args.queue,
                down_rate_bps=args.down_rate, down_delay_s=args.down_delay,
                down_queue_bytes=args.down_queue, burst_bytes=args.burst,
                packet_bytes=args.packet)
    if args.probe is not None:
        print(json.dumps(measure_link(args.probe, **link), indent=2), flush=True)
        return 0
    if not args.listen or not args.target:
        ap.error("--listen and --target are required (unless --probe)")
    try:
        emu = LinkEmulator(args.listen, args.target, **link)
    except ValueError as err:
        ap.error(str(err))
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        emu.start()
    except TransportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"listening {emu.address} -> {args.target}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        emu.stop()
        print(json.dumps(emu.stats.as_dict(), indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
