#!/usr/bin/env bash
# Install GStreamer's RTSP server (Debian packages) for the `rtsp`-marked tests.
# Idempotent: does nothing when the server's Python bindings already import.
set -euo pipefail

PY=${SYSTEM_PYTHON:-/usr/bin/python3}
PKGS=(gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 python3-gi gstreamer1.0-plugins-base
      gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly gstreamer1.0-tools)

check() {
    "$PY" - <<'PY' >/dev/null 2>&1
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer  # noqa: F401
Gst.init(None)
for name in ("videotestsrc", "x264enc", "rtph264pay"):
    assert Gst.ElementFactory.find(name) is not None, name
PY
}

if check; then
    echo "install_rtsp_deps: GStreamer RTSP server already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y --no-install-recommends "${PKGS[@]}"; then
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "${PKGS[@]}"
fi

if check; then
    echo "install_rtsp_deps: installed"
else
    echo "install_rtsp_deps: packages installed but GstRtspServer still does not import" >&2
    exit 1
fi
