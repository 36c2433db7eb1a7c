"""ImageFolderSource: sorted png/jpg, RGB order, clear errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from aiflow_stream.errors import SourceError
from aiflow_stream.sources import ImageFolderSource, Policy, open_source


def _write(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> None:
    img = np.zeros((size[1], size[0], 3), np.uint8)
    img[:] = rgb
    assert cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def test_reads_sorted_images_as_rgb(tmp_path: Path) -> None:
    _write(tmp_path / "b.png", (0, 255, 0))
    _write(tmp_path / "a.png", (255, 0, 0))
    _write(tmp_path / "c.PNG", (0, 0, 255), size=(8, 8))
    (tmp_path / "notes.txt").write_text("ignored")
    with open_source(f"images://{tmp_path}") as src:
        assert src.policy is Policy.BLOCK
        frames = []
        while (f := src.read(timeout=1.0)) is not None:
            frames.append(f)
    assert [f.seq for f in frames] == [0, 1, 2]
    assert [tuple(f.image[0, 0]) for f in frames] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    assert frames[2].image.shape == (8, 8, 3) and frames[0].image.dtype == np.uint8


def test_jpeg_is_read(tmp_path: Path) -> None:
    _write(tmp_path / "x.jpg", (200, 30, 30))
    with ImageFolderSource(tmp_path) as src:
        f = src.read()
        assert f is not None and np.abs(f.image.astype(int) - (200, 30, 30)).max() < 12
        assert src.read() is None


def test_empty_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no .png or .jpg"):
        ImageFolderSource(tmp_path).open()
    with pytest.raises(SourceError, match="no such folder"):
        ImageFolderSource(tmp_path / "nope").open()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with ImageFolderSource(tmp_path) as src, pytest.raises(SourceError, match="bad.png"):
        src.read()
