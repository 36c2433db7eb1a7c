"""Run every tier of a graph on this machine: `python drivers/local.py GRAPH [--frames N]`."""

import sys

from aiflow_stream.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", *sys.argv[1:]]))
