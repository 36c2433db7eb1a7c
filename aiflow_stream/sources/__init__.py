"""Frame sources: synthetic (with ground truth), video files, image folders, cameras, RTSP.

``open_source(uri)`` builds one from a source string; ``SupervisedSource`` keeps one alive
through failures. Every source follows the :class:`Source` protocol.
"""

from aiflow_stream.sources.base import Frame, Policy, Source, SourceState, SourceTimeout
from aiflow_stream.sources.camera import CameraSource
from aiflow_stream.sources.file import FileSource
from aiflow_stream.sources.images import ImageFolderSource
from aiflow_stream.sources.registry import open_source
from aiflow_stream.sources.rtsp import RtspSource
from aiflow_stream.sources.supervisor import SupervisedSource
from aiflow_stream.sources.synthetic import SyntheticSource

__all__ = [
    "CameraSource",
    "FileSource",
    "Frame",
    "ImageFolderSource",
    "Policy",
    "RtspSource",
    "Source",
    "SourceState",
    "SourceTimeout",
    "SupervisedSource",
    "SyntheticSource",
    "open_source",
]
