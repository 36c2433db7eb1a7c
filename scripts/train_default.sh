#!/usr/bin/env bash
# Reproduce the shipped default model family (aiflow_stream/models/default/) from scratch.
#
# The shipped run was lengthened twice while it trained (its schedule length went 3200 ->
# 4400 -> 5600 steps, resuming from the checkpoint at steps 1800 and 2800); this script replays
# exactly that sequence. The batch of step k depends only on the seed and k, so the data is the
# same; float round-off differs between machines, so the weights match closely, not bit for bit.
# About 95 minutes on one free CPU core; resumable (rerun after an interruption).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CKPT=${CKPT:-checkpoints/family.pt}
step() { "$PY" - "$CKPT" <<'PY'
import sys, torch, pathlib
p = pathlib.Path(sys.argv[1])
print(torch.load(p, map_location="cpu", weights_only=False)["step"] if p.exists() else 0)
PY
}
export OMP_WAIT_POLICY=PASSIVE
[ "$(step)" -lt 1800 ] && "$PY" -m aiflow_stream.models.train --steps 3200 --stop-at 1800 --threads 1 --minutes 600 --ckpt "$CKPT"
[ "$(step)" -lt 2800 ] && "$PY" -m aiflow_stream.models.train --steps 4400 --stop-at 2800 --threads 1 --minutes 600 --ckpt "$CKPT"
"$PY" -m aiflow_stream.models.train --steps 5600 --threads 1 --minutes 600 --ckpt "$CKPT"
"$PY" -m aiflow_stream.models.evaluate --n 500
