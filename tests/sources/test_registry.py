"""open_source: each source string builds the right (unopened) source; bad strings explain."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from aiflow_stream.errors import SourceError
from aiflow_stream.sources import (
    CameraSource,
    FileSource,
    ImageFolderSource,
    Policy,
    RtspSource,
    Source,
    SyntheticSource,
    open_source,
)


def test_synthetic_query_is_parsed_and_options_override() -> None:
    src = open_source("synthetic://?seed=7&fps=30&width=640&height=360&frames=9&noise=0"
                      "&min_scene_s=1&max_scene_s=3&live=0&split=train")
    assert isinstance(src, SyntheticSource) and isinstance(src, Source)
    assert (src.seed, src.fps, src.width, src.height, src.frames) == (7, 30.0, 640, 360, 9)
    assert src.policy is Policy.BLOCK and src.split == "train" and src.noise == 0
    live = open_source("synthetic://", seed=3, frames=None)
    assert live.policy is Policy.LATEST and live.seed == 3 and live.frames is None
    assert open_source("synthetic://?seed=1", seed=2).seed == 2


def test_paths_and_urls(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not opened yet")
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((4, 4, 3), np.uint8))
    for uri in (str(video), f"file://{video}"):
        src = open_source(uri)
        assert isinstance(src, FileSource) and src.policy is Policy.BLOCK
    for uri in (str(folder), f"images://{folder}", f"file://{folder}"):
        src = open_source(uri)
        assert isinstance(src, ImageFolderSource) and src.policy is Policy.BLOCK
    cam = open_source("camera://2?width=640&height=480&fps=15")
    assert isinstance(cam, CameraSource) and cam.index == 2 and cam.policy is Policy.LATEST
    assert cam.fps == 15.0
    rtsp = open_source("rtsp://127.0.0.1:8554/live?x=1", read_timeout=2.0)
    assert isinstance(rtsp, RtspSource) and rtsp.policy is Policy.LATEST
    assert rtsp.uri == "rtsp://127.0.0.1:8554/live?x=1"


@pytest.mark.parametrize(
    ("uri", "hint"),
    [
        ("", "expected one of"),
        ("   ", "expected one of"),
        ("ftp://host/x", "unknown source kind 'ftp'"),
        ("camera://", "camera://0"),
        ("camera://front", "camera://0"),
        ("camera://0?zoom=2", "unknown option 'zoom'"),
        ("synthetic://?sede=7", "unknown option 'sede'"),
        ("synthetic://?fps=fast", "bad value for fps"),
        ("synthetic://?live=maybe", "bad value for live"),
        ("synthetic://?seed=1&seed=2", "given twice"),
        ("synthetic://?fps=-3", "fps must be > 0"),
        ("synthetic://cam1", "synthetic://?seed=7"),
        ("rtsp://", "rtsp://host"),
        ("file://", "file:///data/clip.mp4"),
        ("images://remote-host/frames", "images:///data/frames"),
        ("/no/such/clip.mp4", "no such video file or image folder"),
    ],
)
def test_bad_strings_say_what_was_expected(uri: str, hint: str) -> None:
    with pytest.raises(SourceError, match=None) as info:
        open_source(uri)
    assert hint in str(info.value)


def test_unknown_keyword_option_is_a_source_error() -> None:
    with pytest.raises(SourceError, match="colour"):
        open_source("synthetic://", colour="red")
    with pytest.raises(SourceError, match="transport"):
        open_source("rtsp://127.0.0.1:1/x", transport="carrier-pigeon")
