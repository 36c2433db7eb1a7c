"""Run the device tier of a graph on this host: `python drivers/device.py GRAPH --listen ... --peer ...`.

All logic lives in the package; this is `aiflow tier device` with the tier filled in.
"""

import sys

from aiflow_stream.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["tier", "device", *sys.argv[1:]]))
