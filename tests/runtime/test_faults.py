"""Faults a tier must survive or report clearly: bad input on its listening socket, a slow
consumer, an unreachable peer at start, a peer that dies and comes back."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import zmq

from aiflow_stream.graph import Tier
from aiflow_stream.operators.compress import encode_frame
from aiflow_stream.runtime.items import Item, ItemKind
from aiflow_stream.runtime.launcher import start_local
from aiflow_stream.runtime.links import item_to_message
from aiflow_stream.transport.link import Outlet
from aiflow_stream.transport.pubsub import Subscriber
from aiflow_stream.transport.wire import Header, Kind, Message
from tests.runtime.graphs.stub import frame_text
from tests.runtime.support import STUB_GRAPH, LineReader, aiflow, collect, header, stub_env

IMAGE = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)


def packet(seq: int, link: str = "compress", stream: str = "cam") -> Message:
    """A valid lz4 frame packet, as the device's compress step sends it."""
    parts, meta = encode_frame(IMAGE, "lz4")
    item = Item(ItemKind.PACKET, stream, seq, time.time_ns(), parts, {"packet": meta}, {}, ["lz4"])
    return item_to_message(item, link)


def start_tier(procs: list[subprocess.Popen], tier: str, tmp: Path, *args: str,
               **knobs: Any) -> tuple[subprocess.Popen, LineReader]:
    p = subprocess.Popen(aiflow("tier", tier, str(STUB_GRAPH), "--metrics", str(tmp / f"{tier}.metrics.json"),
                                *args), env=stub_env(**knobs), stderr=subprocess.PIPE, text=True)
    procs.append(p)
    return p, LineReader(p.stderr)  # type: ignore[arg-type]


def wait_line(err: LineReader, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for line in err.all):
            return
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} within {timeout} s; stderr:\n{''.join(err.all)}")


def test_bad_input_is_counted_and_the_tier_keeps_serving(tmp_path: Path, procs: list[subprocess.Popen]) -> None:
    addr, pub = f"ipc://{tmp_path}/edge.sock", f"ipc://{tmp_path}/captions.sock"
    edge, err = start_tier(procs, "edge", tmp_path, "--listen", addr, "--publish", pub)
    wait_line(err, "[edge] ready")
    sub = Subscriber(pub)
    dev = Outlet(addr, identity="test-device", connect_timeout=10)
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(addr)
    seq = 0

    def still_serving() -> None:
        nonlocal seq
        dev.send(packet(seq))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rec = sub.recv(0.5)
            if rec is not None and not rec.eos and rec.seq == seq:
                assert rec.text == frame_text(IMAGE)
                seq += 1
                return
        raise AssertionError(f"no caption for packet {seq}: the tier stopped serving\n{''.join(err.all)}")

    try:
        time.sleep(0.3)  # the subscription reaches the publisher
        still_serving()
        part = [["uint8", [100], "raw"]]
        wire_cases = [  # sent without a session, straight onto the edge's listening socket
            [b"\xc1 this is not msgpack"],  # garbage
            [header(parts=part)[:-4], b"x" * 100],  # truncated header
            [header(parts=part)],  # truncated message: its payload part is missing
            [header(version=2, parts=[["uint8", [4], "raw"]]), b"abcd"],  # unknown protocol version
            [header(parts=[["uint8", [10, 10], "raw"]]), b"x" * 99],  # shape disagrees with the bytes
            [header(parts=[["float32", [1 << 20, 1 << 20], "raw"]]), b"x" * 16],  # declared size over the limit
        ]
        for frames in wire_cases:
            raw.send_multipart(frames)
            still_serving()
        # From a sender with a session: valid on the wire, wrong for the tier.
        dev.send(Message(Header(Kind.TOKENS, "cam", 0, link="compress"), []))  # a kind no step takes
        still_serving()
        dev.send(packet(0, link="no_such_step"))  # a link nothing on this tier consumes
        still_serving()
        bad = packet(seq)
        bad.payload[0] = b"\x04\x22\x4d\x18 corrupt lz4"
        bad.header.parts[0].shape = (len(bad.payload[0]),)
        dev.send(bad)  # the caption step cannot decode it: an error drop, not a crash
        still_serving()
        dev.send(item_to_message(Item.eos("cam", "compress"), "compress"))
        assert edge.wait(15) == 0, err.text()
    finally:
        dev.close()
        raw.close()
        sub.close()
    m = json.loads((tmp_path / "edge.metrics.json").read_text())
    assert m["inlet"]["invalid"] == {"garbage": 2, "size": 2, "version": 1, "limit": 1}
    assert m["counters"]["ingress.invalid"] == 2
    assert m["counters"]["caption.error"] == 1
    assert m["counters"]["publish.in"] == seq == 10  # one valid packet after each bad one, and one first
    assert m["drops"] == {"invalid": 8, "error": 1}
    text = err.text()
    assert "not msgpack" in text and "protocol version 2" in text and "unknown link 'no_such_step'" in text


def _rss(pids: dict[str, int]) -> dict[str, int]:
    return {t: psutil.Process(pid).memory_info().rss for t, pid in pids.items()}


