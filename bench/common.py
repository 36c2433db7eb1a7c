"""Shared harness of the end-to-end benches (e2e, steady, streams): real tier processes,
real ZeroMQ links, link emulators as their own processes, captions collected from the PUB socket.

Nothing here is a benchmark by itself; see bench/e2e.py, bench/steady.py and bench/streams.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SCHEME_GRAPH = str(ROOT / "bench" / "graphs" / "scheme.py")
PY = sys.executable

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- ports, links
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tcp(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


@dataclass(frozen=True)
class Link:
    """One emulated link: ``rate_mbit`` and ``delay_ms`` one way, the same both ways."""

    rate_mbit: float
    delay_ms: float


class Emulator:
    """``python -m aiflow_stream.transport.emulator`` as its own process (no GIL shared with a
    model); ``stop()`` returns its byte counters (``up`` = client -> target)."""

    def __init__(self, listen_port: int, target_port: int, link: Link, log_dir: Path) -> None:
        self.link = link
        self.port = listen_port
        self._out = open(log_dir / f"emu-{listen_port}.json", "w+")  # noqa: SIM115 - closed in stop()
        cmd = [PY, "-m", "aiflow_stream.transport.emulator", "--listen", f"127.0.0.1:{listen_port}",
               "--target", f"127.0.0.1:{target_port}", "--rate", f"{link.rate_mbit}mbit",
               "--delay", f"{link.delay_ms}ms"]
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.DEVNULL, cwd=ROOT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            self._out.seek(0)
            if "listening" in self._out.read():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"emulator on port {listen_port} exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise RuntimeError(f"emulator on port {listen_port} did not start")

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.seek(0)
        text = self._out.read()
        self._out.close()
        start = text.find("{")
        try:
            return dict(json.loads(text[start:])) if start >= 0 else {}
        except ValueError:
            return {}


# ---------------------------------------------------------------------------------- processes
class RssSampler:
    """Samples resident memory and CPU time of named processes every ``every`` seconds."""

    def __init__(self, pids: dict[str, int], every: float = 10.0) -> None:
        import psutil

        self.every = every
        self.procs = {}
        for name, pid in pids.items():
            try:
                self.procs[name] = psutil.Process(pid)
            except psutil.Error:
                pass
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def sample(self) -> dict[str, Any]:
        import psutil

        row: dict[str, Any] = {"t": round(time.monotonic() - self._t0, 2), "ts": time.time()}
        for name, p in self.procs.items():
            try:
                row[name] = {"rss_mb": round(p.memory_info().rss / 2**20, 2),
                             "cpu_s": round(sum(p.cpu_times()[:2]), 2)}
            except psutil.Error:
                pass
        return row

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.every)

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.samples


def tier_cmd(tier: str, graph: str, *, listen: str | None, peers: dict[str, str], publish: str,
             source: str | None = None, frames: int | None = None, stream: str | None = None,
             expect_peers: int = 1, metrics: Path | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The ``aiflow tier`` command line of one tier process."""
    cmd = [PY, "-m", "aiflow_stream.cli", "tier", tier, graph, "--publish", publish]
    if listen:
        cmd += ["--listen", listen]
    for t, a in peers.items():
        cmd += ["--peer", f"{t}={a}"]
    if source:
        cmd += ["--source", source]
    if frames is not None:
        cmd += ["--frames", str(frames)]
    if stream:
        cmd += ["--stream", stream]
    if expect_peers != 1:
        cmd += ["--expect-peers", str(expect_peers)]
    if metrics is not None:
        cmd += ["--metrics", str(metrics)]
    return cmd + list(extra)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    metrics_path: Path | None = None

    def metrics(self) -> dict[str, Any]:
        if self.metrics_path is None:
            return {}
        try:
            return dict(json.loads(self.metrics_path.read_text()))
        except (OSError, ValueError):
            return {}


