"""Many cameras at once: N device processes, one edge, one cloud (AI Flow graph).

    nice -n 10 .venv/bin/python bench/streams.py                      # N = 1 2 4 8 16
    nice -n 10 .venv/bin/python bench/streams.py --streams 1 4 --seconds 40

Each camera is its own device process (``aiflow tier device --stream camK --source
synthetic://?seed=K...``); the edge runs with ``--expect-peers N`` and drafts for every stream,
the cloud verifies. Links are direct TCP on this machine (no emulation: this measures what the
edge and cloud can serve). Every camera offers the same constant load, a key frame every
``--every`` frames of a live ``--fps`` feed; frames are 320x180 (the captioner sees 112x64
anyway) so that 16 simulated cameras do not eat the 2 cores the edge and cloud need.

Per N: total captions/s, per-stream captions/s and the spread (max |rate/mean - 1|, fairness
target +-20%), latency p50/p95 of the cloud-verified caption (and of the edge draft), drops by
reason, and each process's CPU use and each edge/cloud step's busy fraction, which name the
first bottleneck. The edge does not batch across streams yet (see RESULTS.md for the hook it
would need). Writes ``bench/results/streams.json`` / ``streams.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    SCHEME_GRAPH,
    Cluster,
    Collector,
    RssSampler,
    launch,
    machine_note,
    md_table,
    median,
    pct,
    rnd,
    say,
    update_results_md,
    workdir,
    write_results,
)
from bench.e2e import pick_codec  # noqa: E402


def run_n(n: int, seconds: float, fps: float, every: int, codec: str) -> dict[str, Any]:
    frames = int(seconds * fps)
    devices = [(f"cam{k}", f"synthetic://?seed={100 + k}&fps={fps:g}&live=1&frames={frames}&width=320&height=180")
               for k in range(n)]
    env = {"AIFLOW_BENCH_SCHEME": "aiflow", "AIFLOW_BENCH_CODEC": codec,
           "AIFLOW_BENCH_KEYFRAME": json.dumps({"every": every})}
    wd = workdir(f"streams-{n}")
    cl = Cluster(wd, env=env)
    col = Collector(cl.publish)
    say(f"streams: N={n}, {seconds:g} s per camera, {fps / every:.2f} key frames/s per camera")
    t_launch = time.monotonic()
    try:
        launch(cl, SCHEME_GRAPH, "aiflow", devices)
        rss = RssSampler(cl.pids(), every=5.0).start()
        end = cl.wait(seconds + 180 + 10 * n)
        samples = rss.stop()
        failed = cl.failed()
        if end != "clean" or failed:
            say(f"  N={n}: end of stream {end}, failed {failed}")
        if end == "timeout" or failed:
            for name in list(cl.procs)[:3]:
                say(f"  --- {name} log tail ---\n{cl.log_tail(name)}")
    finally:
        cl.close()
        records = col.close()
    wall = time.monotonic() - t_launch
    metrics = {name: p.metrics() for name, p in cl.procs.items()}
    return analyse(n, records, samples, metrics, fps / every, end, bool(failed), wall)


def analyse(n: int, records: list[Any], samples: list[dict[str, Any]], metrics: dict[str, Any],
            offered: float, end: str, failed: bool, wall: float) -> dict[str, Any]:
    finals = [r for r in records if r.final]
    drafts = [r for r in records if not r.final]
    streams = sorted({r.stream for r in finals})
    if not finals:
        return {"ok": False, "end_of_stream": end, "n": n, "captions": 0}
    # The window where every camera is streaming: from the last camera's first caption to the
    # first camera's last one (devices finish loading at different times).
    firsts = {s: min(r.publish_ns for r in finals if r.stream == s) for s in streams}
    lasts = {s: max(r.publish_ns for r in finals if r.stream == s) for s in streams}
    lo, hi = max(firsts.values()), min(lasts.values())
    span = (hi - lo) / 1e9
    in_win = [r for r in finals if lo <= r.publish_ns <= hi]
    per_stream = {s: (sum(1 for r in in_win if r.stream == s) / span if span > 0 else None) for s in streams}
    rates = [v for v in per_stream.values() if v is not None]
    mean_rate = sum(rates) / len(rates) if rates else 0.0
    spread = max(abs(v / mean_rate - 1) for v in rates) if rates and mean_rate else None
    lat = [r.latency for r in in_win]
    dlat = [r.latency for r in drafts if lo <= r.publish_ns <= hi]
    # CPU and busy time over the streaming window only (not model loading)
    w0 = min(r.capture_ns for r in finals) / 1e9
    w1 = max(r.publish_ns for r in finals) / 1e9
    inside = [s for s in samples if w0 <= s["ts"] <= w1] or samples[-1:]
    first, last = inside[0], inside[-1]
    dt = (last["ts"] - first["ts"]) or 1.0
    cpu = {}
    for name in ("edge", "cloud"):
        if name in last and name in first:
            cpu[name] = rnd((last[name]["cpu_s"] - first[name]["cpu_s"]) / dt, 3)
    dev_cpu = [(last[k]["cpu_s"] - first[k]["cpu_s"]) / dt for k in last if k.startswith("device") and k in first]
    cpu["devices_total"] = rnd(sum(dev_cpu), 3)
    busy = {}
    for tier in ("edge", "cloud"):
        m = metrics.get(tier, {})
        for sid, st in (m.get("steps") or {}).items():
            if st.get("busy_s"):
                busy[f"{tier}.{sid}"] = rnd(st["busy_s"] / max(w1 - w0, 1e-3), 3)
    drops: dict[str, int] = {}
    for m in metrics.values():
        for k, v in (m.get("drops") or {}).items():
            drops[k] = drops.get(k, 0) + int(v)
    edge_c = metrics.get("edge", {}).get("counters", {})
    return {
        "ok": end == "clean" and not failed, "end_of_stream": end, "n": n, "streams_seen": len(streams), "captions": len(finals), "window_s": rnd(span, 1),
        "offered_keyframes_per_s": rnd(offered * n, 3),
        "captions_per_s": rnd(len(in_win) / span, 3) if span > 0 else None,
        "per_stream_captions_per_s": {s: rnd(v, 3) for s, v in per_stream.items()},
        "fairness_spread": rnd(spread, 3),
        "latency_ms_median": rnd(median(lat), 1), "latency_ms_p95": rnd(pct(lat, 95), 1),
        "draft_latency_ms_median": rnd(median(dlat), 1), "draft_latency_ms_p95": rnd(pct(dlat, 95), 1),
        "cpu_cores": cpu, "busy_fraction": busy, "drops": drops,
        "edge_caption_service_s": rnd(metrics.get("edge", {}).get("steps", {}).get("caption", {}).get("busy_s", 0)
                                      / max(1, edge_c.get("caption.in", 0)), 4),
        "rss_mb": {k: v["rss_mb"] for k, v in last.items() if isinstance(v, dict) and not k.startswith("device")},
        "wall_s": rnd(wall, 1),
    }


def bottleneck(r: dict[str, Any]) -> str:
    """Name the busiest resource of one run: a step near 100% busy, or the 2 CPUs."""
    busy = r.get("busy_fraction", {})
    top = max(busy.items(), key=lambda kv: kv[1], default=("-", 0.0))
    total_cpu = sum(v for v in r.get("cpu_cores", {}).values() if v)
    if top[1] >= 0.85:
        return f"{top[0]} busy {100 * top[1]:.0f}%"
    if total_cpu >= 1.7:
        return f"CPU ({total_cpu:.2f} of 2 cores)"
    return f"none (busiest {top[0]} {100 * top[1]:.0f}%)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--seconds", type=float, default=60.0, help="feed length per camera")
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--every", type=int, default=20, help="a key frame every N frames per camera")
    ap.add_argument("--codec")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    codec, why = pick_codec(args.codec)
    say(f"streams: {machine_note()}")
    runs: dict[str, Any] = {}
    for n in args.streams:
        r = run_n(n, args.seconds, args.fps, args.every, codec)
        r["bottleneck"] = bottleneck(r) if r.get("captions") else "run failed"
        runs[str(n)] = r
        say(json.dumps({k: v for k, v in r.items() if k not in ("per_stream_captions_per_s",)}))
    figures: dict[str, Any] = {}
    base = runs.get("1", {}).get("captions_per_s")
    first_bottleneck = None
    for n, r in runs.items():
        for k in ("captions_per_s", "fairness_spread", "latency_ms_p95", "draft_latency_ms_p95",
                  "offered_keyframes_per_s"):
            figures[f"n{n}.{k}"] = r.get(k)
        if base and r.get("captions_per_s"):
            figures[f"n{n}.scaling_vs_1"] = rnd(r["captions_per_s"] / base, 3)
        if first_bottleneck is None and r.get("captions_per_s") and r["captions_per_s"] < 0.9 * r[
                "offered_keyframes_per_s"]:
            first_bottleneck = f"N={n}: {r['bottleneck']}"
    figures["first_bottleneck"] = first_bottleneck or "none up to the largest N"
    if args.no_write:
        print(json.dumps(figures, indent=1))
        return 0
    write_results("streams", figures, {"runs": runs, "codec": codec, "codec_source": why, "machine": machine_note(),
                                       "command": "nice -n 10 .venv/bin/python bench/streams.py "
                                       + " ".join(sys.argv[1:])}, markdown(runs, figures, args, codec))
    update_results_md()
    print(json.dumps(figures, indent=1))
    return 0


def markdown(runs: dict[str, Any], figures: dict[str, Any], args: Any, codec: str) -> str:
    out = ["## Many streams (bench/streams.py)", "",
           f"`nice -n 10 .venv/bin/python bench/streams.py` — N device processes (320x180 live feeds at "
           f"{args.fps:g} fps, a key frame every {args.every} frames each), one edge (no cross-stream batching), "
           f"one cloud, direct TCP, codec `{codec}`, {machine_note()}.", ""]
    rows = []
    for n, r in runs.items():
        if not r.get("captions"):
            rows.append((n, "failed") + ("-",) * 7)
            continue
        rows.append((n, r["offered_keyframes_per_s"], r["captions_per_s"], r["fairness_spread"],
                     r["latency_ms_p95"], r["draft_latency_ms_p95"], json.dumps(r["cpu_cores"]),
                     json.dumps(r["drops"]) if r["drops"] else "none", r["bottleneck"]))
    out.append(md_table(["N", "offered kf/s", "captions/s", "fairness spread", "lat p95 ms", "draft p95 ms",
                         "CPU cores used", "drops", "busiest"], rows))
    out.append("")
    out.append(f"First bottleneck: {figures['first_bottleneck']}.")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
