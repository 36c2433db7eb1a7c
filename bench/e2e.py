"""AI Flow against cloud-only (and on-device, device-edge) end to end, on emulated links.

    nice -n 10 .venv/bin/python bench/e2e.py            # full grid (~45 min on 2 cores)
    nice -n 10 .venv/bin/python bench/e2e.py --quick    # 1 Mbit/s uplink, 20/50/100 ms backhaul RTT

Real tier processes (``aiflow tier``) of ``bench/graphs/scheme.py``, real ZeroMQ links, and real
bytes through ``aiflow_stream.transport.emulator`` relays, each its own process:

* device uplink: 0.25 / 1 / 5 / 20 Mbit/s, 10 ms one way (both directions);
* edge-cloud backhaul: 100 Mbit/s, 20 / 50 / 100 ms round trip.

cloud-only crosses the uplink and then the backhaul (two relays in series); AI Flow crosses the
uplink to the edge, and the edge's verifier RPC crosses the backhaul; device-edge only the
uplink; on-device nothing.

Two phases, every scheme on the same held-out synthetic feed (same seed, same frames):

1. latency grid: a live camera (``live=1``, 10 fps, scenes of 2-6 s) with a key-frame selector
   that keys only on scene changes (``max_gap`` huge), so every scheme captions the same key
   frames (one per scene; the run checks it by comparing ground truths); ``max_staleness`` is
   raised to 60 s so no scheme's late key frame is dropped (at 0.25 Mbit/s a cloud-only JPEG
   takes 2.3 s to cross). Latency = capture -> publish of each key frame's caption (for AI
   Flow: the edge draft, revision 0, and the cloud-verified one, revision 1); the first key
   frame of each run is warm-up and left out of latency.
2. throughput + quality at the target setting (1 Mbit/s, 50 ms): a block source (``live=0``,
   never drops) with short scenes, so key frames queue up and each scheme runs flat out;
   captions/s, exact match, BLEU-4, CIDEr against the ground truth over ~``--quality-keys``
   key frames, identical for every scheme (checked).

Writes ``bench/results/e2e.json`` / ``e2e.md``, ``bench/plots/e2e_latency.png`` and
``e2e_quality.png``, and refreshes ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    RESULTS,
    ROOT,
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
    quality,
    rnd,
    say,
    update_results_md,
    workdir,
    write_results,
)

SCHEMES = ("cloud_only", "on_device", "device_edge", "aiflow")
UPLINKS = (0.25, 1.0, 5.0, 20.0)  # Mbit/s
UP_DELAY_MS = 10.0
RTTS = (20.0, 50.0, 100.0)  # ms
BACKHAUL_MBIT = 100.0
TARGET = (1.0, 50.0)
PLOTS = ROOT / "bench" / "plots"


def pick_codec(explicit: str | None) -> tuple[str, str]:
    """The feature codec: ``--codec``, else the best one bench/results/codec.json reports, else fp16."""
    if explicit:
        return explicit, "--codec"
    path = RESULTS / "codec.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return "fp16", "default (no bench/results/codec.json)"
    figs = data.get("figures", {})
    for key in ("smallest_spec_within_1pt", "best", "best_codec", "recommended", "best_spec"):
        for d in (data, figs):
            if isinstance(d.get(key), str):
                return d[key], f"codec.json {key}"
    return "fp16", "default (codec.json names no best setting)"


def run_cell(scheme: str, uplink: Link | None, backhaul: Link | None, source: str, env: dict[str, str],
             timeout: float, tag: str) -> dict[str, Any]:
    """Run one scheme to end of stream through the given links; raw records and counters."""
    wd = workdir(f"e2e-{tag}")
    cl = Cluster(wd, env=dict(env, AIFLOW_BENCH_SCHEME=scheme))
    col = Collector(cl.publish)
    try:
        launch(cl, SCHEME_GRAPH, scheme, [(None, source)], uplink, backhaul)
        rss = RssSampler(cl.pids(), every=5.0).start()
        end = cl.wait(timeout)
        cpu = rss.sample()
        rss.stop()
        failed = cl.failed()
        if end != "clean" or failed:
            say(f"  {tag}: end of stream {end}, failed {failed}")
        if end == "timeout" or failed:
            for n in cl.procs:
                say(f"  --- {n} log tail ---\n{cl.log_tail(n)}")
    finally:
        emu = cl.close()
        records = col.close()
    metrics = {n: p.metrics() for n, p in cl.procs.items()}
    return {"records": records, "emu": emu, "metrics": metrics, "ok": end == "clean" and not failed, "end": end, "cpu": cpu,
            "workdir": str(wd)}


def resolve(spec: str) -> str:
    """A preset name (``compact``) as the chain it stands for now: presets change, specs do not."""
    from aiflow_stream.codecs import PRESETS

    return str(PRESETS.get(spec, spec))


def merge_old_grid(old: dict[str, Any], codec: str) -> dict[str, Any]:
    """Cells of an earlier e2e.json, AI Flow cells run with another feature codec renamed
    ``aiflow[CODEC]@...`` (cells without a recorded codec used the file's ``codec``; the old
    ``compact`` preset is named by the chain it was then, read off its bytes per caption)."""
    out: dict[str, Any] = {}
    for key, cell in old.get("grid", {}).items():
        name, _, rest = key.partition("@")
        base, vcodec = split_variant(name)
        used = cell.get("codec") or (vcodec if vcodec else old.get("codec"))
        if used == "compact" and "codec" not in cell and (cell.get("uplink_bytes_per_caption") or 0) > 3500:
            used = "topk:48:by=dev|int4|rans"
        cell = dict(cell, codec=used if base in ("aiflow", "device_edge") else None)
        if base == "aiflow" and used != resolve(codec):
            key = f"aiflow[{used}]@{rest}"
        elif base == "device_edge" and used != resolve(codec):
            continue  # superseded: device-edge runs with the main codec only
        out[key] = cell
    return out


def cell_order(key: str) -> tuple[float, float, int, str]:
    """Grid rows by uplink, then RTT, then scheme (cloud-only first)."""
    name, _, rest = key.partition("@")
    up = float(rest.split("mbps")[0]) if "mbps" in rest else 0.0
    rtt = float(rest.split("_")[1][:-2]) if "_" in rest else 0.0
    order = {"on_device": 0, "cloud_only": 1, "device_edge": 2, "aiflow": 3}
    return up, rtt, order.get(split_variant(name)[0], 9), name


def score_common(qual: dict[str, Any]) -> None:
    """Score every scheme on the key frames all of them captioned (a link that loses its last
    messages at shutdown costs a scheme its tail, not its score). Block sources are
    deterministic, so runs of different invocations share sequence numbers."""
    have = {k: v for k, v in qual.items() if v.get("captions_by_seq")}
    if not have:
        return
    common = sorted(set.intersection(*(set(v["captions_by_seq"]) for v in have.values())), key=int)
    for q in have.values():
        caps = [q["captions_by_seq"][k] for k in common]
        q.setdefault("quality_all", q["quality"])
        q["quality"] = quality([c[0] for c in caps], [c[1] or "" for c in caps])
        q["truths"] = [c[1] for c in caps]
        if q.get("drafts_by_seq"):
            d = [q["drafts_by_seq"][k] for k in common if k in q["drafts_by_seq"]]
            q["draft_quality"] = quality([c[0] for c in d], [c[1] or "" for c in d])


def summarize(scheme: str, raw: dict[str, Any], warmup: int) -> dict[str, Any]:
    recs = raw["records"]
    finals = sorted((r for r in recs if r.final), key=lambda r: r.seq)
    drafts = sorted((r for r in recs if not r.final and r.revision == 0), key=lambda r: r.seq)
    skip = {r.seq for r in finals[:warmup]}
    lat = [r.latency for r in finals if r.seq not in skip]
    dlat = [r.latency for r in drafts if r.seq not in skip]
    n = len(finals)
    emu = raw["emu"]
    up = emu.get("uplink", {}).get("up", {})
    bk = emu.get("backhaul", {})
    if scheme == "aiflow":
        passes = [float(r.stats.get("target_passes", math.nan)) for r in finals]
    elif scheme == "cloud_only":
        passes = [len(r.text.split()) + 1.0 for r in finals]  # word-level tokens + EOS, one pass each
    else:
        passes = [0.0 for _ in finals]
    span_s = (max(r.publish_ns for r in finals) - min(r.capture_ns for r in finals)) / 1e9 if finals else math.nan
    out = {
        "captions": n,
        "drafts": len(drafts),
        "latency_ms_median": rnd(median(lat), 1),
        "latency_ms_p95": rnd(pct(lat, 95), 1),
        "draft_latency_ms_median": rnd(median(dlat), 1) if dlat else None,
        "draft_latency_ms_p95": rnd(pct(dlat, 95), 1) if dlat else None,
        "uplink_bytes_per_caption": rnd(up.get("bytes_in", 0) / n, 0) if n and up else (0 if n else None),
        "uplink_down_bytes_per_caption": rnd(emu.get("uplink", {}).get("down", {}).get("bytes_in", 0) / n, 0)
        if n and up else None,
        "backhaul_bytes_per_caption": rnd((bk.get("up", {}).get("bytes_in", 0) + bk.get("down", {}).get("bytes_in", 0))
                                          / n, 0) if n and bk else None,
        "cloud_passes_per_caption": rnd(sum(passes) / len(passes), 2) if passes else None,
        "captions_per_s": rnd(n / span_s, 3) if n > 1 else None,
        "quality": quality([r.text for r in finals], [r.truth or "" for r in finals]),
        "draft_quality": quality([r.text for r in drafts], [r.truth or "" for r in drafts]) if drafts else None,
        "truths": [r.truth for r in finals],
        "ok": raw["ok"],
        "end_of_stream": raw["end"],
        "cpu": raw["cpu"],
    }
    drops: dict[str, int] = {}
    for m in raw["metrics"].values():
        for k, v in (m.get("drops") or {}).items():
            drops[k] = drops.get(k, 0) + int(v)
    out["drops"] = drops
    out["stages_ms"] = stage_medians([r for r in finals if r.seq not in skip])
    if drafts:
        out["draft_stages_ms"] = stage_medians([r for r in drafts if r.seq not in skip])
    return out


def stage_medians(recs: list[Any]) -> dict[str, float | None]:
    """Median milliseconds from the previous stamp to each stage (``latency_ms`` of the records)."""
    keys: list[str] = []
    for r in recs:
        keys += [k for k in r.latency_ms if k not in keys]
    return {k: rnd(median([r.latency_ms[k] for r in recs if k in r.latency_ms]), 1) for k in keys}


def cells(quick: bool, variants: list[str]) -> list[tuple[str, float | None, float | None]]:
    """(scheme, uplink Mbit/s, backhaul RTT ms); on-device needs no link, device-edge no backhaul.
    ``aiflow[CODEC]`` variants run at every uplink with the target RTT."""
    ups = (TARGET[0],) if quick else UPLINKS
    out: list[tuple[str, float | None, float | None]] = [("on_device", None, None)]
    for u in ups:
        out.append(("device_edge", u, None))
        for rtt in RTTS:
            out.append(("cloud_only", u, rtt))
            out.append(("aiflow", u, rtt))
        out += [(f"aiflow[{v}]", u, TARGET[1]) for v in variants]
    return out


def split_variant(name: str) -> tuple[str, str | None]:
    """``aiflow[compact]`` -> ("aiflow", "compact")."""
    if name.endswith("]") and "[" in name:
        base, _, codec = name[:-1].partition("[")
        return base, codec
    return name, None


def key_of(scheme: str, up: float | None, rtt: float | None) -> str:
    s = scheme
    if up is not None:
        s += f"@{up:g}mbps"
    if rtt is not None:
        s += f"_{rtt:g}ms"
    return s


def lookup(grid: dict[str, Any], scheme: str, up: float, rtt: float) -> dict[str, Any] | None:
    for k in (key_of(scheme, up, rtt), key_of(scheme, up, None), key_of(scheme, None, None)):
        if k in grid:
            return grid[k]
    return None


def plot(grid: dict[str, Any], qual: dict[str, Any], rtt: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [("cloud_only", "latency_ms", "cloud-only"), ("on_device", "latency_ms", "on-device"),
              ("device_edge", "latency_ms", "device-edge"), ("aiflow", "draft_latency_ms", "AI Flow (edge draft)"),
              ("aiflow", "latency_ms", "AI Flow (cloud-verified)")]
    for v in sorted({k.split("@")[0] for k in grid if k.startswith("aiflow[")}):
        series += [(v, "draft_latency_ms", f"AI Flow {v[6:]} (edge draft)"),
                   (v, "latency_ms", f"AI Flow {v[6:]} (cloud-verified)")]
    for scheme, field, label in series:
        xs, med, p95 = [], [], []
        for u in UPLINKS:
            c = lookup(grid, scheme, u, rtt)
            if c and c.get(f"{field}_median") is not None:
                xs.append(u)
                med.append(c[f"{field}_median"])
                p95.append(c[f"{field}_p95"])
        if xs:
            line = ax.plot(xs, med, marker="o", label=label, ls="--" if "[" in scheme else "-")[0]
            ax.plot(xs, p95, ls=":", color=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(UPLINKS, [f"{u:g}" for u in UPLINKS])
    ax.set_xlabel("device uplink (Mbit/s), 10 ms one way")
    ax.set_ylabel("capture -> publish latency (ms)")
    ax.set_title(f"Caption latency, backhaul 100 Mbit/s {rtt:g} ms RTT (markers median, dotted p95)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p1 = PLOTS / "e2e_latency.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    bars = [(n, q["quality"]) for n, q in qual.items()]
    if qual.get("aiflow", {}).get("draft_quality"):
        bars.append(("aiflow\n(edge draft)", qual["aiflow"]["draft_quality"]))
    colors = {"cloud_only": "#777", "on_device": "#c84", "device_edge": "#48c", "aiflow": "#2a2"}
    for ax, metric in zip(axes, ("exact", "bleu4", "cider"), strict=True):
        vals = [q[metric] for _, q in bars]
        ax.bar(range(len(bars)), vals, color=[colors.get(n, "#8c8") for n, _ in bars])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(bars)), [n.replace("_", "\n") for n, _ in bars], fontsize=7)
        ax.set_title(metric)
    fig.suptitle("Caption quality vs ground truth (held-out scenes, same key frames)")
    fig.tight_layout()
    p2 = PLOTS / "e2e_quality.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [str(p1.relative_to(ROOT)), str(p2.relative_to(ROOT))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the 1 Mbit/s uplink (all three RTTs)")
    ap.add_argument("--seconds", type=float, default=64.0, help="live feed length per cell (~1 key frame / 4 s)")
    ap.add_argument("--fps", type=float, default=10.0, help="live camera rate for the latency grid")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--quality-keys", type=int, default=120, help="key frames in the quality phase")
    ap.add_argument("--codec", help="feature codec spec (default: best in bench/results/codec.json, else fp16)")
    ap.add_argument("--variant", nargs="*", default=None,
                    help="extra AI Flow runs with these feature codecs (default: compact when the codec is fp16)")
    ap.add_argument("--only", nargs="*", help="run only these cells, e.g. aiflow@1mbps_50ms")
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=SCHEMES)
    ap.add_argument("--skip-grid", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--grid-variant", nargs="*", default=None, help="codec variants in the grid (default: --variant)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the cells and quality runs of bench/results/e2e.json that this run does not redo")
    ap.add_argument("--drop-cells", nargs="*", default=[], help="on merge, drop cells whose key contains these")
    ap.add_argument("--quality-schemes", nargs="*", choices=SCHEMES,
                    help="schemes of the quality phase (default: --schemes)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    codec, codec_why = pick_codec(args.codec)
    if args.variant is None:
        args.variant = ["compact"] if codec == "fp16" else []
    say(f"e2e: feature codec {codec} ({codec_why}); {machine_note()}")
    frames = int(args.seconds * args.fps)
    live_src = f"synthetic://?seed={args.seed}&fps={args.fps:g}&live=1&frames={frames}"
    env = {"AIFLOW_BENCH_CODEC": codec, "AIFLOW_BENCH_KEYFRAME": json.dumps({"max_gap": 10**6}),
           "AIFLOW_BENCH_STALENESS": "60"}
    grid: dict[str, Any] = {}
    if not args.skip_grid:
        for name, up, rtt in cells(args.quick, args.variant if args.grid_variant is None else args.grid_variant):
            key = key_of(name, up, rtt)
            scheme, vcodec = split_variant(name)
            if (args.only and key not in args.only) or scheme not in args.schemes:
                continue
            say(f"e2e grid: {key} ...")
            raw = run_cell(scheme, Link(up, UP_DELAY_MS) if up else None,
                           Link(BACKHAUL_MBIT, rtt / 2) if rtt else None, live_src,
                           dict(env, AIFLOW_BENCH_CODEC=vcodec or codec), timeout=args.seconds + 120, tag=key)
            grid[key] = summarize(scheme, raw, warmup=1)
            grid[key]["codec"] = resolve(vcodec or codec) if scheme in ("aiflow", "device_edge") else None
            grid[key]["run_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            c = grid[key]
            say(f"  {c['captions']} captions, latency median {c['latency_ms_median']} p95 {c['latency_ms_p95']} ms"
                f" (draft {c['draft_latency_ms_median']}), up {c['uplink_bytes_per_caption']} B/caption, "
                f"exact {c['quality']['exact']}, drops {c['drops']}")
            say(f"  stages {c['stages_ms']} draft stages {c.get('draft_stages_ms')}")

    qual: dict[str, Any] = {}
    if not args.skip_quality:
        n_frames = int(args.quality_keys * 9)  # scenes of 6..12 frames at 30 fps
        block_src = (f"synthetic://?seed={args.seed + 1000}&fps=30&live=0&frames={n_frames}"
                     f"&min_scene_s=0.2&max_scene_s=0.4")
        qs = args.quality_schemes or args.schemes
        names = list(qs) + ([f"aiflow[{v}]" for v in args.variant] if "aiflow" in qs else [])
        for scheme in names:
            base, vcodec = split_variant(scheme)
            say(f"e2e quality/throughput: {scheme} at 1 Mbit/s + 50 ms ...")
            raw = run_cell(base, Link(TARGET[0], UP_DELAY_MS), Link(BACKHAUL_MBIT, TARGET[1] / 2), block_src,
                           dict(env, AIFLOW_BENCH_CODEC=vcodec or codec), timeout=900, tag=f"q-{base}-{vcodec}")
            s = summarize(base, raw, warmup=1)
            finals = sorted((r for r in raw["records"] if r.final), key=lambda r: r.seq)
            pub = sorted(r.publish_ns for r in finals)
            s["captions_per_s"] = rnd((len(pub) - 1) / ((pub[-1] - pub[0]) / 1e9), 3) if len(pub) > 2 else None
            s["codec"] = resolve(vcodec or codec) if base in ("aiflow", "device_edge") else None
            s["captions_by_seq"] = {str(r.seq): [r.text, r.truth] for r in finals}
            if base == "aiflow":
                s["drafts_by_seq"] = {str(r.seq): [r.text, r.truth] for r in raw["records"]
                                      if not r.final and r.revision == 0}
            qual[scheme] = s
            say(f"  {s['captions']} captions, {s['captions_per_s']} captions/s, quality {s['quality']}, "
                f"end of stream {s['end_of_stream']}")
        score_common(qual)
    figures = compute_figures(grid, qual)
    if args.no_write:
        print(json.dumps(figures, indent=1))
        return 0
    old = {}
    try:
        old = json.loads((RESULTS / "e2e.json").read_text())
    except (OSError, ValueError):
        pass
    if args.merge or args.only or args.skip_grid:
        grid = {**merge_old_grid(old, codec), **grid}
        grid = {k: v for k, v in grid.items() if not any(d in k for d in args.drop_cells)}
    if args.merge and not args.skip_quality:
        qual = {**{k: v for k, v in old.get("quality_phase", {}).items() if "captions_by_seq" in v}, **qual}
        score_common(qual)
    if args.skip_quality:
        qual = old.get("quality_phase", {})
    commands = ["nice -n 10 .venv/bin/python bench/e2e.py " + shlex.join(sys.argv[1:] if argv is None else argv)]
    if args.merge or args.only or args.skip_grid or args.skip_quality:
        commands = list(old.get("commands") or [old.get("command", "nice -n 10 .venv/bin/python bench/e2e.py")]) \
            + commands
    figures = compute_figures(grid, qual)
    plots = plot(grid, qual, TARGET[1]) if grid and qual else []
    md = markdown(figures, grid, qual, codec, codec_why, commands, plots)
    write_results("e2e", figures, {"grid": grid, "quality_phase": qual, "codec": codec, "codec_source": codec_why,
                                   "plots": plots, "machine": machine_note(),
                                   "commands": commands}, md)
    update_results_md()
    print(json.dumps(figures, indent=1))
    return 0


def compute_figures(grid: dict[str, Any], qual: dict[str, Any]) -> dict[str, Any]:
    figs: dict[str, Any] = {}
    up, rtt = TARGET

    def ratio(x: Any, y: Any) -> float | None:
        return rnd(x / y, 4) if x is not None and y else None

    names = sorted({k.split("@")[0] for k in grid} | set(qual))
    for name in [n for n in names if n.startswith("aiflow")]:
        sfx = "" if name == "aiflow" else name[len("aiflow"):]
        a, c = lookup(grid, name, up, rtt), lookup(grid, "cloud_only", up, rtt)
        if a and c:
            figs[f"latency_ratio_1mbps_50ms{sfx}"] = ratio(a["latency_ms_median"], c["latency_ms_median"])
            figs[f"draft_latency_ratio_1mbps_50ms{sfx}"] = ratio(a["draft_latency_ms_median"], c["latency_ms_median"])
            figs[f"latency_p95_ratio_1mbps_50ms{sfx}"] = ratio(a["latency_ms_p95"], c["latency_ms_p95"])
            figs[f"bytes_ratio_1mbps_50ms{sfx}"] = ratio(a["uplink_bytes_per_caption"], c["uplink_bytes_per_caption"])
            figs[f"cloud_passes_ratio_1mbps_50ms{sfx}"] = ratio(a["cloud_passes_per_caption"],
                                                                c["cloud_passes_per_caption"])
        if name in qual and "cloud_only" in qual:
            qa, qc = qual[name]["quality"], qual["cloud_only"]["quality"]
            for m in ("exact", "bleu4", "cider"):
                figs[f"{m}_ratio_1mbps_50ms{sfx}"] = ratio(qa[m], qc[m])
            three = [figs[f"{m}_ratio_1mbps_50ms{sfx}"] for m in ("exact", "bleu4", "cider")]
            # the most conservative of the three scores
            figs[f"quality_ratio_1mbps_50ms{sfx}"] = min(three) if all(v is not None for v in three) else None
            figs[f"captions_per_s_ratio_1mbps_50ms{sfx}"] = ratio(qual[name]["captions_per_s"],
                                                                  qual["cloud_only"]["captions_per_s"])
    if qual:
        truths = {s: q["truths"] for s, q in qual.items()}
        figs["quality_same_keyframes"] = len({json.dumps(t) for t in truths.values()}) == 1
    for s, q in qual.items():
        figs[f"{s}.captions_per_s"] = q["captions_per_s"]
        for m, v in q["quality"].items():
            figs[f"{s}.{m}"] = v
    keysets = {}
    for k, g in grid.items():
        figs[f"{k}.latency_ms_median"] = g["latency_ms_median"]
        figs[f"{k}.latency_ms_p95"] = g["latency_ms_p95"]
        if g.get("draft_latency_ms_median") is not None:
            figs[f"{k}.draft_latency_ms_median"] = g["draft_latency_ms_median"]
            figs[f"{k}.draft_latency_ms_p95"] = g["draft_latency_ms_p95"]
        figs[f"{k}.uplink_bytes_per_caption"] = g["uplink_bytes_per_caption"]
        figs[f"{k}.cloud_passes_per_caption"] = g["cloud_passes_per_caption"]
        figs[f"{k}.captions_per_s"] = g["captions_per_s"]
        figs[f"{k}.exact"] = g["quality"]["exact"]
        keysets[k] = g["truths"]
    if keysets:
        # same key frames everywhere, up to a tail lost when a slow link closed (see end_of_stream)
        longest = max(keysets.values(), key=len)
        figs["grid_same_keyframes"] = all(t == longest[: len(t)] for t in keysets.values())
        figs["grid_keyframes"] = len(longest)
        figs["grid_cells_short"] = sorted(k for k, t in keysets.items() if len(t) < len(longest))
    return figs


def markdown(figs: dict[str, Any], grid: dict[str, Any], qual: dict[str, Any], codec: str, codec_why: str,
             commands: list[str],
             plots: list[str]) -> str:
    cmds = " then ".join(f"`{c.strip()}`" for c in commands)
    out = ["## End to end: AI Flow vs cloud-only (bench/e2e.py)", "",
           f"{cmds} ({machine_note()}). AI Flow and device-edge send features coded with `{codec}` ({codec_why}); "
           f"`aiflow[CODEC]` rows use another "
           f"feature codec. cloud-only sends JPEG q75 of the 1280x720 key frame to the target model. Each grid "
           f"row's run time is in e2e.json (`run_at`).", ""]
    t = ("latency_ratio_1mbps_50ms", "draft_latency_ratio_1mbps_50ms", "quality_ratio_1mbps_50ms",
         "bytes_ratio_1mbps_50ms", "cloud_passes_ratio_1mbps_50ms", "captions_per_s_ratio_1mbps_50ms")
    goals = {"latency_ratio_1mbps_50ms": "<= 0.33", "quality_ratio_1mbps_50ms": ">= 0.98",
             "bytes_ratio_1mbps_50ms": "<= 0.10"}
    out.append("At the target setting (1 Mbit/s uplink, 50 ms backhaul RTT), AI Flow over cloud-only:")
    out.append("")
    rows = [(k, figs.get(k), goals.get(k, "")) for k in t]
    for k in sorted(figs):
        if "_1mbps_50ms[" in k and any(k.startswith(x) for x in t):
            rows.append((k, figs[k], goals.get(k.split("[")[0], "")))
    out.append(md_table(["figure", "ratio", "target"], rows))
    out.append("")
    if grid:
        rows = []
        for k, g in sorted(grid.items(), key=lambda kv: cell_order(kv[0])):
            rows.append((k, g["captions"], g["latency_ms_median"], g["latency_ms_p95"], g.get("draft_latency_ms_median"),
                         g.get("draft_latency_ms_p95"), g["uplink_bytes_per_caption"], g["cloud_passes_per_caption"],
                         g["quality"]["exact"], g["quality"]["cider"]))
        out.append("Latency grid (live 10 fps feed, one key frame per scene, same key frames in every cell: "
                   f"{figs.get('grid_same_keyframes')}):")
        out.append("")
        out.append(md_table(["cell", "captions", "lat med ms", "lat p95 ms", "draft med ms", "draft p95 ms",
                             "uplink B/caption", "cloud passes/caption", "exact", "CIDEr"], rows))
        out.append("")
    if qual:
        rows = [(s, q["captions"], q["captions_per_s"], q["quality"]["exact"], q["quality"]["bleu4"],
                 q["quality"]["cider"], q["uplink_bytes_per_caption"]) for s, q in qual.items()]
        if qual.get("aiflow", {}).get("draft_quality"):
            d = qual["aiflow"]["draft_quality"]
            rows.append(("aiflow (edge draft, revision 0)", d["n"], None, d["exact"], d["bleu4"], d["cider"], None))
        out.append("Throughput and quality at 1 Mbit/s + 50 ms (block source, flat out, same key frames: "
                   f"{figs.get('quality_same_keyframes')}):")
        out.append("")
        out.append(md_table(["scheme", "captions", "captions/s", "exact", "BLEU-4", "CIDEr", "uplink B/caption"], rows))
        out.append("")
    for p in plots:
        out.append(f"![{Path(p).stem}]({Path(p).relative_to('bench') if p.startswith('bench') else p})")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
