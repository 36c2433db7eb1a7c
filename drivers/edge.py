"""Run the edge tier of a graph on this host: `python drivers/edge.py GRAPH --listen ... --peer ...`.

All logic lives in the package; this is `aiflow tier edge` with the tier filled in.
"""

import sys

from aiflow_stream.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["tier", "edge", *sys.argv[1:]]))
