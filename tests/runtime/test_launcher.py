"""The local launcher and ``aiflow run``: every tier its own process; end of stream drains the
graph and every tier exits 0; signals stop all tiers within 5 s; a dead tier is reported."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from aiflow_stream.graph import Tier
from aiflow_stream.runtime.launcher import describe_exit, start_local
from aiflow_stream.transport.pubsub import Subscriber
from tests.runtime.support import (
    STUB_GRAPH,
    LineReader,
    aiflow,
    collect,
    expected_texts,
    stub_env,
    wait_gone,
)

FINITE = "synthetic://?seed=5&live=0&frames=40&width=160&height=96"
LIVE = "synthetic://?seed=5&fps=30&width=160&height=96"  # endless


def test_end_of_stream_drains_every_tier_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # device -> edge -> cloud, a file-like (block) source: nothing may be dropped, every key
    # frame comes out as a caption with the right content, and every process exits 0 by itself.
    for k, v in stub_env(every=4, verify=True).items():
        monkeypatch.setenv(k, v)  # the launcher loads the graph too, not only the tiers
    run = start_local(str(STUB_GRAPH), source=FINITE, workdir=tmp_path, stderr=subprocess.DEVNULL)
    sub = Subscriber(run.publish)
    try:
        recs, eos = collect(sub, timeout=60)
        codes = run.wait(timeout=30)
    finally:
        sub.close()
        run.stop()
    assert eos == 1, "the subscriber never saw end of stream"
    assert codes == {Tier.CLOUD: 0, Tier.EDGE: 0, Tier.DEVICE: 0}
    want = expected_texts(FINITE, 4)
    assert {r.seq: r.text for r in recs} == want
    assert len(recs) == len(want) == 10
    assert all(r.stats["verified"] for r in recs), "a packet reached the cloud altered"
    m = run.metrics()
    assert m["device"]["counters"]["capture.out"] == 40
    assert m["cloud"]["counters"]["verify.calls"] == 10
    for tier in ("device", "edge", "cloud"):
        assert m[tier]["drops"] == {}, f"{tier} dropped items from a block source: {m[tier]['drops']}"
    inlet = m["edge"]["inlet"]
    assert inlet["gaps"] == 0 and inlet["reordered"] == 0  # link seqs are consecutive, EOS included
    assert inlet["received_msgs"] == 11  # 10 packets and the EOS


def _start_run(procs: list[subprocess.Popen], source: str, *extra: str,
               **knobs: object) -> tuple[subprocess.Popen, LineReader, LineReader]:
    p = subprocess.Popen(aiflow("run", str(STUB_GRAPH), "--source", source, "--json", *extra),
                         env=stub_env(**knobs), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(p)
    return p, LineReader(p.stdout), LineReader(p.stderr)  # type: ignore[arg-type]


def _tier_pids(launcher: subprocess.Popen, n: int, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = psutil.Process(launcher.pid).children(recursive=True)
        if len(kids) >= n:
            return [k.pid for k in kids]
        time.sleep(0.05)
    raise AssertionError(f"the launcher started fewer than {n} tier processes")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_every_tier_within_5s(procs: list[subprocess.Popen], sig: signal.Signals) -> None:
    launcher, out, err = _start_run(procs, LIVE, every=3)
    tiers = _tier_pids(launcher, 2)
    first = out.get(timeout=60)
    assert first is not None, f"no caption from a live source: {err.text(0)}"
    assert json.loads(first)["text"].startswith("crc ")
    t0 = time.monotonic()
    launcher.send_signal(sig)
    launcher.wait(10)
    left = wait_gone(tiers, timeout=5.0 - (time.monotonic() - t0))
    took = time.monotonic() - t0
    assert not left, f"tier processes {left} still running {took:.1f} s after {sig.name}"
    assert took < 5.0
    assert launcher.returncode == 0, err.text()  # a requested stop is a clean stop
    assert "killed by" not in err.text()


def test_signal_during_setup_stops_every_tier(procs: list[subprocess.Popen]) -> None:
    # The edge takes 60 s to set up (as a model load may) and the device waits for it to
    # listen: a stop must not wait for setups or connect timeouts to finish.
    launcher, _, err = _start_run(procs, LIVE, setup_s=60)
    tiers = _tier_pids(launcher, 2)
    deadline = time.monotonic() + 20
    while "[edge] setting up caption" not in "".join(err.all) and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(10)
    left = wait_gone(tiers, timeout=5.0)
    assert not left and time.monotonic() - t0 < 5.0, f"tiers {left} outlived the stop: {err.text(0)}"
    text = err.text()
    assert "[edge] stopped during setup" in text
    assert launcher.returncode == 0, text


def test_dead_tier_is_reported_with_its_exit_code(procs: list[subprocess.Popen]) -> None:
    launcher, out, err = _start_run(procs, LIVE, every=3)
    assert out.get(timeout=60) is not None, err.text(0)
    edge = next(p for p in psutil.Process(launcher.pid).children()
                if "edge" in p.cmdline()[p.cmdline().index("tier") + 1:][:1])
    edge.kill()
    launcher.wait(15)
    text = err.text()
    assert launcher.returncode != 0
    assert "tier edge was killed by SIGKILL (exit code -9)" in text, text


def test_describe_exit_names_tier_and_code() -> None:
    assert describe_exit(Tier.EDGE, 3) == "tier edge exited with code 3"
    assert describe_exit(Tier.CLOUD, -15) == "tier cloud was killed by SIGTERM (exit code -15)"
