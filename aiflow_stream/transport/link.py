"""ZeroMQ links between tiers with credit flow control (DESIGN.md section 5).

A receiving tier binds one ``Inlet`` (ROUTER); each sender connects an ``Outlet`` (DEALER).
One socket pair carries data one way and credits, replies and heartbeats back.

Credits: an Outlet opens a session with HELLO; the Inlet answers with a CREDIT grant of a
window of messages and bytes. Grants carry the *cumulative* messages and bytes the receiver
has consumed (``release``), so a grant is idempotent and a late one is harmless; the sender
never has more than the window in flight. Grants are batched (one per quarter window released),
and a sender that runs dry says so with a CREDIT ask, so the receiver answers as soon as it
has anything to give. A message larger than the byte window may go when nothing else is in
flight. ZeroMQ high-water marks are set far above the window: a safety net only.

Batches: ``Outlet.send(msg, flush=False)`` lets small messages (under a quarter of
``batch_bytes``) gather into one multipart (wire.py describes the format); each keeps its own
header, sequence number, credit and validation, and the Inlet hands them out one by one. A
batch goes out when full, on the next ``send(..., flush=True)``, on ``flush()``, before the
sender waits for credit, on ``close()``, or when the producer has gone quiet. It never holds
more than a quarter of the credit window, so a window of 8 batches at most 2.

Window size: the defaults (256 messages / 64 MiB) favour throughput: a Python sender and
receiver on a busy machine need many messages in flight to hide credit round trips (see
bench/transport.py). Memory stays bounded by the byte window. A live link whose receiver
may fall behind and that has no dropping queue after ``recv`` should use a small window
(e.g. 4): what is in flight is latency.

Liveness: ZeroMQ heartbeats (ZMTP PING/PONG, answered by libzmq's own I/O thread, so a tier
busy in a long model call is not mistaken for a dead one) drop a connection whose peer is
silent for ``peer_timeout``; the Outlet watches its connection with a socket monitor and
raises ``TransportError`` on the next ``send``/``recv`` once the receiver has been gone for
``peer_timeout``. A background thread sends app-level HEARTBEATs while the Outlet is idle,
so the Inlet's ``last_seen`` stays current.

Restarts: a restarted sender says HELLO again, which resets its credit state on the Inlet.
When the receiver restarts, ZeroMQ reconnects the Outlet; the Outlet sees the new handshake
(or the new Inlet, seeing data from a sender it does not know, asks for a HELLO) and opens a
new session. Messages that were in flight to the old receiver are lost and counted
(``OutletStats.lost_in_flight``; the Inlet counts stray data as invalid "session").
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from aiflow_stream.errors import TransportError
from aiflow_stream.transport.curve import CurveKeys, apply_client, apply_server, release_server
from aiflow_stream.transport.wire import (
    CONTROL_KINDS,
    BadMessage,
    Batch,
    Header,
    Kind,
    Limits,
    Message,
    SeqTracker,
    _nbytes,
    decode,
    decode_all,
    encode,
    encode_sized,
)

log = logging.getLogger(__name__)

DEFAULT_WINDOW_MSGS = 256  # see bench/transport.py: fewer credit round trips under load
DEFAULT_WINDOW_BYTES = 64 << 20
_GRANT_EVERY = 4  # grant each time a quarter window was consumed: slack for slow wake-ups
_SERVICE_S = 0.05  # a sending Outlet looks at credits and connection events this often
_MAX_PEERS = 1024
_ZERO_COPY = 1 << 16  # below this a copy is cheaper than pyzmq's zero-copy bookkeeping
DEFAULT_BATCH_MSGS = 64  # see Outlet.send: what flush=False may gather into one multipart
DEFAULT_BATCH_BYTES = 256 << 10
_BATCH_HEAD_BYTES = 256 << 10  # packed sub-headers in one batch (receivers accept 4 MiB)
_NB = zmq.NOBLOCK
_MORE = zmq.SNDMORE
_MON_EVENTS = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
               | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
               | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def _tune(sock: zmq.Socket, window_msgs: int, limits: Limits, heartbeat_s: float,
          peer_timeout: float) -> None:
    """Options both ends share: high-water marks far above the credit window (a safety net,
    not the mechanism), a per-frame size cap, and ZMTP heartbeats."""
    hwm = min(max(1000, 4 * window_msgs + 64), 2**31 - 1)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    # a frame bigger than a whole message is refused by libzmq before it is buffered
    sock.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes + limits.max_header_bytes)
    sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(heartbeat_s * 1000)))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(peer_timeout * 1000)))
    sock.setsockopt(zmq.HEARTBEAT_TTL, max(100, int(peer_timeout * 1000)))


def _read_frames(sock: zmq.Socket, first: zmq.Frame, cap: int) -> list[Any]:
    """The rest of a multipart message after ``first``; frames beyond ``cap`` are read and
    dropped (the list then holds ``cap + 1`` so ``decode`` reports the limit)."""
    frames: list[Any] = [first]
    more = first.more
    while more:
        f = sock.recv(copy=False)
        more = f.more
        if len(frames) <= cap:
            frames.append(f)
    return frames


def _send_frames(sock: zmq.Socket, frames: list[Any]) -> None:
    last = len(frames) - 1
    if last == 1:  # the common case: header and one part
        sock.send(frames[0], _MORE)
        sock.send(frames[1], 0, copy=_nbytes(frames[1]) < _ZERO_COPY)
        return
    for i, f in enumerate(frames):
        sock.send(f, _MORE if i < last else 0, copy=_nbytes(f) < _ZERO_COPY)


def _control(kind: Kind, meta: dict[str, Any]) -> list[Any]:
    return encode(Message(Header(kind, "", 0, meta=meta)))


def _uint(meta: dict[str, Any], key: str) -> int | None:
    v = meta.get(key)
    return v if type(v) is int and v >= 0 else None


def _peer_name(peer: bytes) -> str:
    return peer.decode("utf-8", "replace") if peer[:1] != b"\0" else peer.hex()


@dataclass
class OutletStats:
    sent_msgs: int = 0
    sent_bytes: int = 0
    batches: int = 0  # multiparts that carried a batch of messages (see send's flush)
    credit_waits: int = 0  # sends that had to wait for credit
    blocked_s: float = 0.0  # total time spent waiting for credit
    received_msgs: int = 0  # non-control messages from the receiver (replies)
    invalid: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    lost_in_flight: int = 0  # messages sent to a receiver that went away before consuming


@dataclass
class InletStats:
    received_msgs: int = 0
    received_bytes: int = 0
    batches: int = 0  # multiparts that carried more than one message
    invalid: Counter[str] = field(default_factory=Counter)  # by wire.Reason value or
    #   "session" (data before HELLO), "credit" (sender overran its window), "kind"
    gaps: int = 0  # sequence numbers missed
    reordered: int = 0  # duplicates or out-of-order sequence numbers
    sessions: int = 0  # HELLOs accepted
    peers: int = 0  # senders with an open session now
    last_seen: dict[bytes, float] = field(default_factory=dict)  # peer -> time.monotonic()
    credits_sent: int = 0
    replies_sent: int = 0
    unroutable: int = 0  # credits or replies to a peer that is gone


class Outlet:
    """The sending end of a link: connects to an ``Inlet`` and sends under its credits.

    Not for concurrent use by several threads (one producer thread; the heartbeat thread
    shares the socket under a lock). Payload buffers are sent without copies: do not modify
    an array after handing it to ``send``."""

    def __init__(
        self,
        address: str,
        *,
        window_msgs: int = DEFAULT_WINDOW_MSGS,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        identity: str | None = None,
        connect_timeout: float = 10.0,
        heartbeat_s: float = 1.0,
        peer_timeout: float = 5.0,
        limits: Limits = Limits(),  # noqa: B008 - frozen, shared safely
        curve: CurveKeys | None = None,
        ctx: zmq.Context | None = None,
        batch_msgs: int = DEFAULT_BATCH_MSGS,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
    ) -> None:
        if window_msgs < 1 or window_bytes < 1:
            raise ValueError(f"window must be >= 1 message and byte, got {window_msgs}, "
                             f"{window_bytes}")
        self.address = address
        self.identity = identity or f"out-{uuid.uuid4().hex[:12]}"
        self.window_msgs = window_msgs
        self.window_bytes = window_bytes
        self.heartbeat_s = heartbeat_s
        self.peer_timeout = peer_timeout
        self.limits = limits
        self.stats = OutletStats()
        self._ctx = ctx if ctx is not None else zmq.Context.instance()
        self._lock = threading.Lock()
        self._inbox: deque[Message] = deque()
        self._packer = msgpack.Packer(autoreset=True, use_bin_type=True)
        self._batch = Batch(self._packer)
        # a batch never holds more than a quarter window, so credits keep flowing while it fills
        self.batch_msgs = max(1, min(batch_msgs, window_msgs // _GRANT_EVERY))
        self.batch_bytes = max(0, min(batch_bytes, window_bytes // _GRANT_EVERY))
        if self.batch_msgs < 2:
            self.batch_bytes = 0  # a batch of one message: no batching
        self._nonce = 0
        self._granted = False
        self._win_msgs = 0
        self._win_bytes = 0
        self._sent_msgs = self._sent_bytes = self._acked_msgs = self._acked_bytes = 0
        now = time.monotonic()
        self._last_tx = self._serviced = now
        # inproc has no handshake (and never drops); other transports are down until one
        self._down_since: float | None = None if address.startswith("inproc://") else now
        self._was_down = False
        self._refused: str | None = None
        self._closed = False
        self._opened = False  # the first grant came (the constructor returned)
        self._stop = threading.Event()
        if curve is not None and curve.server_public is None:
            raise TransportError("a sender's CurveKeys need server_public (the receiver's "
                                 "public key); build them with CurveKeys.client(...)")

        sock = self._sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.setsockopt(zmq.IDENTITY, self.identity.encode())
            _tune(sock, window_msgs, limits, heartbeat_s, peer_timeout)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            if curve is not None:
                apply_client(sock, curve)
            self._mon = sock.get_monitor_socket(_MON_EVENTS)
        except zmq.ZMQError as err:
            sock.close(linger=0)
            raise TransportError(f"cannot set up the link to {address}: {err}") from err
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._mon, zmq.POLLIN)
        try:
            try:
                sock.connect(address)
            except zmq.ZMQError as err:
                raise TransportError(f"cannot connect to {address}: {err}") from err
            self._hello()
            ok = self._pump(lambda: self._granted, now + connect_timeout, self._hello_again)
        except BaseException:
            self._teardown(0)
            raise
        if not ok:
            self._teardown(0)
            raise TransportError(f"no receiver answered at {address} after {connect_timeout} s; "
                                 "is the receiving tier running and listening there?")
        self._opened = True
        self._beater = threading.Thread(target=self._beat, name=f"outlet-hb-{self.identity}",
                                        daemon=True)
        self._beater.start()

    # -- public ---------------------------------------------------------------------------

    def send(self, msg: Message, timeout: float | None = None, flush: bool = True) -> None:
        """Send ``msg`` once the credit window (messages and bytes) allows; raises
        ``TransportError`` after ``timeout`` s without credit or when the receiver is gone,
        and ``WireError`` for a message that does not match its part specs. When it raises,
        ``msg`` was not taken.

        ``flush=False`` lets a small message (payload under ``batch_bytes`` / 4) wait in a
        batch that goes out as one multipart when it holds ``batch_msgs`` messages or
        ``batch_bytes`` bytes, on the next ``send(..., flush=True)``, on ``flush()``, before
        a wait for credit, on ``close()``, or when the Outlet has been idle for
        ``heartbeat_s / 2``. A producer passes ``flush=False`` while more messages are
        queued behind this one and ``flush=True`` for the last one (the default: sent now)."""
        with self._lock:
            if self._closed:
                raise TransportError(f"the link to {self.address} is closed")
            n = msg.nbytes
            now = time.monotonic()
            if now - self._serviced > _SERVICE_S:
                self._drain()
                self._check_alive()
            batch = self._batch
            inflight = self._sent_msgs - self._acked_msgs
            if inflight >= self._win_msgs or (
                    inflight and self._sent_bytes - self._acked_bytes + n > self._win_bytes):
                if batch.msgs:
                    self._flush()  # the receiver must see these before it can grant more
                self._await_credit(n, timeout)
            try:
                if (batch.msgs or not flush) and 4 * n < self.batch_bytes:
                    n = batch.add(msg)
                    if (flush or batch.msgs >= self.batch_msgs or batch.nbytes >= self.batch_bytes
                            or batch.head_bytes >= _BATCH_HEAD_BYTES):
                        self._flush()
                else:
                    frames, n = encode_sized(msg, self._packer)
                    if batch.msgs:
                        self._flush()
                    _send_frames(self._sock, frames)
            except zmq.ZMQError as err:
                raise TransportError(f"send to {self.address} failed: {err}") from err
            self._sent_msgs += 1
            self._sent_bytes += n
            self._last_tx = now
            st = self.stats
            st.sent_msgs += 1
            st.sent_bytes += n

    def flush(self) -> None:
        """Send the messages that ``send(..., flush=False)`` left waiting in the batch."""
        with self._lock:
            if self._batch.msgs and not self._closed:
                try:
                    self._flush()
                except zmq.ZMQError as err:
                    raise TransportError(f"send to {self.address} failed: {err}") from err

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next non-control message from the receiver (a REPLY), or None on timeout."""
        with self._lock:
            self._check_open()
            if not self._inbox:
                deadline = None if timeout is None else time.monotonic() + timeout
                self._pump(lambda: bool(self._inbox), deadline, self._heartbeat)
            return self._inbox.popleft() if self._inbox else None

    def request(self, msg: Message, timeout: float | None = None) -> Message:
        """Send ``msg`` and wait for the REPLY with the same stream and seq."""
        return self.request_many([msg], timeout)[0]

    def request_many(self, msgs: list[Message], timeout: float | None = None) -> list[Message]:
        """Send every message of ``msgs`` back to back (one batch where they are small) and
        wait for all their REPLYs, matched by stream and seq: N requests cost one round trip,
        not N. Replies come back in the order of ``msgs``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for i, msg in enumerate(msgs):
            self.send(msg, timeout, flush=i == len(msgs) - 1)
        keys = [(m.header.stream, m.header.seq) for m in msgs]
        with self._lock:
            if self._pump(lambda: all(self._find_reply(k) is not None for k in keys), deadline, self._heartbeat):
                replies = []
                for key in keys:
                    reply = self._find_reply(key)
                    assert reply is not None
                    self._inbox.remove(reply)
                    replies.append(reply)
                return replies
            missing = [k for k in keys if self._find_reply(k) is None]
        raise TransportError(f"no reply from {self.address} to " + ", ".join(
            f"stream={k[0]!r} seq={k[1]}" for k in missing[:4]) + (" ..." if len(missing) > 4 else "")
            + f" within {timeout} s")

    @property
    def in_flight(self) -> tuple[int, int]:
        """(messages, bytes) sent and not yet known to be consumed by the receiver."""
        return self._sent_msgs - self._acked_msgs, self._sent_bytes - self._acked_bytes

    def close(self, linger: float = 1.0) -> None:
        """Wait up to ``linger`` s for the receiver to consume what was sent (so a final EOS
        is not lost), then close. Idempotent."""
        if self._closed:
            return
        self._stop.set()
        self._beater.join(timeout=max(1.0, 2 * self.heartbeat_s))
        with self._lock:
            if self._closed:
                return
            deadline = time.monotonic() + linger
            try:
                if self._batch.msgs:
                    self._flush()
            except zmq.ZMQError as err:
                log.info("could not send the last batch to %s: %s", self.address, err)
            try:
                # ask, so the receiver grants the last releases without waiting for a batch
                self._pump(lambda: self._sent_msgs == self._acked_msgs, deadline,
                           self._ask_credit, eager=True)
            except TransportError:
                pass  # receiver gone: nothing more to wait for
            self._teardown(max(0, int((deadline - time.monotonic()) * 1000)))

    def __enter__(self) -> Outlet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (lock held) ------------------------------------------------------------

    def _flush(self) -> None:
        _send_frames(self._sock, self._batch.frames())
        self.stats.batches += 1

    def _fits(self, n: int) -> bool:
        inflight = self._sent_msgs - self._acked_msgs
        if inflight >= self._win_msgs:
            return False
        return inflight == 0 or self._sent_bytes - self._acked_bytes + n <= self._win_bytes

    def _await_credit(self, n: int, timeout: float | None) -> None:
        t0 = time.monotonic()
        self.stats.credit_waits += 1
        try:
            ok = self._pump(lambda: self._fits(n), None if timeout is None else t0 + timeout,
                            self._ask_credit, eager=True)
        finally:
            self.stats.blocked_s += time.monotonic() - t0
        if not ok:
            m, b = self.in_flight
            raise TransportError(
                f"no credit from the receiver at {self.address} for {timeout} s ({m} msgs / "
                f"{b} bytes in flight, window {self._win_msgs} msgs / {self._win_bytes} bytes); "
                "the receiver is connected but not consuming")

    def _pump(self, done: Callable[[], bool], deadline: float | None,
              nudge: Callable[[], None], eager: bool = False) -> bool:
        """Process incoming traffic until ``done()`` or ``deadline``; ``nudge`` tells the
        receiver we are waiting (right away if ``eager``, then after each heartbeat of
        silence)."""
        first = eager
        while True:
            self._drain()
            if done():
                return True
            self._check_alive()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            if first or now - self._last_tx >= self.heartbeat_s:
                nudge()
                first = False
            wait = self.heartbeat_s
            if deadline is not None:
                wait = min(wait, deadline - now)
            if self._down_since is not None and self._opened:  # wake up to report it dead
                wait = min(wait, self._down_since + self.peer_timeout - now + 0.01)
            self._poller.poll(max(1, int(wait * 1000)))

    def _drain(self) -> None:
        """Handle everything already received: credits, replies and connection events."""
        self._serviced = time.monotonic()
        mon, sock = self._mon, self._sock
        while ready := self._poller.poll(0):  # cheaper than reading until zmq.Again
            if any(s is mon for s, _ in ready):  # connection events first: a reconnect
                try:                               # opens the new session before its traffic
                    ev = recv_monitor_message(mon, _NB)
                    self._on_event(ev["event"], ev.get("value"))
                except zmq.Again:
                    pass
                continue
            try:
                first = sock.recv(_NB, copy=False)
            except zmq.Again:
                continue
            self._on_reply(_read_frames(sock, first, self.limits.max_parts + 1))

    def _on_reply(self, frames: list[Any]) -> None:
        """One multipart from the receiver: a credit grant, a REPLY, or a control message."""
        try:
            msg = decode(frames, self.limits)
        except BadMessage as err:
            self.stats.invalid[err.reason.value] += 1
            log.warning("dropped invalid message from the receiver at %s: %s", self.address,
                        err)
            return
        kind = msg.header.kind
        if kind is Kind.CREDIT:
            self._on_credit(msg.header.meta)
        elif kind not in CONTROL_KINDS:
            self.stats.received_msgs += 1
            self._inbox.append(msg)

    def _on_event(self, event: int, value: Any) -> None:
        if event == zmq.EVENT_DISCONNECTED:
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.info("lost the connection to %s", self.address)
            self._was_down = True
            # Spend no more of the old session's credit: data queued now would reach a
            # restarted receiver before our HELLO and be refused. Sends wait for the new grant.
            self._win_msgs = self._win_bytes = 0
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._down_since = None
            self._refused = None
            if self._was_down:
                self._was_down = False
                self.stats.reconnects += 1
                log.info("reconnected to %s; opening a new session", self.address)
                self._hello()
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self._refused = f"status {value}" if value else "refused"

    def _on_credit(self, meta: dict[str, Any]) -> None:
        if meta.get("hello"):
            # the receiver does not know us (it restarted): open a new session, unless ours
            # is still waiting for its first grant
            if self._granted:
                log.info("the receiver at %s asked for a new session", self.address)
                self._hello()
            return
        if meta.get("n") != self._nonce:
            return  # a grant for an older session
        am, ab = _uint(meta, "am"), _uint(meta, "ab")
        wm, wb = _uint(meta, "wm"), _uint(meta, "wb")
        if am is None or ab is None or wm is None or wb is None:
            self.stats.invalid["garbage"] += 1
            log.warning("dropped malformed credit from %s: %r", self.address, meta)
            return
        # cumulative: a late grant never takes credit back
        self._acked_msgs = max(self._acked_msgs, min(am, self._sent_msgs))
        self._acked_bytes = max(self._acked_bytes, min(ab, self._sent_bytes))
        self._win_msgs = min(self.window_msgs, wm)
        self._win_bytes = min(self.window_bytes, wb)
        self._granted = True

    def _hello(self) -> None:
        """Open a new session: everything unconsumed in the old one is lost."""
        if self._granted:
            self.stats.lost_in_flight += self._sent_msgs - self._acked_msgs
        self._nonce = random.getrandbits(62)
        self._granted = False
        self._win_msgs = self._win_bytes = 0
        self._sent_msgs = self._sent_bytes = self._acked_msgs = self._acked_bytes = 0
        self._hello_again()

    def _hello_again(self) -> None:
        self._send_control(Kind.HELLO, {"n": self._nonce, "wm": self.window_msgs,
                                        "wb": self.window_bytes})

    def _ask_credit(self) -> None:
        if self._granted:
            self._send_control(Kind.CREDIT, {"n": self._nonce})
        else:
            self._hello_again()

    def _heartbeat(self) -> None:
        if self._granted:
            self._send_control(Kind.HEARTBEAT, {})
        else:
            self._hello_again()

    def _send_control(self, kind: Kind, meta: dict[str, Any]) -> None:
        try:
            self._sock.send(_control(kind, meta)[0], _NB)
        except zmq.Again:
            pass  # queue full: the connection is stalled; the next nudge retries
        except zmq.ZMQError as err:
            raise TransportError(f"send to {self.address} failed: {err}") from err
        self._last_tx = time.monotonic()

    def _check_alive(self) -> None:
        if self._refused is not None:
            raise TransportError(f"the receiver at {self.address} refused our CURVE key "
                                 f"({self._refused}); add this sender's public key to its "
                                 "allow-list")
        down = self._down_since
        if down is not None and self._opened:
            gone = time.monotonic() - down
            if gone > self.peer_timeout:
                raise TransportError(f"the receiver at {self.address} has been unreachable "
                                     f"for {gone:.1f} s (peer_timeout={self.peer_timeout} s); "
                                     "is it still running?")

    def _find_reply(self, key: tuple[str, int]) -> Message | None:
        for m in self._inbox:
            h = m.header
            if h.kind is Kind.REPLY and h.stream == key[0] and h.seq == key[1]:
                return m
        return None

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"the link to {self.address} is closed")

    def _beat(self) -> None:
        """Idle keep-alive: app heartbeats (so the receiver's last_seen stays current), and
        prompt handling of reconnects while the producer is quiet."""
        while not self._stop.wait(self.heartbeat_s / 2):
            if not self._lock.acquire(blocking=False):
                continue  # the producer is active: it does this itself
            try:
                if self._closed:
                    return
                if self._batch.msgs:  # a producer that went quiet without flushing
                    self._flush()
                self._drain()
                if time.monotonic() - self._last_tx >= self.heartbeat_s:
                    self._heartbeat()
            except (TransportError, zmq.ZMQError) as err:
                log.debug("heartbeat to %s: %s", self.address, err)
            finally:
                self._lock.release()

    def _teardown(self, linger_ms: int) -> None:
        self._closed = True
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._mon.close(linger=0)
        self._sock.close(linger=linger_ms)


@dataclass(slots=True)
class _Peer:
    nonce: int
    win_msgs: int
    win_bytes: int
    recv_msgs: int = 0
    recv_bytes: int = 0
    acked_msgs: int = 0
    acked_bytes: int = 0
    granted_msgs: int = 0  # acked counts last sent in a grant
    granted_bytes: int = 0
    wants: bool = False  # the sender said it ran out of credit


_NOT_DATA = CONTROL_KINDS | {Kind.REPLY}


class Inlet:
    """The receiving end of a link: binds ``address`` and accepts any number of Outlets.

    ``recv`` is for one thread at a time; ``release`` and ``reply`` may be called from any
    thread (they run directly when no ``recv`` is in progress, else the running ``recv``
    picks them up at once). While nobody is inside ``recv`` (a tier still loading its model,
    a consumer busy with a long call), a service thread answers HELLOs and credit asks every
    ``_SERVICE_S`` and holds arriving data for the next ``recv`` (bounded by the windows)."""

    def __init__(
        self,
        address: str,
        *,
        window_msgs: int = DEFAULT_WINDOW_MSGS,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        limits: Limits = Limits(),  # noqa: B008 - frozen, shared safely
        curve: CurveKeys | None = None,
        ctx: zmq.Context | None = None,
        heartbeat_s: float = 1.0,
        peer_timeout: float = 5.0,
    ) -> None:
        if window_msgs < 1 or window_bytes < 1:
            raise ValueError(f"window must be >= 1 message and byte, got {window_msgs}, "
                             f"{window_bytes}")
        self.window_msgs = window_msgs
        self.window_bytes = window_bytes
        self.limits = limits
        self.stats = InletStats()
        self._ctx = ctx if ctx is not None else zmq.Context.instance()
        self._peers: dict[bytes, _Peer] = {}
        self._asked: dict[bytes, float] = {}
        self._seq = SeqTracker()
        self._lock = threading.Lock()
        self._pending: deque[tuple[bytes, int, int, list[Any] | None]] = deque()
        self._held: deque[tuple[bytes, Message]] = deque()  # received, not yet returned
        self._cap = max(limits.max_parts + 1, 2)  # frames read per multipart (+1: see decode)
        self._wake_pending = False
        self._closed = False
        self._stop = threading.Event()
        self._zap: str | None = None

        sock = self._sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted sender with the same id wins
        _tune(sock, window_msgs, limits, heartbeat_s, peer_timeout)
        try:
            if curve is not None:
                self._zap = apply_server(sock, curve, self._ctx)
            sock.bind(address)
        except zmq.ZMQError as err:
            self._teardown()
            raise TransportError(f"cannot listen at {address}: {err}; is another tier "
                                 "already bound there?") from err
        self.address: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._servicer = threading.Thread(target=self._service, name="inlet-service",
                                          daemon=True)
        self._servicer.start()

    # -- public ---------------------------------------------------------------------------

    def recv(self, timeout: float | None = None) -> tuple[bytes, Message] | None:
        """The next data message and its sender's id, or None after ``timeout`` s (or when
        closed). Invalid messages are counted, logged and skipped; control messages are
        handled here. Call ``release(peer, msg.nbytes)`` when done with each message."""
        held = self._held
        if held and not self._pending and not self._closed:
            return held.popleft()  # a batch already read (only recv pops, one thread at a time)
        with self._lock:
            got = self._recv_locked(timeout)
        self._combine()
        return got

    def release(self, peer: bytes, nbytes: int, msgs: int = 1) -> None:
        """Return the credit of ``msgs`` consumed message(s) of ``nbytes`` payload bytes in
        total to ``peer``. Safe from any thread."""
        if self._lock.acquire(blocking=False):  # the common case: no recv running
            try:
                if self._pending:
                    self._run_pending()
                p = self._peers.get(peer)
                if p is not None and not self._closed:
                    m = p.acked_msgs + msgs
                    b = p.acked_bytes + nbytes
                    p.acked_msgs = m if m < p.recv_msgs else p.recv_msgs
                    p.acked_bytes = b if b < p.recv_bytes else p.recv_bytes
                    if (p.wants or _GRANT_EVERY * (p.acked_msgs - p.granted_msgs) >= p.win_msgs
                            or _GRANT_EVERY * (p.acked_bytes - p.granted_bytes) >= p.win_bytes):
                        self._maybe_grant(peer, p)
            finally:
                self._lock.release()
            if self._pending:
                self._combine()
        else:
            self._pending.append((peer, msgs, nbytes, None))
            self._wake()
            self._combine()

    def reply(self, peer: bytes, msg: Message) -> None:
        """Send ``msg`` back to ``peer`` (e.g. the REPLY to a REQUEST). Safe from any thread;
        a reply to a peer that is gone is counted (``stats.unroutable``) and dropped."""
        self._submit((peer, 0, 0, encode(msg)))

    def close(self) -> None:
        """Close the socket; a ``recv`` in progress in another thread returns None first."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake()
        self._servicer.join(timeout=1.0)
        with self._lock:
            self._teardown()
            self._wake_r.close()
            self._wake_w.close()

    def __enter__(self) -> Inlet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------

    def _recv_locked(self, timeout: float | None) -> tuple[bytes, Message] | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = self._poller.poll
        sock = self._sock
        wait = 0  # look without blocking first (a poll is cheaper than an empty recv)
        while not self._closed:
            if self._pending:
                self._run_pending()
            if self._held:
                return self._held.popleft()
            readable = False
            for s, _ in poll(wait):
                if s is sock:
                    readable = True
                else:
                    try:
                        self._wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                    self._wake_pending = False  # before the queue is run at the loop top
            if readable:
                self._pull()
                wait = 0
            elif wait:
                wait = 0  # woken or timed out: look again, then check the deadline
            else:
                wait = 1000
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    wait = min(wait, max(1, int(left * 1000)))
        return None

    def _service(self) -> None:
        while not self._stop.wait(_SERVICE_S):
            if not self._lock.acquire(blocking=False):
                continue  # a recv is running: it does the work
            try:
                if self._closed:
                    return
                if self._pending:
                    self._run_pending()
                while self._pull():
                    pass
            except zmq.ZMQError as err:
                log.debug("inlet service: %s", err)
            finally:
                self._lock.release()
            self._combine()

    def _pull(self) -> bool:
        """Read one multipart (one message or a batch) if there is one: data for ``recv``
        goes to ``_held``, control is handled, bad messages are counted. False when none."""
        sock = self._sock
        try:
            peer = sock.recv(_NB)
        except zmq.Again:
            return False
        first = sock.recv(copy=False)
        frames = _read_frames(sock, first, self._cap) if first.more else [first]
        p = self._peers.get(peer)
        held = self._held
        st = self.stats
        got = decode_all(frames, self.limits)
        if p is None or len(got) == 1:
            for msg in got:
                p = self._admit(peer, p, msg)
        else:  # a batch from a known sender: the same checks, state kept in locals
            rm, rb, am, ab, wm, wb = (p.recv_msgs, p.recv_bytes, p.acked_msgs, p.acked_bytes,
                                      p.win_msgs, p.win_bytes)
            seq = self._seq
            run: tuple[Any, ...] | None = None  # (link, stream) of a run of consecutive seqs
            nxt = -1
            count = total = 0
            for i, msg in enumerate(got):
                h = msg.header if type(msg) is Message else None  # type: ignore[union-attr]
                if h is None or h.kind in _NOT_DATA:  # not from our Outlet: the slow way
                    if run is not None:
                        seq.advance((peer, *run), nxt)
                        run = None
                    p.recv_msgs, p.recv_bytes = rm, rb
                    p = self._admit(peer, p, msg)
                    if p is None:
                        for rest in got[i + 1:]:
                            p = self._admit(peer, p, rest)
                        break
                    rm, rb, am, ab, wm, wb = (p.recv_msgs, p.recv_bytes, p.acked_msgs,
                                              p.acked_bytes, p.win_msgs, p.win_bytes)
                    continue
                n = msg._size  # type: ignore[union-attr]
                out = rm - am
                if out >= wm or (out and rb - ab + n > wb):
                    self._overrun(peer, out, wm)
                    continue
                rm += 1
                rb += n
                count += 1
                total += n
                s = h.seq
                if s != nxt or run is None or h.stream != run[1] or h.link != run[0]:
                    if run is not None:
                        seq.advance((peer, *run), nxt)
                    run = (h.link, h.stream)
                    seq.observe((peer, *run), s)
                nxt = s + 1
                held.append((peer, msg))  # type: ignore[arg-type]  # a Message here
            if run is not None:
                seq.advance((peer, *run), nxt)
            if p is not None:
                p.recv_msgs, p.recv_bytes = rm, rb
            st.received_msgs += count
            st.received_bytes += total
            st.batches += 1
            st.gaps = seq.gaps
            st.reordered = seq.reordered
        if p is not None:
            st.last_seen[peer] = time.monotonic()
        return True

    def _admit(self, peer: bytes, p: _Peer | None, msg: Message | BadMessage) -> _Peer | None:
        """Handle one received message (control, invalid, or data for ``recv``); returns
        the sender's session as it is afterwards."""
        if type(msg) is not Message:
            self._invalid(peer, msg.reason.value, str(msg))  # type: ignore[union-attr]
            return p
        h = msg.header
        kind = h.kind
        if kind in _NOT_DATA:
            if kind in CONTROL_KINDS:
                self._on_control(peer, p, h)
                return self._peers.get(peer)  # a HELLO opens (or replaces) the session
            self._invalid(peer, "kind", "a sender sent a REPLY; only receivers reply")
            return p
        if p is None:
            self._unknown(peer)
            return p
        n = msg._size
        out = p.recv_msgs - p.acked_msgs
        if out >= p.win_msgs or (out and p.recv_bytes - p.acked_bytes + n > p.win_bytes):
            self._overrun(peer, out, p.win_msgs)
            return p
        p.recv_msgs += 1
        p.recv_bytes += n
        st = self.stats
        st.received_msgs += 1
        st.received_bytes += n
        seq = self._seq
        if seq.observe((peer, h.link, h.stream), h.seq):
            st.gaps = seq.gaps
        elif seq.reordered != st.reordered:
            st.reordered = seq.reordered
        self._held.append((peer, msg))
        return p

    def _overrun(self, peer: bytes, out: int, window: int) -> None:
        self._invalid(peer, "credit", f"sender overran its window ({out} messages unreleased, "
                                      f"window {window})")

    def _on_control(self, peer: bytes, p: _Peer | None, h: Header) -> None:
        meta = h.meta
        if h.kind is Kind.HELLO:
            nonce, wm, wb = _uint(meta, "n"), _uint(meta, "wm"), _uint(meta, "wb")
            if nonce is None:
                self._invalid(peer, "garbage", "HELLO without a session nonce")
                return
            if len(self._peers) >= _MAX_PEERS and peer not in self._peers:
                seen = self.stats.last_seen
                oldest = min(self._peers, key=lambda k: seen.get(k, 0.0))
                del self._peers[oldest]
                seen.pop(oldest, None)
            p = self._peers[peer] = _Peer(nonce, min(self.window_msgs, wm or self.window_msgs),
                                          min(self.window_bytes, wb or self.window_bytes))
            self._seq.reset(peer)
            self._asked.pop(peer, None)
            st = self.stats
            st.sessions += 1
            st.peers = len(self._peers)
            st.last_seen[peer] = time.monotonic()
            log.info("sender %s opened a session (window %d msgs / %d bytes)",
                     _peer_name(peer), p.win_msgs, p.win_bytes)
            self._grant(peer, p)
            return
        if p is None:
            self._unknown(peer, count=False)
            return
        self.stats.last_seen[peer] = time.monotonic()
        if h.kind is Kind.CREDIT and meta.get("n") == p.nonce:
            p.wants = True
            self._maybe_grant(peer, p)

    def _maybe_grant(self, peer: bytes, p: _Peer) -> None:
        """Grant when a fraction of the window was consumed since the last grant, or when
        the sender is starved and no more releases can be expected soon (nothing left
        unreleased)."""
        new_m = p.acked_msgs - p.granted_msgs
        new_b = p.acked_bytes - p.granted_bytes
        if not (new_m or new_b):
            return
        if (_GRANT_EVERY * new_m >= p.win_msgs or _GRANT_EVERY * new_b >= p.win_bytes
                or (p.wants and p.acked_msgs == p.recv_msgs)):
            self._grant(peer, p)

    def _grant(self, peer: bytes, p: _Peer) -> None:
        frames = _control(Kind.CREDIT, {"n": p.nonce, "am": p.acked_msgs, "ab": p.acked_bytes,
                                        "wm": p.win_msgs, "wb": p.win_bytes})
        if self._send(peer, frames):
            p.granted_msgs = p.acked_msgs
            p.granted_bytes = p.acked_bytes
            p.wants = False
            self.stats.credits_sent += 1

    def _unknown(self, peer: bytes, count: bool = True) -> None:
        """Traffic from a sender without a session (the receiver restarted): drop data
        (counted) and ask the sender, at most once a second, to say HELLO."""
        if count:
            self._invalid(peer, "session", "data from a sender without a session (no HELLO)")
        now = time.monotonic()
        if now - self._asked.get(peer, 0.0) >= 1.0:
            if len(self._asked) > _MAX_PEERS:
                self._asked.clear()
            self._asked[peer] = now
            self._send(peer, _control(Kind.CREDIT, {"hello": 1}))

    def _send(self, peer: bytes, frames: list[Any]) -> bool:
        try:
            self._sock.send(peer, _MORE | _NB)
            _send_frames(self._sock, frames)
            return True
        except zmq.ZMQError as err:  # EHOSTUNREACH: peer gone; EAGAIN: its queue is full
            self.stats.unroutable += 1
            log.info("could not send to sender %s: %s", _peer_name(peer), err)
            return False

    def _invalid(self, peer: bytes, reason: str, text: str) -> None:
        inv = self.stats.invalid
        inv[reason] += 1
        c = inv[reason]
        if c <= 10 or c & (c - 1) == 0:  # rate-limited: the first ten, then powers of two
            log.warning("dropped invalid message from %s (%s, #%d): %s", _peer_name(peer),
                        reason, c, text)

    def _submit(self, item: tuple[bytes, int, int, list[Any] | None]) -> None:
        self._pending.append(item)
        if self._lock.acquire(blocking=False):
            try:
                self._run_pending()
            finally:
                self._lock.release()
            self._combine()
        else:
            self._wake()

    def _combine(self) -> None:
        """Run work queued by other threads while we held the lock."""
        while self._pending and self._lock.acquire(blocking=False):
            try:
                self._run_pending()
            finally:
                self._lock.release()

    def _run_pending(self) -> None:
        if self._closed:
            self._pending.clear()
            return
        pending = self._pending
        touched: dict[bytes, _Peer] = {}
        while pending:
            peer, msgs, nbytes, frames = pending.popleft()
            if frames is not None:
                if self._send(peer, frames):
                    self.stats.replies_sent += 1
                continue
            p = self._peers.get(peer)
            if p is None:
                continue  # session gone: nothing to credit
            p.acked_msgs = min(p.acked_msgs + msgs, p.recv_msgs)
            p.acked_bytes = min(p.acked_bytes + nbytes, p.recv_bytes)
            touched[peer] = p
        for peer, p in touched.items():
            self._maybe_grant(peer, p)

    def _wake(self) -> None:
        if self._wake_pending:
            return  # the running recv has not read the last wake-up yet: it will see ours
        self._wake_pending = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # buffer full (a wake-up is already pending) or closed

    def _teardown(self) -> None:
        self._sock.close(linger=0)
        if self._zap is not None:
            release_server(self._ctx, self._zap)
            self._zap = None