class Cluster:
    """Tier processes and emulators of one run; ``close()`` stops whatever is still alive."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.env.update(env or {})
        self.procs: dict[str, Proc] = {}
        self.emulators: dict[str, Emulator] = {}
        self.publish = f"ipc://{workdir}/captions.sock"

    def emulate(self, name: str, target_port: int, link: Link) -> int:
        """Start an emulator in front of ``target_port``; returns the port to connect to."""
        port = free_port()
        self.emulators[name] = Emulator(port, target_port, link, self.workdir)
        return port

    def start(self, name: str, cmd: list[str], metrics: bool = True) -> Proc:
        mpath = self.workdir / f"{name}.metrics.json" if metrics else None
        if mpath is not None:
            cmd = cmd + ["--metrics", str(mpath)]
        err = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 - owned by the child
        p = subprocess.Popen(cmd, env=self.env, stderr=err, stdout=subprocess.DEVNULL, cwd=ROOT)
        err.close()
        self.procs[name] = Proc(name, p, mpath)
        return self.procs[name]

    def pids(self) -> dict[str, int]:
        return {n: p.popen.pid for n, p in self.procs.items()}

    def alive(self) -> bool:
        return any(p.popen.poll() is None for p in self.procs.values())

    def failed(self) -> dict[str, int]:
        return {n: rc for n, p in self.procs.items() if (rc := p.popen.poll()) not in (None, 0)}

    def wait(self, timeout: float, drain_s: float = 20.0) -> str:
        """Wait for every tier to exit after end of stream: ``"clean"``; ``"drain"`` if the
        devices exited but a downstream tier was still running ``drain_s`` later (its end of
        stream never arrived); ``"timeout"`` after ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        devices_done: float | None = None
        while self.alive():
            now = time.monotonic()
            if now > deadline:
                return "timeout"
            if devices_done is None and all(p.popen.poll() is not None for n, p in self.procs.items()
                                            if n.startswith("device")):
                devices_done = now
            if devices_done is not None and now - devices_done > drain_s:
                return "drain"
            time.sleep(0.1)
        return "clean"

    def close(self, grace: float = 5.0) -> dict[str, dict[str, Any]]:
        """Stop tiers (SIGTERM, then SIGKILL after ``grace``) and emulators; emulator stats."""
        for p in self.procs.values():
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
        return {n: e.stop() for n, e in self.emulators.items()}

    def wait_ready(self, names: Iterable[str], timeout: float = 180.0) -> None:
        """Wait until each named tier has set up (its log says ``ready``) and so listens."""
        deadline = time.monotonic() + timeout
        for name in names:
            while "] ready in" not in self.log_tail(name, 100000):
                if self.procs[name].popen.poll() is not None:
                    raise RuntimeError(f"{name} exited during setup:\n{self.log_tail(name)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not ready after {timeout:.0f} s:\n{self.log_tail(name)}")
                time.sleep(0.2)

    def log_tail(self, name: str, chars: int = 1500) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text()[-chars:]
        except OSError:
            return ""


def workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"aiflow-bench-{prefix}-"))


# ---------------------------------------------------------------------------------- captions
class Collector:
    """Collects caption records from the PUB address in a background thread."""

    def __init__(self, address: str) -> None:
        from aiflow_stream.transport.pubsub import Subscriber

        self.sub = Subscriber(address)
        self.records: list[Any] = []
        self.recv_ns: list[int] = []
        self.ended: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rec = self.sub.recv(timeout=0.2)
            if rec is None:
                continue
            with self._lock:
                if rec.eos:
                    self.ended.add(rec.stream)
                else:
                    self.records.append(rec)
                    self.recv_ns.append(time.time_ns())

    def count(self, final_only: bool = True) -> int:
        with self._lock:
            return sum(1 for r in self.records if r.final or not final_only)

    def close(self) -> list[Any]:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sub.close()
        return list(self.records)


