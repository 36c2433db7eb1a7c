"""The caption step with the shipped family: a batch of key frames gives the same captions as
one key frame at a time (the edge's draft and the cloud-verified one), in fewer round trips."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pytest

from aiflow_stream.models.adapters import Captioner
from aiflow_stream.operators.base import OperatorContext, PartialBatchError, create
from aiflow_stream.operators.compress import decode_packet
from aiflow_stream.runtime.items import Counters, Item, ItemKind
from aiflow_stream.runtime.links import LocalVerifier


class CountingVerifier(LocalVerifier):
    def __init__(self, op: Any) -> None:
        super().__init__(op)
        self.trips = 0

    def call_many(self, calls: list, timeout: float = 30.0) -> list[dict[str, Any]]:
        self.trips += 1
        return super().call_many(calls, timeout)


def _ctx(step: str, verifier: Any = None, **options: Any) -> OperatorContext:
    return OperatorContext(tier="edge", step=step, options=options, counters=Counters(),
                           log=logging.LoggerAdapter(logging.getLogger(step), {}), verifier=verifier)


def _items(features: np.ndarray) -> list[Item]:
    return [Item(ItemKind.FEATURES, f"cam{k % 3}", k, time.time_ns(), [f]) for k, f in enumerate(features)]


@pytest.fixture(scope="module")
def steps() -> tuple[Any, CountingVerifier]:
    verify = create("verifier", _ctx("verify", model="default:target"))
    verify.setup()
    rpc = CountingVerifier(verify)
    caption = create("caption", _ctx("caption", rpc, model="default:draft", batch=8, gamma=4))
    caption.setup()
    return caption, rpc


def test_batched_drafts_and_verified_captions_equal_one_at_a_time(
    steps: tuple[Any, CountingVerifier], draft: Captioner, target: Captioner, heldout_features: np.ndarray
) -> None:
    caption, rpc = steps
    feats = heldout_features[10:18]
    rpc.trips = 0
    outs = caption.process_batch(_items(feats))
    batched_trips = rpc.trips
    drafts = [o for o in outs if o.meta["revision"] == 0]
    finals = [o for o in outs if o.meta["revision"] == 1]
    assert [o.seq for o in drafts] == [o.seq for o in finals] == list(range(8))
    assert [o.meta["text"] for o in drafts] == draft.decode(feats)
    assert [o.meta["text"] for o in finals] == target.decode(feats)
    assert all(o.meta["stats"]["batch"] == 8 and o.meta["final"] for o in finals)
    assert all(o.stamps["caption"] <= o.stamps["caption.verified"] for o in finals)

    rpc.trips = 0
    singles = [o for it in _items(feats) for o in caption.process(it)]
    assert [o.meta["text"] for o in singles if o.meta["revision"] == 1] == target.decode(feats)
    # a batch's rounds travel together: about as many round trips as its longest caption
    assert batched_trips <= max(o.meta["stats"]["rounds"] for o in finals) < rpc.trips
    assert len(caption.ctx.verifier.op.verifier) == 0  # every cloud session was released


def test_batched_decode_without_a_verifier(draft: Captioner, heldout_features: np.ndarray) -> None:
    caption = create("caption", _ctx("caption", model="default:draft", batch=4))
    caption.setup()
    feats = heldout_features[20:24]
    outs = caption.process_batch(_items(feats))
    assert [o.meta["text"] for o in outs] == draft.decode(feats)
    assert all(o.meta["final"] and o.meta["revision"] == 0 for o in outs)


def test_batch_option_is_checked() -> None:
    caption = create("caption", _ctx("caption", model="default:draft", batch=0))
    with pytest.raises(ValueError, match="batch must be >= 1"):
        caption.setup()


def test_verified_captions_go_out_as_each_ends_and_a_failure_names_what_was_done(
    steps: tuple[Any, CountingVerifier], target: Captioner, heldout_features: np.ndarray
) -> None:
    caption, rpc = steps
    emitted: list[Item] = []
    caption.ctx.extras["emit"] = emitted.append
    try:
        feats = heldout_features[30:36]
        assert caption.process_batch(_items(feats)) == []  # everything went out through emit
        finals = [o for o in emitted if o.meta["revision"] == 1]
        assert sorted(o.seq for o in finals) == list(range(6))
        want = target.decode(feats)
        assert all(o.meta["text"] == want[o.seq] for o in finals)
        rounds = [o.meta["stats"]["rounds"] for o in finals]
        assert rounds == sorted(rounds)  # the shortest verifications were published first

        # the cloud goes away after the first round trip: what finished is reported as done,
        # the rest fail (the runtime counts them), and no session is left open by the edge
        emitted.clear()
        real = rpc.call_many
        calls = {"n": 0}

        def flaky(reqs: list, timeout: float = 30.0) -> list[dict[str, Any]]:
            calls["n"] += 1
            if calls["n"] > 1 and reqs[0][0]["op"] != "close":
                raise TimeoutError("no reply from the cloud")
            return real(reqs, timeout)

        rpc.call_many = flaky  # type: ignore[method-assign]
        with pytest.raises(PartialBatchError) as info:
            caption.process_batch(_items(feats))
        done = {o.seq for o in emitted if o.meta["revision"] == 1}
        assert info.value.finished == done and len(done) < 6
        assert isinstance(info.value.cause, TimeoutError)
        assert len(rpc.op.verifier) == 0
    finally:
        caption.ctx.extras.pop("emit", None)
        rpc.__dict__.pop("call_many", None)


def test_the_cloud_keeps_codec_state_per_camera_not_per_key_frame(
    steps: tuple[Any, CountingVerifier], target: Captioner, heldout_features: np.ndarray
) -> None:
    # Packets forwarded by the edge: one session per key frame, but codec state (a delta
    # stage's reference) per camera, so a long run does not grow the cloud's memory.
    caption, rpc = steps
    compress = create("compress", _ctx("compress", codec="delta|int8|rans"))
    compress.setup()
    feats = heldout_features[40:52]
    packets = [compress.process(it)[0] for it in _items(feats)]  # 3 cameras, 4 key frames each
    states: dict[str, Any] = {}
    decoded = np.stack([decode_packet(p, states)[1] for p in packets])
    outs = caption.process_batch(packets)
    finals = [o for o in outs if o.meta["revision"] == 1]
    assert [o.meta["text"] for o in finals] == target.decode(decoded)
    assert set(rpc.op._codec_state) == {"local/cam0", "local/cam1", "local/cam2"}
