"""Run the cloud tier of a graph on this host: `python drivers/cloud.py GRAPH --listen ... --peer ...`.

All logic lives in the package; this is `aiflow tier cloud` with the tier filled in.
"""

import sys

from aiflow_stream.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["tier", "cloud", *sys.argv[1:]]))
