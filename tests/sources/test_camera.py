"""CameraSource: a missing device fails at once with a message that names it."""

from __future__ import annotations

import time

import pytest

from aiflow_stream.errors import SourceError
from aiflow_stream.sources import CameraSource, open_source


def test_missing_camera_is_a_clear_source_error() -> None:
    src = open_source("camera://99")
    assert isinstance(src, CameraSource)
    start = time.monotonic()
    with pytest.raises(SourceError) as info:
        src.read(timeout=1.0)
    assert time.monotonic() - start < 5.0
    msg = str(info.value)
    assert "camera://99" in msg and "/dev/video99" in msg and "plugged" in msg
    src.close()
