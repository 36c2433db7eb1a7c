"""FileSource: every frame of a real video, in order, never dropped; bad files fail fast."""

from __future__ import annotations

import time
from pathlib import Path

import av
import numpy as np
import pytest

from aiflow_stream.errors import SourceError
from aiflow_stream.sources import FileSource, Policy, open_source

N, W, H, FPS = 24, 64, 48, 12


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short clip whose frame i is a flat grey of brightness 10 * i (easy to recognise)."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.bit_rate = 2_000_000
        for i in range(N):
            img = np.full((H, W, 3), 10 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_reads_every_frame_in_order(video: Path) -> None:
    src = open_source(str(video))
    assert isinstance(src, FileSource) and src.policy is Policy.BLOCK
    frames = []
    with src:
        assert src.fps == pytest.approx(FPS)
        for _ in range(N + 5):
            f = src.read(timeout=5.0)
            if f is None:
                break
            frames.append(f)
            if len(frames) == 3:
                time.sleep(0.3)  # a slow reader: BLOCK must not drop anything meanwhile
    assert [f.seq for f in frames] == list(range(N))
    assert all(f.image.shape == (H, W, 3) and f.image.dtype == np.uint8 for f in frames)
    means = [float(f.image.mean()) for f in frames]
    assert means == pytest.approx([10.0 * i for i in range(N)], abs=4.0)
    assert all(a.capture_ns <= b.capture_ns for a, b in zip(frames, frames[1:]))


def test_file_url_form(video: Path) -> None:
    with open_source(f"file://{video}") as src:
        f = src.read(timeout=5.0)
        assert f is not None and f.seq == 0 and float(f.image.mean()) < 4


def test_not_a_video_fails_fast(tmp_path: Path) -> None:
    bad = tmp_path / "junk.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    start = time.monotonic()
    with pytest.raises(SourceError, match="junk.mp4"):
        FileSource(bad, open_timeout=3.0).open()
    assert time.monotonic() - start < 4.0
    with pytest.raises(SourceError, match="no such video file"):
        FileSource(tmp_path / "missing.mp4").open()


def test_closed_source_cannot_reopen(video: Path) -> None:
    src = FileSource(video)
    src.open()
    src.close()
    with pytest.raises(SourceError, match="closed"):
        src.read()
