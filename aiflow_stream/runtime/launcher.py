"""Run every tier of a graph on this machine, each in its own OS process.

Tiers talk over ``ipc://`` sockets in a private temporary directory; captions come out on a
PUB socket the caller subscribes to. A tier that dies is reported with its exit code and the
others are stopped; SIGINT/SIGTERM stop every tier (SIGKILL after a grace period).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiflow_stream.errors import RuntimeFault
from aiflow_stream.graph import Pipeline, Tier, load_pipeline

log = logging.getLogger(__name__)


@dataclass
class LocalRun:
    """The processes of one local run and where to reach them."""

    graph: str
    pipeline: Pipeline
    workdir: Path
    addresses: dict[Tier, str]
    publish: str
    procs: dict[Tier, subprocess.Popen] = field(default_factory=dict)
    metrics_paths: dict[Tier, Path] = field(default_factory=dict)
    owns_workdir: bool = True

    def poll(self) -> dict[Tier, int | None]:
        return {t: p.poll() for t, p in self.procs.items()}

    def failed(self) -> list[tuple[Tier, int]]:
        return [(t, rc) for t, rc in self.poll().items() if rc not in (None, 0)]

    def alive(self) -> bool:
        return any(rc is None for rc in self.poll().values())

    def stop(self, grace: float = 4.0) -> dict[Tier, int | None]:
        """SIGTERM every tier, then SIGKILL whatever is still alive after ``grace`` seconds."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            left = max(0.0, deadline - time.monotonic())
            try:
                p.wait(timeout=left)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        codes = self.poll()
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return codes

    def wait(self, timeout: float | None = None) -> dict[Tier, int | None]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.alive():
            if deadline is not None and time.monotonic() > deadline:
                break
            if self.failed():
                break
            time.sleep(0.1)
        return self.poll()

    def metrics(self) -> dict[str, Any]:
        out = {}
        for t, p in self.metrics_paths.items():
            try:
                out[t.value] = json.loads(p.read_text())
            except (OSError, ValueError):
                out[t.value] = {}
        return out


def start_local(graph: str, *, source: str | None = None, frames: int | None = None, publish: str | None = None,
                extra_args: list[str] | None = None, tier_args: dict[Tier, list[str]] | None = None,
                addresses: dict[Tier, str] | None = None, env: dict[str, str] | None = None,
                stderr: Any = None, workdir: Path | None = None) -> LocalRun:
    """Validate ``graph`` and start one process per tier; returns at once (tiers load models)."""
    pipeline = load_pipeline(graph)
    pipeline.validate()
    own = workdir is None
    wd = Path(workdir or tempfile.mkdtemp(prefix="aiflow-"))
    addrs = {t: (addresses or {}).get(t) or f"ipc://{wd}/{t.value}.sock" for t in pipeline.tiers()}
    pub = publish or f"ipc://{wd}/captions.sock"
    run = LocalRun(graph, pipeline, wd, addrs, pub, owns_workdir=own)
    child_env = dict(os.environ)
    child_env.update(env or {})
    # Downstream tiers first, so listeners are up when the device starts sending.
    for tier in reversed(pipeline.tiers()):
        cmd = [sys.executable, "-m", "aiflow_stream.cli", "tier", tier.value, graph,
               "--listen", addrs[tier], "--publish", pub, "--metrics", str(wd / f"{tier.value}.metrics.json")]
        for other, a in addrs.items():
            if other is not tier:
                cmd += ["--peer", f"{other.value}={a}"]
        if source:
            cmd += ["--source", source]
        if frames is not None:
            cmd += ["--frames", str(frames)]
        cmd += list(extra_args or []) + list((tier_args or {}).get(tier, []))
        run.metrics_paths[tier] = wd / f"{tier.value}.metrics.json"
        run.procs[tier] = subprocess.Popen(cmd, env=child_env, stderr=stderr)
    return run


def describe_exit(tier: Tier, code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"tier {tier.value} was killed by {name} (exit code {code})"
    return f"tier {tier.value} exited with code {code}"


def check_failures(run: LocalRun) -> None:
    bad = run.failed()
    if bad:
        raise RuntimeFault("; ".join(describe_exit(t, rc) for t, rc in bad))
