"""Train the learned feature bottleneck (D -> d -> D) of the default family.

    python -m aiflow_stream.codecs.train_bottleneck [--width 16] [--steps 600] [--minutes 15]

The encoder and the target decoder stay frozen; only the two linear maps learn, from the
target's caption loss on training-split scenes (the held-out split is never seen), with
simulated quantization noise on the bottleneck (uniform, one int4 step of each token's range)
so the code survives ``int4``/``int8`` quantization. Both maps start from PCA of the features.
Writes ``aiflow_stream/codecs/bottleneck/default_d{width}.safetensors``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from aiflow_stream.codecs.learned import BOTTLENECK_DIR, bottleneck_path
from aiflow_stream.models.family import DEFAULT_DIR


def _features(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encoder(pixel_values=pixels).last_hidden_state


def _quant_noise(z: torch.Tensor, levels: int = 15) -> torch.Tensor:
    span = (z.amax(dim=-1, keepdim=True) - z.amin(dim=-1, keepdim=True)).detach()
    return z + (torch.rand_like(z) - 0.5) * span / levels


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file
    from transformers import VisionEncoderDecoderModel

    from aiflow_stream.models.tokenizer import build_tokenizer
    from aiflow_stream.models.train import make_batch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=16, help="bottleneck width d")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--minutes", type=float, default=15.0, help="stop (and save) after this wall time")
    ap.add_argument("--seed", type=int, default=101, help="data seed (distinct from the model's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_DIR / "target")
    ap.add_argument("--out", type=Path, default=None, help=f"default: {BOTTLENECK_DIR}/default_d<width>.safetensors")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = args.out or bottleneck_path(args.width)

    model = VisionEncoderDecoderModel.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = build_tokenizer()
    dim = model.config.encoder.hidden_size

    # PCA initialisation from a few batches of features.
    sample = torch.cat([_features(model, make_batch(10**6 + i, args.batch, args.seed, tok)[0])
                        for i in range(4)]).reshape(-1, dim)
    mean = sample.mean(0)
    _, _, vt = torch.linalg.svd(sample - mean, full_matrices=False)
    comp = vt[: args.width].clone()
    down = torch.nn.Linear(dim, args.width)
    up = torch.nn.Linear(args.width, dim)
    with torch.no_grad():
        down.weight.copy_(comp)
        down.bias.copy_(-comp @ mean)
        up.weight.copy_(comp.T)
        up.bias.copy_(mean)
    params = [*down.parameters(), *up.parameters()]
    opt = torch.optim.Adam(params, lr=args.lr)

    deadline = time.monotonic() + args.minutes * 60
    ema = None
    step = 0
    for step in range(args.steps):
        pixels, labels, _ = make_batch(step, args.batch, args.seed, tok)
        x = _features(model, pixels)
        for g in opt.param_groups:
            g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        xh = up(_quant_noise(down(x)))
        loss = model(encoder_outputs=(xh,), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0:
            print(f"step {step} caption loss {ema:.4f}", flush=True)
        if time.monotonic() > deadline:
            print(f"time budget reached at step {step + 1}")
            break
    with torch.no_grad():
        base = model(encoder_outputs=(x,), labels=labels).loss.item()
    print(f"final caption loss {ema:.4f} (full features on the last batch: {base:.4f})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"down.weight": down.weight, "down.bias": down.bias, "up.weight": up.weight,
               "up.bias": up.bias}
    save_file({k: v.detach().contiguous().float() for k, v in tensors.items()}, str(out),
              metadata={"width": str(args.width), "dim": str(dim), "steps": str(step + 1),
                        "caption_loss": f"{ema:.4f}", "model": str(args.model_dir),
                        "model_mtime": str(int((args.model_dir / "model.safetensors").stat().st_mtime)),
                        "command": "python -m aiflow_stream.codecs.train_bottleneck "
                                   f"--width {args.width} --steps {args.steps}"})
    print(f"saved {out} ({sum(t.numel() for t in tensors.values())} parameters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