# ---------------------------------------------------------------------------------- statistics
def pct(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; NaN if empty."""
    v = sorted(values)
    if not v:
        return math.nan
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def median(values: Iterable[float]) -> float:
    v = list(values)
    return statistics.median(v) if v else math.nan


def cv(values: Sequence[float]) -> float:
    """Coefficient of variation (stdev / mean); NaN for fewer than two values."""
    if len(values) < 2 or statistics.mean(values) == 0:
        return math.nan
    return statistics.stdev(values) / statistics.mean(values)


def quality(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Exact match, corpus BLEU-4 and CIDEr-D of ``hyps`` against ground truth ``refs``."""
    from aiflow_stream.models.metrics import bleu4, cider_d, exact_match

    if not hyps:
        return {"exact": math.nan, "bleu4": math.nan, "cider": math.nan, "n": 0}
    return {"exact": round(exact_match(hyps, refs), 4), "bleu4": round(bleu4(hyps, refs), 4),
            "cider": round(cider_d(hyps, refs), 4), "n": len(hyps)}


def rnd(x: float, nd: int = 3) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


# ---------------------------------------------------------------------------------- output
def engine_version() -> dict[str, Any]:
    """The commit the run used and the engine files that differed from it (others edit the
    working tree while benchmarks run)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [ln[3:] for ln in git("status", "--short", "aiflow_stream").splitlines() if ln[:2].strip()]
    return {"commit": git("rev-parse", "--short", "HEAD"), "modified_engine_files": dirty}


def write_results(name: str, figures: dict[str, Any], extra: dict[str, Any], markdown: str) -> Path:
    """``bench/results/<name>.json`` ({"figures": ..., **extra}) and ``<name>.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    extra = {**extra, "engine": engine_version()}
    path.write_text(json.dumps({"figures": figures, **extra}, indent=1, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")
    return path


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def machine_note() -> str:
    load = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {load[0]:.2f} at start"


def say(msg: str) -> None:
    """Progress on stderr (benchmarks are programs; the library never prints)."""
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Timer:
    t0: float = field(default_factory=time.monotonic)

    def __call__(self) -> float:
        return time.monotonic() - self.t0


def update_results_md() -> Path:
    """Rebuild ``bench/RESULTS.md`` from the e2e / steady / streams markdown written so far."""
    parts = ["# Benchmark results: AI Flow end to end", "",
             "Produced by `bench/e2e.py`, `bench/steady.py` and `bench/streams.py` (commands with each "
             "table; raw figures and the engine commit in `bench/results/<name>.json`).", "",
             "How these were measured:", "",
             "- Real tier processes (`aiflow tier ...`, one per tier and one per camera), real ZeroMQ credit "
             "links, and real bytes through `aiflow_stream.transport.emulator` relays (token bucket, delay line, "
             "bounded buffer), each emulator its own process. Uplink bytes are the emulator's counters (payload, "
             "framing, credits and heartbeats included), not estimates.",
             "- Everything shares one 2-core machine: device, edge, cloud and the relays compete for CPU, which "
             "real deployments would not; compute-bound stages (encode, draft, verify) read slower than on "
             "separate hosts, link-bound ones (a JPEG on 1 Mbit/s) do not. Runs use `nice -n 10`; load average "
             "at start is printed with each table. Expect roughly +-10% run-to-run noise on medians and more on "
             "p95/p99 (p95 of a grid cell comes from ~15 captions).",
             "- Latency is capture -> publish of each key frame's caption (`publish_ns - capture_ns`, one clock). "
             "It includes rendering the synthetic 1280x720 frame (~15-30 ms, every scheme) and excludes "
             "delivering the published caption to a client.",
             "- cloud-only is the paper's baseline as specified: JPEG q75 of the full 1280x720 key frame, over the "
             "same uplink and then the backhaul, captioned by the target model; nothing in its path is tuned.",
             ""]
    for name in ("e2e", "steady", "streams"):
        p = RESULTS / f"{name}.md"
        if p.exists():
            parts += [p.read_text().rstrip(), ""]
    out = ROOT / "bench" / "RESULTS.md"
    out.write_text("\n".join(parts).rstrip() + "\n")
    return out


def launch(cl: Cluster, graph: str, scheme: str, devices: Sequence[tuple[str | None, str]],
           uplink: Link | None = None, backhaul: Link | None = None, device_extra: Sequence[str] = (),
           tier_extra: dict[str, Sequence[str]] | None = None) -> None:
    """Start the tiers of ``scheme`` (downstream first) with one device process per
    ``(stream id, source)``, putting an emulator on the device uplink and one on the edge-cloud
    backhaul when given. cloud-only crosses both in series; AI Flow's verifier RPC crosses the
    backhaul; on-device has no links."""
    extra = tier_extra or {}
    ports = {t: free_port() for t in ("edge", "cloud")}
    n = len(devices)
    dev_peers: dict[str, str] = {}
    if scheme in ("aiflow", "cloud_only"):
        cloud_at = cl.emulate("backhaul", ports["cloud"], backhaul) if backhaul else ports["cloud"]
        cl.start("cloud", tier_cmd("cloud", graph, listen=tcp(ports["cloud"]), peers={}, publish=cl.publish,
                                   expect_peers=n if scheme == "cloud_only" else 1, extra=extra.get("cloud", ())))
        if scheme == "cloud_only":
            dev_peers = {"cloud": tcp(cl.emulate("uplink", cloud_at, uplink) if uplink else cloud_at)}
        else:
            cl.start("edge", tier_cmd("edge", graph, listen=tcp(ports["edge"]), peers={"cloud": tcp(cloud_at)},
                                      publish=cl.publish, expect_peers=n, extra=extra.get("edge", ())))
    elif scheme == "device_edge":
        cl.start("edge", tier_cmd("edge", graph, listen=tcp(ports["edge"]), peers={}, publish=cl.publish,
                                  expect_peers=n, extra=extra.get("edge", ())))
    if scheme in ("aiflow", "device_edge"):
        dev_peers = {"edge": tcp(cl.emulate("uplink", ports["edge"], uplink) if uplink else ports["edge"])}
    # Devices last, once the receivers listen: a device that connects early only meets the
    # emulator, which accepts and then fails to reach the target (a burst of resets at start).
    cl.wait_ready([n for n in ("cloud", "edge") if n in cl.procs])
    for i, (stream, source) in enumerate(devices):
        name = "device" if n == 1 else f"device{i}"
        cl.start(name, tier_cmd("device", graph, listen=None, peers=dev_peers, publish=cl.publish, source=source,
                                stream=stream, extra=list(device_extra) + list(extra.get("device", ()))))
