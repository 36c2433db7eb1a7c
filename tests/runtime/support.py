"""Helpers for the runtime tests: tiers in threads, expected captions, raw wire messages."""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgpack
import psutil

from aiflow_stream.graph import Pipeline, Tier
from aiflow_stream.runtime.tier import TierOptions, TierRuntime
from aiflow_stream.sources import open_source
from aiflow_stream.transport.pubsub import CaptionRecord, Subscriber
from tests.runtime.graphs.stub import frame_text

STUB_GRAPH = Path(__file__).with_name("graphs") / "stub.py"


def expected_texts(source: str, every: int) -> dict[int, str]:
    """seq -> the stub caption of every ``every``-th frame of a finite (``live=0``) source."""
    out = {}
    with open_source(source) as src:
        i = 0
        while (frame := src.read(5.0)) is not None:
            if i % every == 0:
                out[frame.seq] = frame_text(frame.image)
            i += 1
    return out


@dataclass
class ThreadedTiers:
    """Tier runtimes of one pipeline, each ``run()`` in its own thread of this process."""

    runtimes: dict[Tier, TierRuntime]
    publish: str
    results: dict[Tier, Any] = field(default_factory=dict)
    threads: dict[Tier, threading.Thread] = field(default_factory=dict)

    def start(self, tier: Tier) -> None:
        rt = self.runtimes[tier]

        def body() -> None:
            try:
                self.results[tier] = rt.run()
            except BaseException as err:  # reported to the test through results
                self.results[tier] = err

        t = self.threads[tier] = threading.Thread(target=body, name=f"tier-{tier.value}", daemon=True)
        t.start()

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for t in self.threads.values():
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads.values())


@contextmanager
def threaded_tiers(pipeline: Pipeline, tmp: Path, *, start: bool = True, only: list[Tier] | None = None,
                   opts: dict[Tier, dict[str, Any]] | None = None,
                   **common: Any) -> Iterator[ThreadedTiers]:
    """Set up every tier of ``pipeline`` in this process (ipc:// in ``tmp``) and run each in a
    thread; on exit every tier is stopped and joined. Downstream tiers are set up first."""
    addrs = {t: f"ipc://{tmp}/{t.value}.sock" for t in pipeline.tiers()}
    publish = f"ipc://{tmp}/captions.sock"
    tt = ThreadedTiers({}, publish)
    try:
        tiers = [t for t in reversed(pipeline.tiers()) if only is None or t in only]
        for tier in tiers:
            kw = dict(common)
            kw.update((opts or {}).get(tier, {}))
            o = TierOptions(listen=addrs[tier], peers=dict(addrs), publish=publish,
                            metrics_path=str(tmp / f"{tier.value}.metrics.json"), **kw)
            rt = tt.runtimes[tier] = TierRuntime(pipeline, tier, o)
            rt.setup()
        if start:
            for tier in tiers:
                tt.start(tier)
        yield tt
    finally:
        for rt in tt.runtimes.values():
            rt.stop()
        tt.join(10.0)
        for tier, rt in tt.runtimes.items():
            if tier not in tt.threads:
                rt.close()  # set up but never run


def collect(sub: Subscriber, *, until_eos: int = 1, timeout: float = 30.0) -> tuple[list[CaptionRecord], int]:
    """Captions received until ``until_eos`` EOS records came (or ``timeout``); (captions, eos seen)."""
    recs: list[CaptionRecord] = []
    eos = 0
    deadline = time.monotonic() + timeout
    while eos < until_eos and time.monotonic() < deadline:
        r = sub.recv(0.2)
        if r is None:
            continue
        if r.eos:
            eos += 1
        else:
            recs.append(r)
    return recs, eos


def header(kind: int = 3, *, stream: str = "s", seq: int = 0, link: str = "compress",
           parts: list[list[Any]] | None = None, version: int = 1, **extra: Any) -> bytes:
    """A raw wire header (the msgpack map of DESIGN.md section 4)."""
    m: dict[str, Any] = {"v": version, "k": kind, "s": stream, "q": seq, "p": parts or [], "l": link}
    m.update(extra)
    return msgpack.packb(m, use_bin_type=True)


def stub_env(**knobs: Any) -> dict[str, str]:
    """The environment for tier processes loading the stub graph: AIFLOW_TEST_<KNOB>=value."""
    env = dict(os.environ)
    env.update({f"AIFLOW_TEST_{k.upper()}": str(int(v) if isinstance(v, bool) else v) for k, v in knobs.items()})
    return env


def aiflow(*args: str) -> list[str]:
    """The command line of ``aiflow ARGS`` with this interpreter."""
    return [sys.executable, "-m", "aiflow_stream.cli", *args]


class LineReader:
    """Reads a pipe's lines on a thread, so a test can wait for one with a timeout."""

    def __init__(self, pipe: IO[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.all: list[str] = []
        self._t = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._t.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self.all.append(line)
            self.lines.put(line)

    def get(self, timeout: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def text(self, wait: float = 5.0) -> str:
        """Everything read so far, after waiting up to ``wait`` s for the pipe to close."""
        self._t.join(wait)
        return "".join(self.all)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Pids still running (zombies count as gone) after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)