@pytest.mark.parametrize("seconds", [
    pytest.param(8, id="8s"),
    pytest.param(30, id="30s", marks=pytest.mark.slow),
])
def test_slow_consumer_memory_bounded_and_drops_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        seconds: int) -> None:
    # A live 30 fps camera of 640x360 frames (691 KB each, incompressible noise: ~20 MB/s) into
    # a caption step 10x slower than capture: a latest-policy graph must shed load, count every
    # frame it sheds, and keep memory flat.
    for k, v in stub_env(every=1, delay=0.33).items():
        monkeypatch.setenv(k, v)
    source = "synthetic://?seed=9&fps=30&width=640&height=360"
    run = start_local(str(STUB_GRAPH), source=source, workdir=tmp_path, stderr=subprocess.DEVNULL)
    sub = Subscriber(run.publish)
    try:
        first, _ = collect(sub, until_eos=1, timeout=0.0)
        deadline = time.monotonic() + 60
        while not first and time.monotonic() < deadline:
            first += [r for r in [sub.recv(0.5)] if r is not None]
        assert first, "no caption from the slow pipeline"
        pids = {t.value: p.pid for t, p in run.procs.items()}
        time.sleep(2.0)  # warm-up: queues and windows fill, allocators settle
        base = _rss(pids)
        peak = dict(base)
        captions = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            rec = sub.recv(0.25)
            captions += rec is not None and not rec.eos
            for t, v in _rss(pids).items():
                peak[t] = max(peak[t], v)
        assert run.failed() == [] and run.alive()
    finally:
        sub.close()
        codes = run.stop()
    assert all(c == 0 for c in codes.values()), codes
    growth = {t: (peak[t] - base[t]) >> 20 for t in base}
    m = run.metrics()
    dev_drops, edge_drops = m["device"]["drops"], m["edge"]["drops"]
    print(f"RSS growth after warm-up (MB): {growth}; drops: device {dev_drops} edge {edge_drops}")
    assert all(g < 40 for g in growth.values()), f"RSS grew (MB) under a slow consumer: {growth}"
    assert captions >= seconds / 0.33 * 0.5, f"only {captions} captions in {seconds} s"
    dev, edge = m["device"], m["edge"]
    shed = sum(dev["drops"].get(r, 0) + edge["drops"].get(r, 0) for r in ("overflow", "stale"))
    assert shed > 0, (dev["drops"], edge["drops"])
    assert "invalid" not in edge["drops"] and "error" not in edge["drops"]
    # Every frame is accounted for: sent on, dropped with a reason, or in a bounded queue at stop.
    c = dev["counters"]
    device_lost = c["capture.out"] - c.get("egress-edge.sent", 0) - sum(dev["drops"].values())
    assert 0 <= device_lost <= 3 * 9, (c, dev["drops"])
    ce = edge["counters"]
    edge_lost = edge["inlet"]["received_msgs"] - ce.get("caption.in", 0) - sum(edge["drops"].values())
    # unreleased messages are bounded by the credit window (8); closing the queues at the stop
    # returns their credit, which lets up to one more window arrive before the inlet closes
    assert 0 <= edge_lost <= 2 * 8 + 1, (ce, edge["drops"])
    assert edge["steps"]["caption"]["queue_high_water"] <= 8


def _free_tcp() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_unreachable_peer_at_start_fails_clearly(tmp_path: Path, procs: list[subprocess.Popen],
                                                transport: str) -> None:
    addr = f"ipc://{tmp_path}/nobody.sock" if transport == "ipc" else _free_tcp()
    t0 = time.monotonic()
    dev, err = start_tier(procs, "device", tmp_path, "--peer", f"edge={addr}", "--connect-timeout", "2")
    rc = dev.wait(30)
    took = time.monotonic() - t0
    text = err.text()
    assert rc != 0
    assert f"no receiver answered at {addr} after 2.0 s" in text, text
    assert "Traceback" not in text
    assert 2.0 <= took < 20.0


def test_restarted_edge_is_reconnected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in stub_env(every=3).items():
        monkeypatch.setenv(k, v)
    run = start_local(str(STUB_GRAPH), source="synthetic://?seed=4&fps=30&width=160&height=96",
                      workdir=tmp_path, stderr=subprocess.DEVNULL)
    sub = Subscriber(run.publish)
    edge_log = tmp_path / "edge2.log"
    try:
        before, _ = collect(sub, until_eos=99, timeout=0)
        deadline = time.monotonic() + 60
        while len(before) < 3 and time.monotonic() < deadline:
            rec = sub.recv(0.5)
            if rec is not None and not rec.eos:
                before.append(rec)
        assert len(before) >= 3, "no captions before the restart"
        old = run.procs[Tier.EDGE]
        old.kill()
        old.wait(10)
        time.sleep(6.0)  # down longer than the link's peer_timeout (5 s), as a model reload is
        while sub.recv(0.05) is not None:
            pass  # what the old edge published before it died
        restarted = time.time_ns()
        with open(edge_log, "w") as log_file:
            run.procs[Tier.EDGE] = subprocess.Popen(old.args, stderr=log_file)
        after = []
        deadline = time.monotonic() + 60
        while len(after) < 3 and time.monotonic() < deadline:
            rec = sub.recv(0.5)
            if rec is not None and not rec.eos and rec.publish_ns > restarted:  # by the new edge
                after.append(rec)
            assert run.procs[Tier.DEVICE].poll() is None, "the device gave up on the restarted edge"
        assert len(after) >= 3, f"captions did not resume after the edge restarted\n{edge_log.read_text()}"
    finally:
        sub.close()
        codes = run.stop()
    assert codes[Tier.DEVICE] == 0 and codes[Tier.EDGE] == 0, (codes, edge_log.read_text())
    assert "[edge] ready" in edge_log.read_text()
    link = run.metrics()["device"]["links"]["edge"]
    assert link["reconnects"] >= 1
    # while the edge was away the device's sends failed; it must have waited them out, not spun
    assert link["credit_waits"] < 500, link
