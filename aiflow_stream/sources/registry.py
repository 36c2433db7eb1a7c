"""Source strings -> sources: the one place that knows the URI forms.

    synthetic://?seed=7&fps=30&width=1280&height=720&frames=300&live=1&split=heldout
    /data/clip.mp4  or  file:///data/clip.mp4         video file (Policy.BLOCK)
    /data/frames/   or  images:///data/frames          folder of png/jpg (Policy.BLOCK)
    camera://0?width=1280&height=720&fps=30            OpenCV device index (Policy.LATEST)
    rtsp://host:8554/stream                            RTSP over TCP (Policy.LATEST)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from aiflow_stream.errors import SourceError
from aiflow_stream.sources.base import Source
from aiflow_stream.sources.camera import CameraSource
from aiflow_stream.sources.file import FileSource
from aiflow_stream.sources.images import ImageFolderSource
from aiflow_stream.sources.rtsp import RtspSource
from aiflow_stream.sources.synthetic import SyntheticSource

EXAMPLES = (
    "synthetic://?seed=7&fps=30, /data/clip.mp4 or file:///data/clip.mp4, "
    "/data/frames or images:///data/frames, camera://0, rtsp://127.0.0.1:8554/stream"
)


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected 1/0/true/false, got {text!r}")


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("", "none", "inf") else int(text)


_SYNTHETIC: dict[str, Callable[[str], Any]] = {
    "seed": int,
    "fps": float,
    "width": int,
    "height": int,
    "frames": _optional_int,
    "noise": float,
    "min_scene_s": float,
    "max_scene_s": float,
    "live": _bool,
    "split": str,
    "motion": float,
}
_CAMERA: dict[str, Callable[[str], Any]] = {
    "width": int,
    "height": int,
    "fps": float,
    "open_timeout": float,
    "read_timeout": float,
    "buffer": int,
}


def open_source(uri: str, **options: Any) -> Source:
    """Build the source ``uri`` names, not yet opened (``open()`` or the first ``read()`` opens
    it), so it is cheap and safe to call from a ``SupervisedSource`` factory. Keyword
    ``options`` go to the source's constructor and override query parameters. A string that
    names no source raises ``SourceError`` with examples of the accepted forms."""
    if not isinstance(uri, str) or not uri.strip():
        raise SourceError(f"empty source string; expected one of: {EXAMPLES}")
    uri = uri.strip()
    if "://" not in uri:
        return _path_source(uri, uri, options)
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "synthetic":
        if parts.netloc or parts.path.strip("/"):
            raise SourceError(f"{uri!r}: expected synthetic://?seed=7&fps=30 (options after '?')")
        params = _query(uri, parts.query, _SYNTHETIC, "synthetic://?seed=7&fps=30&frames=300")
        return _build(uri, SyntheticSource, {**params, **options, "uri": uri})
    if scheme in ("file", "images"):
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise SourceError(
                f"{uri!r}: expected an absolute path after {scheme}://, "
                f"e.g. {scheme}:///data/{'clip.mp4' if scheme == 'file' else 'frames'}"
            )
        path = unquote(parts.path)
        if scheme == "images":
            return _build(uri, ImageFolderSource, {"folder": path, **options, "uri": uri})
        return _path_source(uri, path, options)
    if scheme == "camera":
        if not parts.netloc.isdigit() or parts.path.strip("/"):
            raise SourceError(f"{uri!r}: expected camera://<device index>, e.g. camera://0")
        params = _query(uri, parts.query, _CAMERA, "camera://0?width=1280&height=720&fps=30")
        return _build(uri, CameraSource, {"index": int(parts.netloc), **params, **options})
    if scheme in ("rtsp", "rtsps"):
        if not parts.hostname:
            raise SourceError(f"{uri!r}: expected rtsp://host[:port]/path, e.g. rtsp://127.0.0.1:8554/stream")
        return _build(uri, RtspSource, {"url": uri, **options})
    raise SourceError(f"{uri!r}: unknown source kind {scheme!r}; expected one of: {EXAMPLES}")


def _path_source(uri: str, path: str, options: dict[str, Any]) -> Source:
    if os.path.isdir(path):
        return _build(uri, ImageFolderSource, {"folder": path, **options})
    if os.path.isfile(path):
        return _build(uri, FileSource, {"path": path, **options})
    raise SourceError(f"{uri!r}: no such video file or image folder; expected one of: {EXAMPLES}")


def _query(
    uri: str, query: str, known: dict[str, Callable[[str], Any]], example: str
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, text in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if key not in known:
            raise SourceError(
                f"{uri!r}: unknown option {key!r}; known: {', '.join(known)} (example: {example})"
            )
        if key in out:
            raise SourceError(f"{uri!r}: option {key!r} given twice")
        try:
            out[key] = known[key](text)
        except ValueError as err:
            raise SourceError(f"{uri!r}: bad value for {key}: {err} (example: {example})") from err
    return out


def _build(uri: str, cls: Callable[..., Source], kwargs: dict[str, Any]) -> Source:
    try:
        return cls(**kwargs)
    except TypeError as err:  # an unknown keyword option
        raise SourceError(f"{uri!r}: {err}") from err
