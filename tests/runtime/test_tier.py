"""TierRuntime logic, with every tier in this process (threads, ipc:// links in a tmp dir):
end of stream with several upstream peers, fan-out, stopping while a link is stalled, and
input a verifier must refuse without going down."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from aiflow_stream import Pipeline
from aiflow_stream.graph import Tier
from aiflow_stream.operators.compress import encode_frame
from aiflow_stream.runtime.items import Item, ItemKind
from aiflow_stream.runtime.links import item_to_message
from aiflow_stream.runtime.tier import TierOptions, TierRuntime
from aiflow_stream.transport.link import Inlet, Outlet
from aiflow_stream.transport.pubsub import Subscriber
from aiflow_stream.transport.wire import Kind, Message
from tests.runtime.graphs.stub import SOURCE, build, frame_text
from tests.runtime.support import collect, expected_texts, threaded_tiers

IMAGE = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)


def _packet(stream: str, seq: int) -> Message:
    parts, meta = encode_frame(IMAGE, "lz4")
    return item_to_message(Item(ItemKind.PACKET, stream, seq, time.time_ns(), parts, {"packet": meta}, {},
                                ["lz4"]), "compress")


def _eos(stream: str) -> Message:
    return item_to_message(Item.eos(stream, "compress"), "compress")


def test_three_tiers_drain_and_return_metrics(tmp_path: Path) -> None:
    with threaded_tiers(build(verify=True), tmp_path, start=False) as tt:
        sub = Subscriber(tt.publish)
        time.sleep(0.3)
        for tier in (Tier.CLOUD, Tier.EDGE, Tier.DEVICE):
            tt.start(tier)
        recs, eos = collect(sub, timeout=30)
        assert tt.join(20), "a tier did not return after end of stream"
        sub.close()
    assert eos == 1
    assert {r.seq: r.text for r in recs} == expected_texts(SOURCE, 5)
    assert all(r.stats["verified"] for r in recs)
    errors = {t: r for t, r in tt.results.items() if isinstance(r, BaseException)}
    assert not errors
    assert tt.results[Tier.CLOUD]["counters"]["verify.calls"] == len(recs) == 4
    # the verifier's end of stream came over the RPC link, numbered after the calls
    assert tt.results[Tier.CLOUD]["inlet"]["reordered"] == 0


def test_end_of_stream_waits_for_every_upstream_peer(tmp_path: Path) -> None:
    # An edge serving two devices ends when both have ended; a repeated EOS from one device
    # must not count for the other.
    pipeline = build()
    with threaded_tiers(pipeline, tmp_path, only=[Tier.EDGE], expect_peers=2) as tt:
        sub = Subscriber(tt.publish)
        time.sleep(0.3)
        addr = f"ipc://{tmp_path}/edge.sock"
        a = Outlet(addr, identity="device-a", connect_timeout=10)
        b = Outlet(addr, identity="device-b", connect_timeout=10)
        try:
            a.send(_packet("cam-a", 0))
            a.send(_eos("cam-a"))
            a.send(_eos("cam-a"))  # again: a restarted or confused peer
            got, _ = collect(sub, timeout=1.5)
            assert [(r.stream, r.seq) for r in got] == [("cam-a", 0)]
            assert tt.threads[Tier.EDGE].is_alive(), "the edge ended while device b was still sending"
            for seq in range(3):
                b.send(_packet("cam-b", seq))
            b.send(_eos("cam-b"))
            more, eos = collect(sub, until_eos=1, timeout=10)
            assert tt.join(10), "the edge did not end after both devices ended"
        finally:
            a.close()
            b.close()
            sub.close()
    assert [(r.stream, r.seq) for r in more] == [("cam-b", 0), ("cam-b", 1), ("cam-b", 2)]
    assert all(r.text == frame_text(IMAGE) for r in got + more)
    assert eos == 1
    m = tt.results[Tier.EDGE]
    assert m["counters"]["publish.in"] == 4 and m["drops"] == {}


def test_a_batching_step_takes_what_is_queued_and_drops_a_bad_item_alone(tmp_path: Path) -> None:
    # The caption step takes up to 4 queued key frames at once (one verifier round trip for
    # all); a corrupt packet inside a batch makes the runtime retry that batch one by one, so
    # only the bad packet is dropped (and counted) and every good one is captioned once.
    pipeline = build(batch=4, delay=0.3, verify=True)
    with threaded_tiers(pipeline, tmp_path, only=[Tier.EDGE, Tier.CLOUD]) as tt:
        sub = Subscriber(tt.publish)
        time.sleep(0.3)
        dev = Outlet(f"ipc://{tmp_path}/edge.sock", identity="device-x", connect_timeout=10)
        try:
            dev.send(_packet("cam", 0))  # taken alone; the rest queue up behind its delay
            time.sleep(0.1)
            for seq in range(1, 5):
                dev.send(_packet("cam", seq))
            bad = _packet("cam", 5)
            bad.payload[0] = b"not lz4"  # type: ignore[index]
            dev.send(bad)
            for seq in range(6, 9):
                dev.send(_packet("cam", seq))
            dev.send(_eos("cam"))
            recs, eos = collect(sub, timeout=20)
            assert tt.join(15)
        finally:
            dev.close()
            sub.close()
    assert eos == 1
    assert sorted(r.seq for r in recs) == [0, 1, 2, 3, 4, 6, 7, 8]
    assert all(r.text == frame_text(IMAGE) and r.stats["verified"] for r in recs)
    assert max(r.stats["batch"] for r in recs) == 4
    c = tt.results[Tier.EDGE]["counters"]
    assert c["caption.in"] == 9 and c["caption.error"] == 1 and c["caption.batches"] >= 2
    cloud = tt.results[Tier.CLOUD]["counters"]
    assert cloud["verify.calls"] >= 8


def test_remote_input_fans_out_to_every_consumer(tmp_path: Path) -> None:
    # Two edge steps consume the device's packets: each gets every packet (and the end of
    # stream), and the link credit comes back only once both are done with a packet.
    p = Pipeline("fan")
    with p.on("device"):
        packets = p.compress("compress", p.keyframe("keyframe", p.capture("capture", SOURCE), every=5), codec="lz4")
    with p.on("edge"):
        p.publish("publish", p.caption("caption", packets, operator="stub_caption"))
        p.publish("publish2", p.caption("caption2", packets, operator="stub_caption", delay=0.05),
                  address=f"ipc://{tmp_path}/captions2.sock")
    with threaded_tiers(p, tmp_path, start=False, window_msgs=2) as tt:
        subs = [Subscriber(tt.publish), Subscriber(f"ipc://{tmp_path}/captions2.sock")]
        time.sleep(0.3)
        tt.start(Tier.EDGE)
        tt.start(Tier.DEVICE)
        got = [collect(s, timeout=20) for s in subs]
        assert tt.join(15), "a tier hung: a consumer never got its end of stream"
        for s in subs:
            s.close()
    want = expected_texts(SOURCE, 5)
    for recs, eos in got:
        assert eos == 1 and {r.seq: r.text for r in recs} == want
    edge = tt.results[Tier.EDGE]
    assert edge["inlet"]["received_msgs"] == len(want) + 1
    assert edge["counters"]["caption.in"] == edge["counters"]["caption2.in"] == len(want)


def test_stop_is_prompt_while_the_receiver_withholds_credit(tmp_path: Path) -> None:
    # The edge takes messages but never consumes them: the device's link blocks for credit.
    # A stop must still end the device (it used to wait on the link forever).
    inlet = Inlet(f"ipc://{tmp_path}/edge.sock", window_msgs=2)
    stop = threading.Event()

    def never_release() -> None:
        while not stop.is_set():
            inlet.recv(0.1)

    t = threading.Thread(target=never_release, daemon=True)
    t.start()
    try:
        with threaded_tiers(build(every=1), tmp_path, only=[Tier.DEVICE], window_msgs=2) as tt:
            deadline = time.monotonic() + 10
            while inlet.stats.received_msgs < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert inlet.stats.received_msgs == 2  # the window, then nothing more
            t0 = time.monotonic()
            tt.runtimes[Tier.DEVICE].stop()
            assert tt.join(5.0), "the device did not stop while its link waited for credit"
            assert time.monotonic() - t0 < 4.0
    finally:
        stop.set()
        t.join(2)
        inlet.close()
    assert not isinstance(tt.results[Tier.DEVICE], BaseException)


def test_verifier_refuses_a_non_request_and_keeps_serving(tmp_path: Path) -> None:
    pipeline = build(verify=True)
    with threaded_tiers(pipeline, tmp_path, only=[Tier.CLOUD]) as tt:
        rogue = Outlet(f"ipc://{tmp_path}/cloud.sock", identity="rogue", connect_timeout=10)
        try:  # wire-valid data on the RPC link, from a peer that names the caption step
            rogue.send(Message.build(Kind.FRAME, "x", 0, [np.zeros(4, np.uint8)], link="caption"))
        finally:
            rogue.close()
        rt = tt.runtimes[Tier.CLOUD]
        deadline = time.monotonic() + 5
        while rt.counters.get("verify.invalid") == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rt.counters.get("verify.invalid") == 1
        assert tt.threads[Tier.CLOUD].is_alive(), f"the cloud went down: {tt.results}"
        # ...and the real caller still gets its answers, then ends the verifier with its EOS
        with threaded_tiers(pipeline, tmp_path, start=False, only=[Tier.EDGE, Tier.DEVICE]) as rest:
            sub = Subscriber(rest.publish)
            time.sleep(0.3)
            rest.start(Tier.EDGE)
            rest.start(Tier.DEVICE)
            recs, _ = collect(sub, timeout=20)
            sub.close()
            assert rest.join(15) and tt.join(10)
    assert len(recs) == 4 and all(r.stats["verified"] for r in recs)
    assert tt.results[Tier.CLOUD]["counters"]["verify.calls"] == 4


def test_two_edges_share_one_verifier(tmp_path: Path) -> None:
    # Each edge's RPC link needs its own identity at the cloud (one used to take over the
    # other's), and the cloud ends only after both edges sent their end of stream.
    pipeline = build(verify=True)
    cloud_addr = f"ipc://{tmp_path}/cloud.sock"
    rts = {"cloud": TierRuntime(pipeline, Tier.CLOUD, TierOptions(listen=cloud_addr, expect_peers=2))}
    threads: dict[str, threading.Thread] = {}
    results: dict[str, object] = {}
    subs: dict[str, Subscriber] = {}
    outlets: list[Outlet] = []

    def run(name: str) -> None:
        try:
            results[name] = rts[name].run()
        except BaseException as err:  # reported through results
            results[name] = err

    try:
        rts["cloud"].setup()
        for name in ("e1", "e2"):
            rts[name] = TierRuntime(pipeline, Tier.EDGE, TierOptions(
                listen=f"ipc://{tmp_path}/{name}.sock", peers={Tier.CLOUD: cloud_addr}, stream=name,
                publish=f"ipc://{tmp_path}/{name}-captions.sock"))
            rts[name].setup()
            subs[name] = Subscriber(f"ipc://{tmp_path}/{name}-captions.sock")
        for name in rts:
            threads[name] = threading.Thread(target=run, args=(name,), daemon=True)
            threads[name].start()
        time.sleep(0.3)
        for name in ("e1", "e2"):
            out = Outlet(f"ipc://{tmp_path}/{name}.sock", identity=f"device-{name}", connect_timeout=10)
            outlets.append(out)
            for seq in range(3):
                out.send(_packet(f"cam-{name}", seq))
            out.send(_eos(f"cam-{name}"))
        got = {name: collect(sub, timeout=20) for name, sub in subs.items()}
        for t in threads.values():
            t.join(15)
        assert not any(t.is_alive() for t in threads.values()), f"a tier hung: {results}"
    finally:
        for rt in rts.values():
            rt.stop()
        for t in threads.values():
            t.join(5)
        for out in outlets:
            out.close()
        for sub in subs.values():
            sub.close()
    for name, (recs, eos) in got.items():
        assert eos == 1 and [(r.stream, r.seq) for r in recs] == [(f"cam-{name}", s) for s in range(3)]
        assert all(r.stats["verified"] for r in recs)
    assert not any(isinstance(r, BaseException) for r in results.values()), results
    assert results["cloud"]["counters"]["verify.calls"] == 6  # type: ignore[index]
