"""The shipped default family meets its quality targets on 100 held-out scenes (camera
resolution and noise, greedy decoding): target exact >= 0.85 and BLEU-4 >= 0.95, draft exact
>= 0.6. The full 500-scene figures come from ``python -m aiflow_stream.models.evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from aiflow_stream.models.adapters import Captioner
from aiflow_stream.models.evaluate import Scores, decode_all, main
from aiflow_stream.scenes import Scene


def test_target_quality(target: Captioner, heldout: list[Scene], heldout_features: np.ndarray) -> None:
    s = Scores.of(decode_all(target, heldout_features), [sc.caption for sc in heldout])
    assert s.exact >= 0.85, s
    assert s.bleu4 >= 0.95, s


def test_draft_quality(draft: Captioner, heldout: list[Scene], heldout_features: np.ndarray) -> None:
    s = Scores.of(decode_all(draft, heldout_features), [sc.caption for sc in heldout])
    assert s.exact >= 0.6, s


def test_evaluate_cli_writes_figures(tmp_path: Path) -> None:
    out = tmp_path / "models.json"
    assert main(["--n", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 4
    for key in ("target_exact", "target_bleu4", "target_cider", "draft_exact", "draft_bleu4", "draft_cider"):
        assert 0.0 <= res["figures"][key] <= 10.0
    assert out.with_suffix(".md").read_text().startswith("# Default family quality")
