"""The link emulator enforces rate, delay and a bounded buffer on real TCP bytes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from aiflow_stream.transport.emulator import (
    LinkEmulator,
    measure_link,
    parse_delay,
    parse_rate,
    parse_size,
)

REPO = Path(__file__).resolve().parents[2]
Handler = Callable[[socket.socket], None]


class Server:
    """TCP server on a random 127.0.0.1 port running ``handler`` per connection in a thread."""

    def __init__(self, handler: Handler) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.target = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.handler = handler
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        self.done = threading.Event()
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            th = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(th)
            th.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.handler(conn)
        except BaseException as err:  # re-raised by close()
            self.errors.append(err)
        finally:
            conn.close()

    def close(self) -> None:
        self.done.set()
        self.acceptor.join(2)
        for th in self.threads:
            th.join(10)
        self.sock.close()
        assert not self.errors, self.errors


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], Server]]:
    servers: list[Server] = []

    def make(handler: Handler) -> Server:
        servers.append(Server(handler))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _connect(emu: LinkEmulator) -> socket.socket:
    host, _, port = emu.address.rpartition(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _recv_all(s: socket.socket) -> tuple[bytes, float, int, float]:
    """Read to EOF; return data, first arrival time, size of first read, last arrival time."""
    buf = bytearray()
    first = last = 0.0
    first_n = 0
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return bytes(buf), first, first_n, last
        last = time.monotonic()
        if not buf:
            first, first_n = last, len(chunk)
        buf += chunk


# -- rate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["up", "down"])
def test_bulk_throughput_matches_configured_rate(serve, direction: str) -> None:
    # asymmetric link: 1 Mbit/s up, 5 Mbit/s down; ~2 s of data in the measured direction
    up_rate, down_rate = 1e6, 5e6
    rate = up_rate if direction == "up" else down_rate
    payload = os.urandom(int(rate * 2.0 / 8))
    got: dict[str, tuple[bytes, float, int, float]] = {}

    def handler(conn: socket.socket) -> None:
        if direction == "up":
            got["rx"] = _recv_all(conn)
        else:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(1) == b""

    srv = serve(handler)
    with LinkEmulator(target=srv.target, rate_bps=up_rate, delay_s=0.010,
                      down_rate_bps=down_rate) as emu:
        with _connect(emu) as c:
            if direction == "up":
                c.sendall(payload)
                c.shutdown(socket.SHUT_WR)
                assert c.recv(1) == b""  # the server's close came back through the relay
            else:
                c.shutdown(socket.SHUT_WR)
                got["rx"] = _recv_all(c)
        srv.close()
        stats = getattr(emu.stats, direction)
    data, first, first_n, last = got["rx"]
    assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
    measured = (len(data) - first_n) * 8 / (last - first)
    assert measured == pytest.approx(rate, rel=0.10), f"{measured / 1e6:.3f} Mbit/s"
    assert stats.bytes_in == stats.bytes_out == len(payload)


def test_connections_share_one_link(serve) -> None:
    # two flows at once through a 2 Mbit/s link: together they get 2 Mbit/s, not 2 x 2
    rate, each = 2e6, 125_000
    sinks: list[tuple[bytes, float, int, float]] = []
    srv = serve(lambda conn: sinks.append(_recv_all(conn)))

    def client() -> None:
        with _connect(emu) as c:
            c.sendall(os.urandom(each))
            c.shutdown(socket.SHUT_WR)
            assert c.recv(1) == b""

    with LinkEmulator(target=srv.target, rate_bps=rate, delay_s=0.005) as emu:
        threads = [threading.Thread(target=client) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
        srv.close()
    assert sorted(len(d) for d, *_ in sinks) == [each, each]
    first = min(t for _, t, _, _ in sinks)
    last = max(t for *_, t in sinks)
    assert 2 * each * 8 / (last - first) == pytest.approx(rate, rel=0.10)


# -- delay ------------------------------------------------------------------------------------


def _ping_echo(conn: socket.socket, arrivals: list[float]) -> None:
    while True:
        head = conn.recv(8)
        if not head:
            return
        msg = head + _recv_exact(conn, 56)
        arrivals.append(time.monotonic())
        conn.sendall(msg)


def _pings(emu: LinkEmulator, n: int) -> tuple[list[float], list[float]]:
    """Send ``n`` 64-byte pings; return send and echo-arrival times."""
    sent: list[float] = []
    back: list[float] = []
    with _connect(emu) as c:
        for i in range(n):
            sent.append(time.monotonic())
            c.sendall(struct.pack("<q", i) + bytes(56))
            assert struct.unpack("<q", _recv_exact(c, 64)[:8])[0] == i
            back.append(time.monotonic())
    return sent, back


def test_round_trip_time_matches_twice_the_one_way_delay(serve) -> None:
    arrivals: list[float] = []
    srv = serve(lambda conn: _ping_echo(conn, arrivals))
    with LinkEmulator(target=srv.target, rate_bps=50e6, delay_s=0.020) as emu:
        sent, back = _pings(emu, 20)
        srv.close()  # the server sees the client's FIN through the relay
    rtt = statistics.median(b - s for s, b in zip(sent, back, strict=True))
    assert rtt == pytest.approx(0.040, rel=0.10), f"{rtt * 1e3:.2f} ms"


def test_one_way_delays_are_configured_per_direction(serve) -> None:
    arrivals: list[float] = []
    srv = serve(lambda conn: _ping_echo(conn, arrivals))
    with LinkEmulator(target=srv.target, rate_bps=20e6, delay_s=0.030,
                      down_delay_s=0.010) as emu:
        sent, back = _pings(emu, 10)
        srv.close()
    up = statistics.median(a - s for s, a in zip(sent, arrivals, strict=True))
    down = statistics.median(b - a for a, b in zip(arrivals, back, strict=True))
    assert up == pytest.approx(0.030, rel=0.10), f"up {up * 1e3:.2f} ms"
    assert down == pytest.approx(0.010, rel=0.10), f"down {down * 1e3:.2f} ms"


def test_serialisation_delay_adds_to_propagation_delay(serve) -> None:
    # a 25 kB message at 1 Mbit/s takes 200 ms to serialise, plus 10 ms one way
    size = 25_000
    done = threading.Event()

    def handler(conn: socket.socket) -> None:
        _recv_exact(conn, size)
        done.set()

    srv = serve(handler)
    with LinkEmulator(target=srv.target, rate_bps=1e6, delay_s=0.010) as emu, \
            _connect(emu) as c:
        t0 = time.monotonic()
        c.sendall(os.urandom(size))
        assert done.wait(5)
        elapsed = time.monotonic() - t0
    srv.close()
    assert elapsed == pytest.approx(0.010 + size * 8 / 1e6, rel=0.10)


# -- bounded buffer, backpressure, shutdown ---------------------------------------------------


def test_queue_is_bounded_and_backpressure_reaches_the_sender(serve) -> None:
    rate, delay, queue = 1e6, 0.010, 4000
    received = [0]
    reset = threading.Event()

    def handler(conn: socket.socket) -> None:
        try:
            while chunk := conn.recv(65536):
                received[0] += len(chunk)
        except ConnectionResetError:
            reset.set()  # expected: stop() aborts the connections it relays

    srv = serve(handler)
    emu = LinkEmulator(target=srv.target, rate_bps=rate, delay_s=delay, queue_bytes=queue)
    emu.start()
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)  # no 4 MB autotuned send buffer
    host, _, port = emu.address.rpartition(":")
    c.connect((host, int(port)))
    c.setblocking(False)
    total = 4 << 20  # 32 s at 1 Mbit/s: far more than any buffer on the path
    blob = bytes(65536)
    accepted = 0
    t0 = time.monotonic()
    peak = 0
    while time.monotonic() - t0 < 0.8:
        try:
            accepted += c.send(blob[: min(len(blob), total - accepted)])
        except BlockingIOError:
            time.sleep(0.005)
        st = emu.stats.up
        peak = max(peak, st.max_queue_bytes)
        # what the relay holds: buffer + in flight on the delay line + a small write buffer
        assert st.bytes_in - st.bytes_out <= queue + rate * delay / 8 + 2 * 65536 + 1500
    elapsed = time.monotonic() - t0
    st = emu.stats.up
    assert accepted < total  # the sender was blocked: TCP backpressure
    assert 0 < peak <= queue and st.max_queue_bytes <= queue
    assert st.backpressure_s > 0.5 * elapsed
    assert received[0] <= rate * elapsed / 8 * 1.1 + 1500
    t_stop = time.monotonic()
    emu.stop()
    assert time.monotonic() - t_stop < 1.0
    c.setblocking(True)
    c.settimeout(2)
    with pytest.raises(ConnectionResetError):  # the relay aborted the connection
        c.recv(1)
    c.close()
    assert reset.wait(2)
    srv.close()
    assert emu.stats.open_connections == 0


def test_many_concurrent_connections_with_half_close(serve) -> None:
    def echo_until_eof(conn: socket.socket) -> None:
        while chunk := conn.recv(65536):
            conn.sendall(chunk)
        conn.shutdown(socket.SHUT_WR)

    srv = serve(echo_until_eof)
    results: dict[int, bytes] = {}
    payloads = {i: os.urandom(20_000 + 997 * i) for i in range(8)}

    def client(i: int) -> None:
        with _connect(emu) as c:
            c.sendall(payloads[i])
            c.shutdown(socket.SHUT_WR)  # half-close: the echo must still come back
            results[i] = _recv_all(c)[0]

    with LinkEmulator(target=srv.target, rate_bps=20e6, delay_s=0.005) as emu:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
        srv.close()
        deadline = time.monotonic() + 2
        while emu.stats.open_connections and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = emu.stats
    assert results == payloads
    assert stats.connections == 8 and stats.open_connections == 0
    assert stats.up.bytes_out == stats.down.bytes_out == sum(map(len, payloads.values()))


def test_reset_and_unreachable_target_reach_the_client(serve) -> None:
    def reset(conn: socket.socket) -> None:
        conn.recv(5)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    srv = serve(reset)
    with LinkEmulator(target=srv.target, rate_bps=10e6, delay_s=0.005) as emu:
        with _connect(emu) as c:
            c.sendall(b"hello")
            with pytest.raises(ConnectionResetError):
                c.recv(1)
        srv.close()
        assert emu.stats.resets == 1

    # client half-closes, then goes away while the server still talks: the server gets a reset
    server_saw: list[BaseException] = []

    def talk_after_eof(conn: socket.socket) -> None:
        assert conn.recv(1) == b""
        try:
            for _ in range(2000):
                conn.sendall(bytes(1000))
                time.sleep(0.001)
        except (ConnectionResetError, BrokenPipeError) as err:
            server_saw.append(err)

    srv = serve(talk_after_eof)
    with LinkEmulator(target=srv.target, rate_bps=10e6, delay_s=0.005) as emu:
        c = _connect(emu)
        c.shutdown(socket.SHUT_WR)
        time.sleep(0.05)
        c.close()
        srv.close()
        assert server_saw and emu.stats.open_connections == 0

    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    with LinkEmulator(target=f"127.0.0.1:{port}", rate_bps=10e6, delay_s=0.005) as emu:
        # the relay accepts, fails to reach the target and resets the client; on a loaded machine
        # the reset can land before the client's own connect() has returned, so either may see it
        with pytest.raises(ConnectionResetError):
            with _connect(emu) as c:
                c.recv(1)
        assert emu.stats.connect_failures == 1


# -- ZeroMQ -----------------------------------------------------------------------------------


def test_zeromq_push_pull_and_dealer_router_through_the_relay() -> None:
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []

    def sock(kind: int) -> zmq.Socket:
        s = ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 5000)
        socks.append(s)
        return s

    try:
        pull, router = sock(zmq.PULL), sock(zmq.ROUTER)
        pull_port = pull.bind_to_random_port("tcp://127.0.0.1")
        router_port = router.bind_to_random_port("tcp://127.0.0.1")
        with LinkEmulator(target=f"127.0.0.1:{pull_port}", rate_bps=20e6, delay_s=0.005) as e1, \
                LinkEmulator(target=f"127.0.0.1:{router_port}", rate_bps=20e6,
                             delay_s=0.010) as e2:
            push, dealer = sock(zmq.PUSH), sock(zmq.DEALER)
            push.connect(f"tcp://{e1.address}")
            dealer.connect(f"tcp://{e2.address}")
            msgs = [os.urandom(1000 + i) for i in range(50)]
            for i, m in enumerate(msgs):
                push.send_multipart([struct.pack("<i", i), m])
            assert [pull.recv_multipart() for _ in msgs] == [
                [struct.pack("<i", i), m] for i, m in enumerate(msgs)]
            rtts = []
            for i in range(5):
                t0 = time.monotonic()
                dealer.send(struct.pack("<i", i))
                ident, body = router.recv_multipart()
                router.send_multipart([ident, body + b"!"])
                assert dealer.recv() == struct.pack("<i", i) + b"!"
                rtts.append(time.monotonic() - t0)
            assert statistics.median(rtts) == pytest.approx(0.020, rel=0.15)
            assert e1.stats.up.bytes_out > sum(map(len, msgs))
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()


def test_measure_link_reports_the_configured_link() -> None:
    m = measure_link(seconds=0.5, pings=5, rate_bps=20e6, delay_s=0.015, down_rate_bps=10e6,
                     down_delay_s=0.005)
    assert m["rtt_configured_s"] == pytest.approx(0.020)
    assert m["rtt_s"] == pytest.approx(0.020, rel=0.10)
    assert m["up_bps"] == pytest.approx(20e6, rel=0.10)
    assert m["down_bps"] == pytest.approx(10e6, rel=0.10)


# -- parsing and CLI --------------------------------------------------------------------------


def test_parsers() -> None:
    assert parse_rate("250kbit") == 250e3
    assert parse_rate("1mbit") == 1e6
    assert parse_rate("20Mbit") == 20e6
    assert parse_rate("100mbit") == 100e6
    assert parse_rate("1.5gbit") == 1.5e9
    assert parse_delay("10ms") == pytest.approx(0.010)
    assert parse_delay("0.25s") == 0.25
    assert parse_delay("0") == 0.0
    assert parse_size("64k") == 65536
    for bad, fn in [("1mbps", parse_rate), ("fast", parse_rate), ("10", parse_delay),
                    ("-3ms", parse_delay)]:
        with pytest.raises(ValueError, match="expected e.g."):
            fn(bad)
    with pytest.raises(ValueError, match="rate_bps"):
        LinkEmulator(target="127.0.0.1:1", rate_bps=0)


def test_cli_relays_and_prints_stats_on_sigterm(serve) -> None:
    srv = serve(lambda conn: conn.sendall(_recv_exact(conn, 1000)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiflow_stream.transport.emulator", "--listen", "127.0.0.1:0",
         "--target", srv.target, "--rate", "5mbit", "--delay", "10ms", "--down-rate", "20mbit",
         "--down-delay", "5ms"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening "), line + proc.stderr.read() if proc.stderr else ""
        host, _, port = line.split()[1].rpartition(":")
        with socket.create_connection((host, int(port)), timeout=10) as c:
            payload = os.urandom(1000)
            c.sendall(payload)
            assert _recv_exact(c, 1000) == payload
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    srv.close()
    assert proc.returncode == 0
    stats = json.loads(out)
    assert stats["up"]["bytes_out"] == 1000 and stats["down"]["bytes_out"] == 1000
