"""Caption quality scores against ground truth: exact match, corpus BLEU-4, CIDEr-D.

Captions are split on whitespace into word tokens. Each reference entry may be one caption or
a list of captions (several references per image).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

References = Sequence[str | Sequence[str]]


def _refs(ref: str | Sequence[str]) -> list[list[str]]:
    return [ref.split()] if isinstance(ref, str) else [r.split() for r in ref]


def _check(hypotheses: Sequence[str], references: References) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("cannot score an empty corpus")


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def exact_match(hypotheses: Sequence[str], references: References) -> float:
    """Fraction of hypotheses equal (up to whitespace) to one of their references."""
    _check(hypotheses, references)
    hits = sum(h.split() in _refs(r) for h, r in zip(hypotheses, references, strict=True))
    return hits / len(hypotheses)


def bleu4(hypotheses: Sequence[str], references: References) -> float:
    """Corpus-level BLEU-4 (Papineni et al.): clipped n-gram precisions summed over the corpus,
    uniform weights, brevity penalty from the reference length closest to each hypothesis."""
    _check(hypotheses, references)
    matched = [0] * 4
    total = [0] * 4
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h = hyp.split()
        rs = _refs(ref)
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, 5):
            hc = _ngrams(h, n)
            max_ref: Counter[tuple[str, ...]] = Counter()
            for r in rs:
                max_ref |= _ngrams(r, n)
            matched[n - 1] += sum(min(c, max_ref[g]) for g, c in hc.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    if min(matched) == 0 or hyp_len == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matched, total, strict=True)) / 4
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(log_p)


def cider_d(hypotheses: Sequence[str], references: References, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (Vedantam et al., as in pycocoevalcap): TF-IDF n-gram vectors (n = 1..4)
    with document frequencies over the reference set, clipped hypothesis counts, a Gaussian
    length penalty, averaged over n and references, times 10, averaged over images."""
    _check(hypotheses, references)
    refs = [[" ".join(r) for r in _refs(ref)] for ref in references]

    def counts(sent: str) -> list[Counter[tuple[str, ...]]]:
        w = sent.split()
        return [_ngrams(w, n) for n in range(1, 5)]

    ref_counts = [[counts(r) for r in rs] for rs in refs]
    df: Counter[tuple[str, ...]] = Counter()
    for image_refs in ref_counts:
        df.update({g for c in image_refs for order in c for g in order})
    log_n = math.log(float(len(refs)))

    def vec(cnts: list[Counter[tuple[str, ...]]]) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        v: list[dict[tuple[str, ...], float]] = []
        norms: list[float] = []
        for order in cnts:
            d = {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in order.items()}
            v.append(d)
            norms.append(math.sqrt(sum(x * x for x in d.values())))
        length = sum(cnts[1].values())  # pycocoevalcap measures length in bigrams
        return v, norms, length

    scores = []
    for hyp, rcs in zip(hypotheses, ref_counts, strict=True):
        hv, hn, hl = vec(counts(hyp))
        total = 0.0
        for rc in rcs:
            rv, rn, rl = vec(rc)
            penalty = math.exp(-((hl - rl) ** 2) / (2 * sigma**2))
            for n in range(4):
                val = sum(min(x, rv[n].get(g, 0.0)) * rv[n].get(g, 0.0) for g, x in hv[n].items())
                if hn[n] != 0 and rn[n] != 0:
                    val /= hn[n] * rn[n]
                total += val * penalty / 4
        scores.append(10.0 * total / len(rcs))
    return sum(scores) / len(scores)
