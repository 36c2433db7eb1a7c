"""Caption metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from aiflow_stream.models.metrics import bleu4, cider_d, exact_match


def test_exact_match_ignores_spacing_and_accepts_any_reference() -> None:
    hyps = ["a red circle", "a  blue square ", "a green cross"]
    refs = ["a red circle", "a blue square", ["a red cross", "a green cross"]]
    assert exact_match(hyps, refs) == 1.0
    assert exact_match(["a red circle", "a blue"], ["a red circle", "a blue square"]) == 0.5


def test_bleu_identical_is_one() -> None:
    assert bleu4(["a b c d e"], ["a b c d e"]) == pytest.approx(1.0)


def test_bleu_clipped_precisions() -> None:
    # p1 = 5/6 ("the" clipped to 1), p2 = 3/5, p3 = 2/4, p4 = 1/3; equal lengths: no penalty.
    got = bleu4(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert got == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)


def test_bleu_brevity_penalty() -> None:
    assert bleu4(["a b c d"], ["a b c d e f"]) == pytest.approx(math.exp(1 - 6 / 4))


def test_bleu_is_corpus_level_not_sentence_average() -> None:
    # Sentence BLEU of the second pair is 0 (no 4-gram match); the corpus pools the counts:
    # p1 = 7/8, p2 = 5/6, p3 = 3/4, p4 = 1/2.
    got = bleu4(["a b c d", "a b c z"], ["a b c d", "a b c d"])
    assert got == pytest.approx((7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25)


def test_bleu_closest_reference_length() -> None:
    # References of 3 and 8 words: a 4-word hypothesis is closest to 3, so no penalty.
    assert bleu4(["a b c d"], [["a b c", "a b c d e f g h"]]) == pytest.approx(1.0)
    assert bleu4(["x y z w"], ["a b c d"]) == 0.0


def test_cider_perfect_short_captions() -> None:
    # Unigrams and bigrams match perfectly; no 3- or 4-grams exist: (1 + 1 + 0 + 0) / 4 * 10.
    assert cider_d(["a b", "c d"], ["a b", "c d"]) == pytest.approx(5.0)


def test_cider_perfect_long_captions() -> None:
    assert cider_d(["a b c d", "e f g h"], ["a b c d", "e f g h"]) == pytest.approx(10.0)


def test_cider_partial_match_with_length_penalty() -> None:
    # Image 2: hypothesis "e f g" against "e f g h"; every n-gram has df = 1 so all weights are
    # equal and cancel in the cosines: n=1: 3/(sqrt3*2), n=2: 2/(sqrt2*sqrt3), n=3: 1/sqrt2,
    # n=4: 0. Length (in bigrams) 2 vs 3 gives the penalty exp(-1 / 72).
    cos = [3 / (math.sqrt(3) * 2), 2 / (math.sqrt(2) * math.sqrt(3)), 1 / math.sqrt(2), 0.0]
    second = 10 * math.exp(-1 / (2 * 36)) * sum(cos) / 4
    got = cider_d(["a b c d", "e f g"], ["a b c d", "e f g h"])
    assert got == pytest.approx((10 + second) / 2)


def test_cider_gives_no_weight_to_ngrams_every_image_has() -> None:
    # "x" occurs in every reference (idf 0): a hypothesis of only "x" scores nothing.
    assert cider_d(["x", "x"], ["x a b", "x c d"]) == pytest.approx(0.0)


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(ValueError):
        bleu4(["a"], ["a", "b"])
