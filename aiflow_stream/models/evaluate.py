"""Caption quality of the default family on held-out scenes, as a camera would see them.

    python -m aiflow_stream.models.evaluate [--n 500] [--model-dir DIR]

Scenes from the held-out split (never seen in training) are rendered at 1280x720 with the
synthetic source's camera noise, encoded once by the shared vision encoder (as the device
does), and captioned greedily by the target and the draft decoders. Prints exact match,
BLEU-4 and CIDEr-D for both and writes ``bench/results/models.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aiflow_stream.models.adapters import Captioner, load_captioner
from aiflow_stream.models.family import DEFAULT_DIR
from aiflow_stream.models.metrics import bleu4, cider_d, exact_match
from aiflow_stream.scenes import Scene, heldout_scenes, noise_bank, render

CAMERA = (1280, 720)  # (width, height) of the synthetic source
NOISE_STD = 6.0
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "models.json"


@dataclass
class Scores:
    exact: float
    bleu4: float
    cider: float

    @classmethod
    def of(cls, hyps: Sequence[str], refs: Sequence[str]) -> Scores:
        return cls(exact_match(hyps, refs), bleu4(hyps, refs), cider_d(hyps, refs))


def camera_features(
    encoder: Captioner,
    scenes: Sequence[Scene],
    *,
    size: tuple[int, int] = CAMERA,
    batch: int = 25,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Render ``scenes`` at camera resolution with camera noise and encode them, a batch at a
    time so only features (not full frames) are held."""
    bank = noise_bank(size[1], size[0], NOISE_STD)
    out = []
    for i in range(0, len(scenes), batch):
        frames = [render(s, size[0], size[1], noise_bank=bank) for s in scenes[i : i + batch]]
        out.append(encoder.encode(frames))
        if progress is not None:
            progress(len(frames))
    return np.concatenate(out)


def decode_all(captioner: Captioner, features: np.ndarray, batch: int = 50,
               progress: Callable[[int], None] | None = None) -> list[str]:
    caps: list[str] = []
    for i in range(0, len(features), batch):
        caps += captioner.decode(features[i : i + batch])
        if progress is not None:
            progress(min(batch, len(features) - i))
    return caps


def evaluate_family(
    n: int = 500,
    model_dir: str | Path | None = None,
    *,
    seed: int = 1234,
    progress: bool = False,
) -> dict[str, object]:
    """Score target and draft on ``n`` held-out scenes; returns the ``models.json`` content."""
    spec = str(model_dir) if model_dir is not None else "default"
    target = load_captioner(spec, member="target")
    draft = load_captioner(spec, member="draft")
    scenes = heldout_scenes(n, seed=seed)
    refs = [s.caption for s in scenes]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=3 * n, desc="evaluate", unit="img", file=sys.stderr)
    tick = bar.update if bar is not None else None
    t0 = time.perf_counter()
    feats = camera_features(target, scenes, progress=tick)
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    tcaps = decode_all(target, feats, progress=tick)
    t_tgt = time.perf_counter() - t0
    t0 = time.perf_counter()
    dcaps = decode_all(draft, feats, progress=tick)
    t_dr = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    ts, ds = Scores.of(tcaps, refs), Scores.of(dcaps, refs)
    agree = float(np.mean([a == b for a, b in zip(tcaps, dcaps, strict=True)]))
    return {
        "figures": {
            "target_exact": ts.exact,
            "target_bleu4": ts.bleu4,
            "target_cider": ts.cider,
            "draft_exact": ds.exact,
            "draft_bleu4": ds.bleu4,
            "draft_cider": ds.cider,
            "draft_target_agreement": agree,
        },
        "n": n,
        "seed": seed,
        "model_dir": str(Path(model_dir).resolve()) if model_dir is not None else str(DEFAULT_DIR),
        "camera": {"width": CAMERA[0], "height": CAMERA[1], "noise_std": NOISE_STD},
        "decoding": "greedy",
        "seconds": {"render_encode": t_enc, "target_decode": t_tgt, "draft_decode": t_dr},
        "examples": [
            {"truth": r, "target": t, "draft": d} for r, t, d in list(zip(refs, tcaps, dcaps, strict=True))[:8]
        ],
        "command": "python -m aiflow_stream.models.evaluate"
        + (f" --n {n}" if n != 500 else "")
        + (f" --model-dir {model_dir}" if model_dir is not None else ""),
    }


def _markdown(res: dict[str, object]) -> str:
    f = res["figures"]
    assert isinstance(f, dict)
    lines = [
        f"# Default family quality ({res['n']} held-out scenes, 1280x720 + noise, greedy)",
        "",
        f"`{res['command']}`",
        "",
        "| member | exact match | BLEU-4 | CIDEr-D |",
        "|---|---|---|---|",
    ]
    for m in ("target", "draft"):
        lines.append(f"| {m} | {f[m + '_exact']:.3f} | {f[m + '_bleu4']:.3f} | {f[m + '_cider']:.3f} |")
    lines += ["", f"draft == target caption: {f['draft_target_agreement']:.3f}", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aiflow_stream.models.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500, help="held-out scenes to score (default 500)")
    ap.add_argument("--model-dir", default=None, help="family directory with draft/ and target/ (default: shipped)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"JSON to write (default {RESULTS})")
    ap.add_argument("--seed", type=int, default=1234, help="held-out stream seed")
    args = ap.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # load reports and generate() hints are noise here
    res = evaluate_family(args.n, args.model_dir, seed=args.seed, progress=True)
    f = res["figures"]
    assert isinstance(f, dict)
    print(f"{'member':<8} {'exact':>7} {'BLEU-4':>7} {'CIDEr-D':>8}")
    for m in ("target", "draft"):
        print(f"{m:<8} {f[m + '_exact']:7.3f} {f[m + '_bleu4']:7.3f} {f[m + '_cider']:8.3f}")
    print(f"draft == target: {f['draft_target_agreement']:.3f}   (n={args.n})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(res))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
