"""Shared fixtures: processes a test starts are always stopped, with their children."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import psutil
import pytest


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process under it (tiers started by a launcher)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in [*family]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    psutil.wait_procs(family, timeout=10)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """A list the test appends its subprocesses to; each is killed (with its children) at teardown."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        kill_tree(p)
        for stream in (p.stdout, p.stderr):
            if stream is not None:
                stream.close()
