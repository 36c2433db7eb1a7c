"""The ``aiflow`` command: check, run, tier, captions, demo."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from aiflow_stream.errors import AiflowError
from aiflow_stream.graph import Tier

DEMO_SOURCE = "synthetic://?seed=7&fps=30&min_scene_s=1&max_scene_s=2"


def _parse_peers(values: list[str]) -> dict[Tier, str]:
    peers = {}
    for v in values:
        name, sep, addr = v.partition("=")
        if not sep or not addr:
            raise SystemExit(f"aiflow: --peer expects TIER=ADDRESS (e.g. edge=tcp://10.0.0.2:5556), got {v!r}")
        try:
            peers[Tier(name)] = addr
        except ValueError:
            raise SystemExit(f"aiflow: --peer {v!r}: unknown tier {name!r}; use device, edge or cloud") from None
    return peers


def _load_deployment(path: str | None) -> dict[Tier, str]:
    """A small TOML file: ``[tiers.edge] address = "tcp://10.0.0.2:5556"``."""
    if not path:
        return {}
    import tomllib

    data = tomllib.loads(Path(path).read_text())
    out = {}
    for name, table in (data.get("tiers") or {}).items():
        if isinstance(table, dict) and "address" in table:
            out[Tier(name)] = str(table["address"])
    return out


def cmd_check(args: argparse.Namespace) -> int:
    from aiflow_stream.graph import load_pipeline

    pipeline = load_pipeline(args.graph)
    addrs = _load_deployment(args.deployment)
    addrs.update(_parse_peers(args.peer))
    pipeline.validate(addrs, need_addresses=bool(addrs) or args.strict)
    print(pipeline.plan(addrs))
    print("ok: graph is valid")
    return 0


class _StopDuringSetup(BaseException):
    """A signal came while the tier was still setting up (loading models, reaching peers)."""


def cmd_tier(args: argparse.Namespace) -> int:
    rt: Any = None
    running = False

    def on_signal(signum: int, _frame: Any) -> None:
        print(f"[{args.tier}] {signal.Signals(signum).name}: stopping", file=sys.stderr, flush=True)
        if rt is not None:
            rt.stop()
        if not running:  # setup can take a while (imports, models, connect timeouts): abandon it now
            raise _StopDuringSetup

    # First thing, before the runtime's imports: a launcher may stop a tier that is still starting.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    tier = Tier(args.tier)
    t0 = time.monotonic()
    try:
        from aiflow_stream.runtime.tier import quiet_threads

        quiet_threads()
        from aiflow_stream.graph import load_pipeline
        from aiflow_stream.runtime.tier import TierOptions, TierRuntime

        pipeline = load_pipeline(args.graph)
        peers = _load_deployment(args.deployment)
        peers.update(_parse_peers(args.peer))
        if args.listen:
            peers[tier] = args.listen
        pipeline.validate()
        opts = TierOptions(listen=args.listen, peers=peers, publish=args.publish, source=args.source,
                           frames=args.frames, stream=args.stream, expect_peers=args.expect_peers,
                           window_msgs=args.window, connect_timeout=args.connect_timeout, torch_device=args.device,
                           torch_dtype=args.dtype, torch_threads=args.threads, metrics_path=args.metrics,
                           curve_dir=args.curve)
        rt = TierRuntime(pipeline, tier, opts)
        rt.setup(progress=lambda m: print(m, file=sys.stderr, flush=True))
        running = True
    except _StopDuringSetup:
        if rt is not None:
            rt.close()
        print(f"[{tier.value}] stopped during setup", file=sys.stderr, flush=True)
        _fast_exit(0)
        return 0
    except BaseException:
        if rt is not None:
            rt.close()  # sockets and sinks opened before the failure
        raise
    print(f"[{tier.value}] ready in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    metrics = rt.run()
    drops = metrics.get("drops") or {}
    print(f"[{tier.value}] done; drops: {json.dumps(drops)}", file=sys.stderr, flush=True)
    _fast_exit(0)
    return 0


def _fast_exit(code: int) -> None:
    """Leave without the interpreter's teardown (seconds of garbage collection with torch
    loaded): every socket is closed by now, so flush what ZeroMQ still holds and go."""
    import os

    import zmq

    zmq.Context.instance().term()  # waits at most for the sockets' (short) linger
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _Score:
    def __init__(self) -> None:
        self.n = 0
        self.right = 0

    def add(self, rec: Any) -> str:
        if rec.truth is None:
            return ""
        self.n += 1
        ok = rec.text.strip() == rec.truth.strip()
        self.right += ok
        return "ok " if ok else "XX "


def _print_record(rec: Any, as_json: bool, score: _Score, show_truth: bool) -> None:
    if as_json:
        print(json.dumps(rec.to_dict()), flush=True)
        return
    lat = rec.latency_ms
    stages = ", ".join(f"{k} {v:.0f}" for k, v in lat.items() if k != "total")
    if not rec.final:
        print(f"  draft  {rec.stream}#{rec.seq:<5} {rec.text}   ({lat.get('total', rec.latency):.0f} ms)", flush=True)
        return
    mark = score.add(rec) if show_truth else ""
    line = f"{mark}{rec.stream}#{rec.seq:<5} {rec.text}"
    if show_truth and rec.truth is not None:
        line += f"\n        truth       {rec.truth}\n        accuracy {score.right}/{score.n} = " \
                f"{100.0 * score.right / score.n:.1f}%"
    line += f"   latency {lat.get('total', rec.latency):.0f} ms ({stages}) [{rec.model}]"
    print(line, flush=True)


def _run_local(graph: str, source: str | None, frames: int | None, as_json: bool, show_truth: bool,
               extra: list[str], timeout: float | None) -> int:
    from aiflow_stream.runtime.launcher import describe_exit, start_local
    from aiflow_stream.transport.pubsub import Subscriber

    run = start_local(graph, source=source, frames=frames, extra_args=extra)
    sub = Subscriber(run.publish)
    stop = threading.Event()
    score = _Score()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    t0 = time.monotonic()
    last_note = 0.0
    got_first = False
    rc = 0
    try:
        while not stop.is_set():
            rec = sub.recv(timeout=0.5)
            if run.failed():  # even while captions flow: another tier may still be publishing
                rc = 1
                break
            if rec is None:
                if not run.alive():
                    break
                if timeout is not None and time.monotonic() - t0 > timeout:
                    print(f"aiflow: no end of stream after {timeout:.0f} s; stopping", file=sys.stderr)
                    rc = 1
                    break
                if not got_first and not as_json and time.monotonic() - last_note > 3:
                    last_note = time.monotonic()
                    print(f"... tiers loading models and warming up ({last_note - t0:.0f} s)", file=sys.stderr,
                          flush=True)
                continue
            got_first = True
            if not rec.eos:
                _print_record(rec, as_json, score, show_truth)
        # Tiers exit on their own after end of stream; give them time to drain.
        run.wait(timeout=30 if not stop.is_set() else 0)
    finally:
        sub.close()
        codes = run.stop()
        for t, code in codes.items():
            if code not in (0, None) and not (stop.is_set() and code == -signal.SIGTERM):
                print(f"aiflow: {describe_exit(t, code)}", file=sys.stderr)
                rc = rc or 1
    if show_truth and score.n and not as_json:
        print(f"final accuracy {score.right}/{score.n} = {100.0 * score.right / score.n:.1f}% (exact match "
              f"against the synthetic ground truth)")
    return rc


def cmd_run(args: argparse.Namespace) -> int:
    extra = []
    if args.window:
        extra += ["--window", str(args.window)]
    if args.curve:
        extra += ["--curve", args.curve]
    return _run_local(args.graph, args.source, args.frames, args.json, show_truth=not args.json, extra=extra,
                      timeout=args.timeout)


def cmd_demo(args: argparse.Namespace) -> int:
    graph = Path(__file__).resolve().parents[1] / "graphs" / "caption.py"
    if not graph.exists():
        raise SystemExit(f"aiflow demo: the canonical graph {graph} is missing; run from a source checkout "
                         f"(`make demo`) or pass a graph to `aiflow run`")
    print(f"aiflow demo: {graph.name} on {args.source}, {args.frames} frames; device -> edge (draft) -> cloud "
          f"(verify), all tiers on this machine", flush=True)
    return _run_local(str(graph), args.source, args.frames, args.json, show_truth=True, extra=[],
                      timeout=args.timeout)


def cmd_keys(args: argparse.Namespace) -> int:
    from aiflow_stream.runtime.keys import write_keys

    for path in write_keys(args.dir):
        print(path)
    print("copy the .key files to every host and each tier's .key_secret only to its own host; "
          "then pass --curve DIR to `aiflow tier` (or `aiflow run`)")
    return 0


def cmd_captions(args: argparse.Namespace) -> int:
    from aiflow_stream.transport.pubsub import subscribe

    score = _Score()
    try:
        for rec in subscribe(args.address, args.stream or None, timeout=args.timeout, until_eos=args.until_eos):
            _print_record(rec, args.json, score, show_truth=False)
    except KeyboardInterrupt:
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="aiflow", description="aiflow_stream: device-edge-cloud captioning over ZeroMQ")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("check", help="validate a graph and print its placement plan")
    p.add_argument("graph")
    p.add_argument("--peer", action="append", default=[], metavar="TIER=ADDR")
    p.add_argument("--deployment", help="TOML file with [tiers.NAME] address = ...")
    p.add_argument("--strict", action="store_true", help="require an address for every receiving tier")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("run", help="run every tier of a graph on this machine and print captions")
    p.add_argument("graph")
    p.add_argument("--source", help="override every capture's source string")
    p.add_argument("--frames", type=int, help="stop after N frames per capture")
    p.add_argument("--json", action="store_true", help="one JSON object per caption")
    p.add_argument("--window", type=int, default=0, help="link credit window (messages)")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    p.add_argument("--curve", metavar="DIR", help="encrypt links with the CURVE keys in DIR")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("tier", help="run one tier of a graph (what drivers/device.py etc. call)")
    p.add_argument("tier", choices=[t.value for t in Tier])
    p.add_argument("graph")
    p.add_argument("--listen", help="address this tier binds, e.g. tcp://0.0.0.0:5556")
    p.add_argument("--peer", action="append", default=[], metavar="TIER=ADDR")
    p.add_argument("--deployment")
    p.add_argument("--publish", help="caption PUB address (default tcp://127.0.0.1:5560)")
    p.add_argument("--source")
    p.add_argument("--frames", type=int)
    p.add_argument("--stream", help="stream id for this tier's captures (one device process per camera)")
    p.add_argument("--expect-peers", type=int, default=1, help="instances of each upstream tier")
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--connect-timeout", type=float, default=60.0)
    p.add_argument("--device", default="cpu", help="torch device for this tier's models (cpu, cuda)")
    p.add_argument("--dtype", default=None, help="torch dtype (float32, float16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--metrics", help="write metrics JSON here every few seconds and at exit")
    p.add_argument("--curve", metavar="DIR", help="encrypt and authenticate links with the CURVE keys in DIR "
                   "(made by `aiflow keys DIR`)")
    p.set_defaults(func=cmd_tier)

    p = sub.add_parser("keys", help="write CURVE key pairs for device, edge and cloud into DIR")
    p.add_argument("dir")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("captions", help="print captions published at ADDRESS, live")
    p.add_argument("address")
    p.add_argument("--stream", action="append", default=[])
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--until-eos", action="store_true")
    p.set_defaults(func=cmd_captions)

    p = sub.add_parser("demo", help="the canonical graph on the synthetic feed with the default model")
    p.add_argument("--source", default=DEMO_SOURCE)
    p.add_argument("--frames", type=int, default=450)
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=300)
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except AiflowError as err:
        print(f"aiflow: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
