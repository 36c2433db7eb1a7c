"""Speculative decoding: drafted by the small decoder, verified by the large one, the result is
exactly the large decoder's own greedy caption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GitConfig, GitForCausalLM

from aiflow_stream.models.adapters import Captioner, load_captioner
from aiflow_stream.models.speculative import (
    Drafter,
    Verifier,
    VerifyResult,
    choose_gamma,
    draft_caption,
    expected_tokens,
    speculative_generate,
    speculative_generate_many,
)
from aiflow_stream.models.tokenizer import build_tokenizer


def test_heldout_output_equals_target_greedy_with_fewer_target_passes(
    target: Captioner, draft: Captioner, heldout_features: np.ndarray, target_greedy: list[list[int]]
) -> None:
    verifier, drafter = Verifier(target), Drafter(draft)
    passes = autoregressive = 0
    for i, f in enumerate(heldout_features):
        res = speculative_generate(drafter, verifier, f, gamma=4)
        assert res.ids == target_greedy[i], f"scene {i}"
        assert res.text == target.text(target_greedy[i])
        assert res.rounds == res.target_passes  # one target forward pass per round
        assert 0 <= res.accepted_tokens <= res.drafted_tokens
        passes += res.target_passes
        autoregressive += len(target_greedy[i]) + 1  # one pass per token, EOS included
    assert passes < autoregressive
    assert len(verifier) == 0  # finished sessions are released


@pytest.mark.parametrize("gamma", [1, 2, 16])
def test_any_gamma_gives_the_same_caption(
    target: Captioner, draft: Captioner, heldout_features: np.ndarray, target_greedy: list[list[int]], gamma: int
) -> None:
    verifier, drafter = Verifier(target), Drafter(draft)
    for i in range(0, 100, 5):
        res = speculative_generate(drafter, verifier, heldout_features[i], gamma=gamma)
        assert res.ids == target_greedy[i]
        assert max(res.round_gammas) <= gamma


def test_draft_caption_is_the_drafters_own_greedy_caption(draft: Captioner, heldout_features: np.ndarray) -> None:
    ref = draft.decode_ids(heldout_features[:10])
    drafter = Drafter(draft)
    for f, ids in zip(heldout_features[:10], ref, strict=True):
        drafter.start(f)
        assert drafter.caption() == ids
        assert draft_caption(draft, f) == draft.text(ids)


def test_full_draft_is_reused_for_verification(
    target: Captioner, draft: Captioner, heldout_features: np.ndarray, target_greedy: list[list[int]]
) -> None:
    # Publishing the draft caption first costs no extra draft passes once verification starts.
    verifier, drafter = Verifier(target), Drafter(draft)
    f = heldout_features[0]
    drafter.start(f)
    drafter.caption()
    passes = drafter.forward_passes
    res = speculative_generate(drafter, verifier, f, gamma=4, started=True)
    assert res.ids == target_greedy[0]
    if res.accepted_tokens == res.drafted_tokens:
        assert drafter.forward_passes == passes


def test_lockstep_batch_equals_target_greedy_in_as_many_round_trips_as_the_longest(
    target: Captioner, draft: Captioner, heldout_features: np.ndarray, target_greedy: list[list[int]]
) -> None:
    verifier = Verifier(target)
    trips: list[int] = []

    def verify_many(reqs: list) -> list[VerifyResult]:
        trips.append(len(reqs))
        return [verifier(*r) for r in reqs]

    idx = list(range(0, 40, 5))
    feats = [heldout_features[i] for i in idx]
    drafters = [Drafter(draft) for _ in idx]
    # seeded from one batched decode, as the caption step does with a batch of key frames
    for d, f, ids in zip(drafters, feats, draft.decode_ids(np.stack(feats)), strict=True):
        d.start(f)
        d.seed(ids)
    results = speculative_generate_many(drafters, verify_many, feats, [4, 1, 2, 4, 8, 4, 3, 16],
                                        started=True)
    singles = [speculative_generate(Drafter(draft), verifier, f, gamma=4) for f in feats]
    for i, res, one in zip(idx, results, singles, strict=True):
        assert res.ids == target_greedy[i] == one.ids, f"scene {i}"
        assert res.closed_by_cloud
    assert len(trips) == max(r.rounds for r in results)  # the rounds of all captions overlap
    assert trips[0] == len(idx) and sum(trips) == sum(r.rounds for r in results)
    assert len(verifier) == 0


def test_seeded_drafter_drafts_on_after_a_correction(target: Captioner, draft: Captioner,
                                                     heldout_features: np.ndarray) -> None:
    # a wrong seed (a caption the draft model never wrote) is corrected by the cloud, and the
    # drafter then continues from the committed tokens without a cache it never built
    verifier, drafter = Verifier(target), Drafter(draft)
    f = heldout_features[7]
    want = target.decode_ids(f[None])[0]
    drafter.start(f)
    drafter.seed([want[0], (want[1] + 1) % target.vocab_size])
    res = speculative_generate(drafter, verifier, f, gamma=4, started=True)
    assert res.ids == want
    assert res.drafted_tokens > res.accepted_tokens


def test_retried_round_gets_the_same_answer(target: Captioner, draft: Captioner, heldout_features: np.ndarray) -> None:
    verifier, drafter = Verifier(target), Drafter(draft)
    f = heldout_features[3]
    drafter.start(f)
    verifier.open("s", f)
    first = verifier.verify("s", 0, drafter.draft(3))
    again = verifier.verify("s", 0, drafter.draft(3))  # answer lost, edge retries
    assert first == again and first.forward_passes == 1


def test_lost_session_is_recovered_by_resending_features(
    target: Captioner, draft: Captioner, heldout_features: np.ndarray, target_greedy: list[list[int]]
) -> None:
    verifier = Verifier(target)
    calls: list[bool] = []

    def flaky(sid: str, prefix: int, ids: list[int], feats: np.ndarray | None) -> VerifyResult:
        calls.append(feats is not None)
        res = verifier(sid, prefix, ids, feats)
        if len(calls) == 1:
            verifier.close(sid)  # the cloud restarts after the first round
        return res

    res = speculative_generate(Drafter(draft), flaky, heldout_features[7], gamma=2)
    assert res.ids == target_greedy[7]
    if not res.rounds == 1:  # unless the whole caption fit in one round
        assert calls[:3] == [True, False, True]
    one = speculative_generate(Drafter(draft), Verifier(target), heldout_features[7], gamma=2)
    assert res.bytes_up > one.bytes_up


def test_sessions_are_bounded_by_lru_and_ttl(target: Captioner, heldout_features: np.ndarray) -> None:
    now = [0.0]
    verifier = Verifier(target, max_sessions=3, ttl_s=10.0, clock=lambda: now[0])
    for k in range(5):
        verifier.open(f"s{k}", heldout_features[k])
    assert len(verifier) == 3
    assert verifier.verify("s0", 0, []).resend  # evicted, least recently used
    assert not verifier.verify("s4", 0, []).resend
    now[0] = 100.0
    verifier.open("late", heldout_features[0])
    assert len(verifier) == 1 and verifier.evicted == 5


def test_out_of_step_edge_is_an_error(target: Captioner, heldout_features: np.ndarray) -> None:
    from aiflow_stream.errors import ModelError

    verifier = Verifier(target)
    verifier.open("s", heldout_features[0])
    with pytest.raises(ModelError, match="out of step"):
        verifier.verify("s", 5, [4, 5])
    with pytest.raises(ModelError, match="token ids must lie in"):
        verifier.verify("s", 0, [4, 10_000])


def test_choose_gamma_follows_round_trip_and_acceptance() -> None:
    assert expected_tokens(1, 0.5) == pytest.approx(1.5)
    assert expected_tokens(3, 1.0) == 4.0
    fast = choose_gamma(0.001, 0.9, 0.002, 0.003)
    slow = choose_gamma(0.100, 0.9, 0.002, 0.003)
    assert slow > fast >= 1
    assert choose_gamma(0.100, 0.99, 0.002, 0.003) >= slow
    assert choose_gamma(0.05, 0.0, 0.002, 0.003) == 1
    assert choose_gamma(1.0, 1.0, 0.0, 0.0, max_gamma=8) == 8
    # Tokens already drafted (the published draft caption) are free: send them all.
    assert choose_gamma(0.001, 0.9, 0.002, 0.003, max_gamma=20, free_tokens=20) == 20


def test_generic_models_with_rejections(tmp_path: Path) -> None:
    # Two different random GIT decoders on one feature space: most drafts are rejected, which
    # exercises cache cropping in a decoder that keeps the image tokens in its own cache.
    tok = build_tokenizer()
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                  image_size=32, patch_size=8)
    for seed, name in ((0, "big"), (1, "small")):
        torch.manual_seed(seed)
        GitForCausalLM(GitConfig(vision_config=vision, vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=48, max_position_embeddings=40,
                                 initializer_range=0.5, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=0)).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    big, small = load_captioner(tmp_path / "big"), load_captioner(tmp_path / "small")
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(4, *big.feature_shape)).astype(np.float32)
    ref = big.decode_ids(feats)
    rejected = 0
    for f, ids in zip(feats, ref, strict=True):
        res = speculative_generate(Drafter(small), Verifier(big), f, gamma=3)
        assert res.ids == ids
        rejected += res.drafted_tokens - res.accepted_tokens
    assert rejected > 0
