"""Many cameras at once: N device processes, one edge, one cloud (AI Flow graph).

    nice -n 10 .venv/bin/python bench/streams.py                      # N = 1 2 4 8 16
    nice -n 10 .venv/bin/python bench/streams.py --streams 1 4 --seconds 40

Each camera is its own device process (``aiflow tier device --stream camK --source
synthetic://?seed=K...``); the edge runs with ``--expect-peers N`` and drafts for every stream,
the cloud verifies over an emulated 100 Mbit/s backhaul (``--rtt-ms``, default 50 ms round
trip); the cameras reach the edge over direct TCP (cameras on the edge's site). Every camera offers the same constant load, a key frame every
``--every`` frames of a live ``--fps`` feed; frames are 320x180 (the captioner sees 112x64
anyway) so that 16 simulated cameras do not eat the 2 cores the edge and cloud need.

Per N: total captions/s, per-stream captions/s and the spread (max |rate/mean - 1|, fairness
target +-20%), latency p50/p95 of the cloud-verified caption (and of the edge draft), drops by
reason, and each process's CPU use and each edge/cloud step's busy fraction, which name the
first bottleneck. Each N runs once per ``--batch`` size (default 1 and 8): with batch > 1 the
edge's caption step takes every queued key frame (up to the batch) at once, decodes their
drafts in one batched pass and sends their verify rounds together. Writes
``bench/results/streams.json`` / ``streams.md``.
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
    Link,
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
from bench.e2e import BACKHAUL_MBIT, pick_codec  # noqa: E402


def run_n(n: int, seconds: float, warm: float, fps: float, every: int, codec: str, rtt_ms: float,
          batch: int = 1) -> dict[str, Any]:
    devices = [(f"cam{k}", f"synthetic://?seed={100 + k}&fps={fps:g}&live=1&width=320&height=180")
               for k in range(n)]
    env = {"AIFLOW_BENCH_SCHEME": "aiflow", "AIFLOW_BENCH_CODEC": codec,
           "AIFLOW_BENCH_KEYFRAME": json.dumps({"every": every}), "AIFLOW_BENCH_BATCH": str(batch)}
    wd = workdir(f"streams-{n}-b{batch}")
    cl = Cluster(wd, env=env)
    col = Collector(cl.publish)
    say(f"streams: N={n}, edge batch {batch}, {seconds:g} s measured, {fps / every:.2f} key frames/s per camera")
    t_launch = time.monotonic()
    snap: dict[str, dict[str, Any]] = {}
    failed: dict[str, int] = {}
    try:
        launch(cl, SCHEME_GRAPH, "aiflow", devices, backhaul=Link(BACKHAUL_MBIT, rtt_ms / 2) if rtt_ms else None)
        names = [k for k in cl.procs if k.startswith("device")]
        # Cameras are endless live feeds that start as their process is set up; measure only
        # once every one of them streams, then stop them all.
        cl.wait_ready(names, timeout=120 + 15 * n)
        time.sleep(warm)
        rss = RssSampler(cl.pids(), every=5.0).start()
        lo = time.time_ns()
        snap["lo"] = {k: cl.procs[k].metrics() for k in ("edge", "cloud")}
        time.sleep(seconds)
        hi = time.time_ns()
        samples = rss.stop()
        time.sleep(4.0)  # key frames captured before hi get their captions (or are dropped)
        failed = cl.failed()
        if failed:
            say(f"  N={n}: failed {failed}")
            for name in list(cl.procs)[:3]:
                say(f"  --- {name} log tail ---\n{cl.log_tail(name)}")
    finally:
        cl.close()
        time.sleep(1.0)
        records = col.close()
    snap["hi"] = {k: cl.procs[k].metrics() for k in ("edge", "cloud")}
    wall = time.monotonic() - t_launch
    r = analyse(n, records, samples, snap, lo, hi, fps / every, bool(failed), wall)
    r["batch"] = batch
    return r


def analyse(n: int, records: list[Any], samples: list[dict[str, Any]], snap: dict[str, Any], lo: int, hi: int,
            offered: float, failed: bool, wall: float) -> dict[str, Any]:
    """Figures over the captions of key frames captured in [lo, hi] (every camera streaming)."""
    span = (hi - lo) / 1e9
    finals = [r for r in records if r.final and lo <= r.capture_ns <= hi]
    drafts = [r for r in records if not r.final and lo <= r.capture_ns <= hi]
    streams = [f"cam{k}" for k in range(n)]
    if not finals:
        return {"ok": False, "n": n, "captions": 0}
    per_stream = {s: sum(1 for r in finals if r.stream == s) / span for s in streams}
    rates = list(per_stream.values())
    mean_rate = sum(rates) / len(rates)
    spread = max(abs(v / mean_rate - 1) for v in rates) if mean_rate else None
    lat = [r.latency for r in finals]
    dlat = [r.latency for r in drafts]
    first, last = samples[0], samples[-1]
    dt = (last["ts"] - first["ts"]) or 1.0
    cpu = {}
    for name in ("edge", "cloud"):
        if name in last and name in first:
            cpu[name] = rnd((last[name]["cpu_s"] - first[name]["cpu_s"]) / dt, 3)
    dev_cpu = [(last[k]["cpu_s"] - first[k]["cpu_s"]) / dt for k in last if k.startswith("device") and k in first]
    cpu["devices_total"] = rnd(sum(dev_cpu), 3)
    # busy fraction of each edge/cloud step between two metrics snapshots (the files are
    # rewritten every 10 s, so the snapshot interval is used, not the nominal window)
    busy: dict[str, float | None] = {}
    drops: dict[str, int] = {}
    for tier in ("edge", "cloud"):
        a, b = snap["lo"].get(tier, {}), snap["hi"].get(tier, {})
        du = (b.get("uptime_s") or 0) - (a.get("uptime_s") or 0)
        for sid, st in (b.get("steps") or {}).items():
            db = st.get("busy_s", 0) - (a.get("steps") or {}).get(sid, {}).get("busy_s", 0)
            if du > 0 and db > 0:
                busy[f"{tier}.{sid}"] = rnd(db / du, 3)
        for k, v in (b.get("drops") or {}).items():
            drops[k] = drops.get(k, 0) + int(v) - int((a.get("drops") or {}).get(k, 0))
    ec_a = snap["lo"].get("edge", {}).get("counters", {})
    ec_b = snap["hi"].get("edge", {}).get("counters", {})
    served = ec_b.get("caption.in", 0) - ec_a.get("caption.in", 0)
    batches = ec_b.get("caption.batches", 0) - ec_a.get("caption.batches", 0)
    busy_cap = (snap["hi"].get("edge", {}).get("steps", {}).get("caption", {}).get("busy_s", 0)
                - snap["lo"].get("edge", {}).get("steps", {}).get("caption", {}).get("busy_s", 0))
    return {
        "ok": not failed, "n": n, "streams_seen": len({r.stream for r in finals}), "captions": len(finals),
        "window_s": rnd(span, 1),
        "offered_keyframes_per_s": rnd(offered * n, 3),
        "captions_per_s": rnd(len(finals) / span, 3),
        "per_stream_captions_per_s": {s: rnd(v, 3) for s, v in per_stream.items()},
        "fairness_spread": rnd(spread, 3),
        "latency_ms_median": rnd(median(lat), 1), "latency_ms_p95": rnd(pct(lat, 95), 1),
        "draft_latency_ms_median": rnd(median(dlat), 1), "draft_latency_ms_p95": rnd(pct(dlat, 95), 1),
        "cpu_cores": cpu, "busy_fraction": busy, "drops_in_window": drops,
        "edge_caption_service_s": rnd(busy_cap / served, 4) if served else None,
        "edge_batches": batches,
        "edge_mean_batch": rnd(sum((r.stats or {}).get("batch", 1) for r in finals) / len(finals), 2),
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
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8],
                    help="edge caption batch sizes to compare (1 = no batching, the baseline)")
    ap.add_argument("--seconds", type=float, default=60.0, help="measured window, once every camera streams")
    ap.add_argument("--warm", type=float, default=10.0, help="seconds after the last camera starts")
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--every", type=int, default=10, help="a key frame every N frames per camera")
    ap.add_argument("--rtt-ms", type=float, default=50.0, help="edge-cloud backhaul round trip (0: direct)")
    ap.add_argument("--codec")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    codec, why = pick_codec(args.codec)
    say(f"streams: {machine_note()}")
    runs: dict[str, Any] = {}
    for n in args.streams:  # batch sizes side by side per N, so both see the same machine state
        for b in args.batch:
            r = run_n(n, args.seconds, args.warm, args.fps, args.every, codec, args.rtt_ms, b)
            r["bottleneck"] = bottleneck(r) if r.get("captions") else "run failed"
            runs[f"b{b}.n{n}"] = r
            say(json.dumps({k: v for k, v in r.items() if k not in ("per_stream_captions_per_s",)}))
    figures = summarise(runs, args.streams, args.batch)
    if args.no_write:
        print(json.dumps(figures, indent=1))
        return 0
    write_results("streams", figures, {"runs": runs, "codec": codec, "codec_source": why, "machine": machine_note(),
                                       "command": "nice -n 10 .venv/bin/python bench/streams.py "
                                       + " ".join(sys.argv[1:])}, markdown(runs, figures, args, codec))
    update_results_md()
    print(json.dumps(figures, indent=1))
    return 0


def summarise(runs: dict[str, Any], streams: list[int], batches: list[int]) -> dict[str, Any]:
    """Per batch size and N: throughput, fairness, latency; the gain of batching over batch 1;
    the first N where captions fall below 90% of the offered key frames, and what was busiest."""
    figures: dict[str, Any] = {}
    for b in batches:
        base = runs.get(f"b{b}.n{streams[0]}", {}).get("captions_per_s")
        first = None
        for n in streams:
            r = runs.get(f"b{b}.n{n}", {})
            for k in ("captions_per_s", "fairness_spread", "latency_ms_p95", "draft_latency_ms_p95",
                      "offered_keyframes_per_s", "edge_mean_batch"):
                figures[f"b{b}.n{n}.{k}"] = r.get(k)
            if base and r.get("captions_per_s"):
                figures[f"b{b}.n{n}.scaling_vs_n{streams[0]}"] = rnd(r["captions_per_s"] / base, 3)
            if first is None and (not r.get("captions_per_s")
                                  or r["captions_per_s"] < 0.9 * r["offered_keyframes_per_s"]):
                first = f"N={n}: {r.get('bottleneck', 'run failed')}"
        figures[f"b{b}.first_bottleneck"] = first or "none up to the largest N"
    if 1 in batches:
        for b in batches:
            if b == 1:
                continue
            for n in streams:
                one, many = runs.get(f"b1.n{n}", {}), runs.get(f"b{b}.n{n}", {})
                if one.get("captions_per_s") and many.get("captions_per_s"):
                    figures[f"n{n}.batch{b}_throughput_gain"] = rnd(many["captions_per_s"] / one["captions_per_s"], 3)
                if one.get("latency_ms_p95") and many.get("latency_ms_p95"):
                    figures[f"n{n}.batch{b}_p95_ratio"] = rnd(many["latency_ms_p95"] / one["latency_ms_p95"], 3)
    return figures


def markdown(runs: dict[str, Any], figures: dict[str, Any], args: Any, codec: str) -> str:
    out = ["## Many streams (bench/streams.py)", "",
           f"`nice -n 10 .venv/bin/python bench/streams.py {' '.join(sys.argv[1:])}` — N device processes "
           f"(320x180 live feeds at {args.fps:g} fps, a key frame every {args.every} frames each), one edge whose "
           f"caption step takes up to `batch` queued key frames at once (batch 1 = no batching), one cloud behind "
           f"a 100 Mbit/s {args.rtt_ms:g} ms RTT backhaul, cameras on direct TCP, codec `{codec}`, "
           f"{machine_note()}.", ""]
    rows = []
    for key, r in runs.items():
        b, n = key.split(".")
        if not r.get("captions"):
            rows.append((n[1:], b[1:], "failed") + ("-",) * 8)
            continue
        rows.append((n[1:], b[1:], r["offered_keyframes_per_s"], r["captions_per_s"], r["fairness_spread"],
                     r["latency_ms_p95"], r["draft_latency_ms_p95"], r.get("edge_mean_batch"),
                     json.dumps(r["cpu_cores"]),
                     json.dumps(r["drops_in_window"]) if r["drops_in_window"] else "none", r["bottleneck"]))
    out.append(md_table(["N", "batch", "offered kf/s", "captions/s", "fairness spread", "lat p95 ms",
                         "draft p95 ms", "mean batch", "CPU cores used", "drops in window", "busiest"], rows))
    out.append("")
    for b in args.batch:
        out.append(f"- batch {b}: first bottleneck {figures[f'b{b}.first_bottleneck']}.")
    gains = [(k, v) for k, v in figures.items() if k.endswith("_throughput_gain")]
    if gains:
        out.append("- throughput with batching over without: "
                   + ", ".join(f"{k.split('.')[0]} {v}x" for k, v in gains) + ".")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
