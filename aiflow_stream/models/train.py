"""Train the default model family on the synthetic scene grammar.

    python -m aiflow_stream.models.train [--minutes 55] [--out aiflow_stream/models/default]

Seeded and resumable: a checkpoint (weights, optimiser, step) is written to ``--ckpt`` every
``--save-every`` steps and picked up on the next start; the batch of step ``k`` depends only on
``--seed`` and ``k``, so a resumed run sees the data an uninterrupted one would. The encoder is
trained jointly by both decoders' caption losses, so the draft and the target share it exactly.
Training never sees a held-out caption (see ``aiflow_stream.scenes``).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aiflow_stream import scenes as S
from aiflow_stream.models.family import (
    DEFAULT_DIR,
    FamilySpec,
    build_family,
    preprocess,
    save_family,
)

# Training renders at a quarter of camera resolution (same 16:9 geometry, area-resized the same
# way); per-pixel noise here is ~0.18x of its 1280x720 equivalent after the resize.
TRAIN_CANVAS = (224, 128)


def make_batch(step: int, batch: int, seed: int, tok) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    rng = np.random.default_rng([seed, step])
    images: list[np.ndarray] = []
    captions: list[str] = []
    while len(images) < batch:
        scene = S.random_scene(rng, clutter=True)
        if scene.heldout:
            continue
        noise = float(rng.uniform(0, 10))
        motion = (float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)))
        img = S.render(scene, *TRAIN_CANVAS, noise=noise, motion=motion, rng=rng)
        if rng.random() < 0.3:  # exposure changes
            img = np.clip(img.astype(np.float32) * rng.uniform(0.75, 1.25), 0, 255).astype(np.uint8)
        images.append(S.to_model_input(img))
        captions.append(scene.caption)
    pixels = preprocess(images)
    enc = tok([c + " " + tok.eos_token for c in captions], padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return pixels, labels, captions


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000, help="total optimiser steps (schedule length)")
    ap.add_argument("--minutes", type=float, default=58.0, help="stop (and save) after this wall time")
    ap.add_argument("--stop-at", type=int, default=None, help="stop (and save) at this step; resume later")
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ckpt", type=Path, default=Path("checkpoints/family.pt"))
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--encoder", choices=["vit", "swin"], default="vit")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    spec = FamilySpec(encoder=args.encoder)
    tok, members = build_family(spec, seed=args.seed)
    params = list({id(p): p for m in members.values() for p in m.parameters()}.values())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    start = 0
    if args.ckpt.exists():
        state = torch.load(args.ckpt, map_location="cpu", weights_only=False)
        for name, m in members.items():
            m.load_state_dict(state["models"][name])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        print(f"resumed from {args.ckpt} at step {start}")

    def checkpoint(step: int) -> None:
        args.ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.ckpt.with_suffix(".tmp")
        torch.save({"models": {n: m.state_dict() for n, m in members.items()}, "opt": opt.state_dict(), "step": step}, tmp)
        tmp.replace(args.ckpt)

    deadline = time.monotonic() + args.minutes * 60
    for m in members.values():
        m.train()
    encoder = members["target"].encoder
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train", unit="step")
    ema: dict[str, float] = {}
    step = start
    for step in bar:
        pixels, labels, _ = make_batch(step, args.batch, args.seed, tok)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup=150)
        enc = encoder(pixel_values=pixels)
        losses = {n: m(encoder_outputs=enc, labels=labels).loss for n, m in members.items()}
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for n, v in losses.items():
            ema[n] = 0.98 * ema.get(n, v.item()) + 0.02 * v.item()
        bar.set_postfix({f"{n}_loss": f"{v:.3f}" for n, v in ema.items()})
        if (step + 1) % args.save_every == 0:
            checkpoint(step + 1)
            save_family(args.out, tok, members)
        if args.stop_at is not None and step + 1 >= args.stop_at:
            bar.write(f"stopping at step {step + 1} as asked; rerun to resume")
            break
        if time.monotonic() > deadline:
            bar.write(f"time budget reached at step {step + 1}; saved, rerun to resume")
            break
    checkpoint(step + 1)
    save_family(args.out, tok, members)
    print(f"saved family to {args.out} (step {step + 1})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
