"""caption and verifier: the decoder halves of the captioner.

Without a verifier, ``caption`` decodes greedily with its own model. With one, it drafts tokens
with its (small) model and the verifier (the large model, usually on the cloud tier) accepts or
corrects them, so the final caption equals the large model's own greedy caption. The draft
caption is emitted at once (``revision`` 0, ``final`` False) and the verified one after
(``revision`` 1), so a subscriber sees an answer at edge latency and the final one at cloud
quality. The key frame's compressed features travel to the verifier once, on the first round;
later rounds carry token ids only.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import numpy as np

from aiflow_stream.errors import ModelError
from aiflow_stream.operators.base import Operator, PartialBatchError, register
from aiflow_stream.operators.compress import decode_packet
from aiflow_stream.runtime.items import Item, ItemKind


def _load(ctx: Any, default: str) -> Any:
    import torch

    from aiflow_stream.models import load_captioner

    dtype = getattr(torch, ctx.torch_dtype) if ctx.torch_dtype else None
    return load_captioner(str(ctx.options.get("model", default)), device=ctx.torch_device, dtype=dtype)


@register("caption")
class Caption(Operator):
    """Options: ``model``, ``gamma`` (``auto`` or an int), ``publish_draft`` (default True) and
    ``batch`` (default 1): the most key frames taken from the queue at once. A batch goes
    through the decoder together (one batched greedy decode), and with a verifier its
    sessions' rounds travel together, so the round trips of N key frames overlap."""

    def setup(self) -> None:
        self.model = _load(self.ctx, "default")
        self.gamma_opt = self.ctx.options.get("gamma", "auto")
        self.publish_draft = bool(self.ctx.options.get("publish_draft", True))
        self.max_batch = int(self.ctx.options.get("batch", 1))
        if self.max_batch < 1:
            raise ValueError(f"step {self.ctx.step!r}: batch must be >= 1, got {self.max_batch}")
        self._codec_state: dict[str, Any] = {}
        self._session = itertools.count()
        self._rtt_ema: float | None = None
        self._accept_ema: float | None = None

    def _features(self, item: Item) -> np.ndarray:
        if item.kind is ItemKind.FEATURES:
            return np.asarray(item.parts[0], np.float32)
        if item.kind is ItemKind.FRAME:
            return self.model.encode([item.parts[0]])[0]
        content, value = decode_packet(item, self._codec_state)
        if content == "frames":
            return self.model.encode([value])[0]
        return value

    def _caption_item(self, item: Item, text: str, model: str, revision: int, final: bool,
                      stats: dict[str, Any] | None = None, draft_ns: int | None = None) -> Item:
        out = item.derive(ItemKind.CAPTION, [], meta={"text": text, "model": model, "revision": revision,
                                                       "final": final, "stats": stats or {}})
        out.meta.pop("packet", None)
        if revision > 0 and draft_ns is not None:
            out.stamps[self.ctx.step] = draft_ns  # the draft's time, so stages stay in order
        out.stamps[self.ctx.step if revision == 0 else f"{self.ctx.step}.verified"] = time.time_ns()
        return out

    def process(self, item: Item) -> list[Item]:
        return self.process_batch([item])

    def process_batch(self, items: list[Item]) -> list[Item]:
        feats = [self._features(item) for item in items]
        if self.ctx.verifier is None:
            texts = self.model.decode(np.stack(feats))
            return [self._caption_item(item, text, self.model.name, 0, True) for item, text in zip(items, texts)]
        from aiflow_stream.models.speculative import Drafter

        drafters = [Drafter(self.model) for _ in items]
        for drafter, f in zip(drafters, feats):
            drafter.start(f)
        outs: list[Item] = []
        emit = self.ctx.extras.get("emit")
        free = [0] * len(items)
        draft_ns: list[int | None] = [None] * len(items)
        if self.publish_draft:
            if len(items) == 1:  # the drafter keeps its cache: verifying this draft costs no more
                draft_ids = [drafters[0].caption()]
            else:  # one batched decode; each drafter takes its caption as already drafted
                draft_ids = self.model.decode_ids(np.stack(feats))
                for drafter, ids in zip(drafters, draft_ids):
                    drafter.seed(ids)
            for k, (item, ids) in enumerate(zip(items, draft_ids)):
                free[k] = len(ids) + 1  # already drafted: sending them costs no draft passes
                draft = self._caption_item(item, self.model.text(ids), self.model.name, 0, False)
                draft_ns[k] = draft.stamps[self.ctx.step]
                if emit is not None:
                    emit(draft)  # publish now; verification takes round trips
                else:
                    outs.append(draft)
        finals: dict[int, Item] = {}

        def verified(k: int, result: Any) -> None:
            finals[k] = self._caption_item(items[k], result.text, f"{self.model.name}+verified", 1, True, {
                "rounds": result.rounds, "target_passes": result.target_passes,
                "accepted": result.accepted_tokens, "drafted": result.drafted_tokens,
                "bytes_up": result.bytes_up, "gamma": self._gamma(free[k]), "batch": len(items)},
                draft_ns=draft_ns[k])
            if emit is not None:  # out now; a batch's longer captions go on
                emit(finals[k])

        try:
            self._speculate(items, feats, drafters, free, verified)
        except Exception as err:
            if len(items) == 1 or emit is None:
                raise
            raise PartialBatchError(set(finals), err) from err
        if emit is None:
            outs.extend(finals[k] for k in range(len(items)))
        return outs

    def _gamma(self, free: int) -> int:
        if self.gamma_opt != "auto":
            return int(self.gamma_opt)
        from aiflow_stream.models.speculative import choose_gamma

        if self._rtt_ema is None or self._accept_ema is None:
            return 4
        return choose_gamma(self._rtt_ema, self._accept_ema, 0.002, 0.01, free_tokens=free)

    def _speculate(self, items: list[Item], feats: list[np.ndarray], drafters: list[Any],
                   free: list[int], on_done: Any) -> list[Any]:
        """Verify the drafters' captions with the cloud; ``on_done(k, result)`` as each ends."""
        from aiflow_stream.models.speculative import VerifyResult, speculative_generate_many

        verifier = self.ctx.verifier
        assert verifier is not None
        sessions = [f"{item.stream}:{item.seq}:{next(self._session)}" for item in items]
        by_session = dict(zip(sessions, items))

        def request(session_id: str, prefix_len: int, draft_ids: list[int],
                    features: Any) -> tuple[dict[str, Any], list[Any] | None]:
            meta: dict[str, Any] = {"op": "verify", "session": session_id, "prefix_len": prefix_len,
                                    "draft": [int(t) for t in draft_ids]}
            if features is None:
                return meta, None
            meta["op"] = "open"
            item = by_session[session_id]
            meta["stream"] = item.stream  # the cloud keeps codec state per camera, not per session
            if item.kind is ItemKind.PACKET:  # forward the device's compressed features untouched
                meta["packet"] = item.meta["packet"]
                return meta, list(item.parts)
            return meta, [np.ascontiguousarray(features, np.float32)]

        bytes_up = dict.fromkeys(sessions, 0)

        def verify_many(reqs: list[tuple[str, int, list[int], Any]]) -> list[VerifyResult]:
            t0 = time.perf_counter()
            replies = verifier.call_many([request(*r) for r in reqs])
            rtt = time.perf_counter() - t0
            self._rtt_ema = rtt if self._rtt_ema is None else 0.8 * self._rtt_ema + 0.2 * rtt
            sizes = getattr(verifier, "last_call_bytes", None)  # what really crossed the link
            out = []
            for k, ((sid, *_), reply) in enumerate(zip(reqs, replies)):
                if "error" in reply:
                    raise ModelError(f"verifier refused session {sid}: {reply['error']}")
                if sizes is not None:
                    bytes_up[sid] += sizes[k]
                out.append(VerifyResult(accepted=int(reply["accepted"]), correction=reply.get("correction"),
                                        done=bool(reply["done"]), forward_passes=int(reply.get("forward_passes", 1)),
                                        resend=bool(reply.get("resend", False))))
            return out

        def finished(k: int, result: Any) -> None:
            if bytes_up[sessions[k]]:
                result.bytes_up = bytes_up[sessions[k]]
            if result.drafted_tokens:
                rate = result.accepted_tokens / result.drafted_tokens
                self._accept_ema = rate if self._accept_ema is None else 0.8 * self._accept_ema + 0.2 * rate
            on_done(k, result)

        try:
            results = speculative_generate_many(drafters, verify_many, feats, [self._gamma(f) for f in free],
                                                session_ids=sessions, started=True, on_done=finished)
        except BaseException:
            self._close_sessions(sessions)
            raise
        # The cloud drops a session when it answers done; close only what it may still hold, so
        # a normal caption costs no extra round trip.
        self._close_sessions([sid for sid, r in zip(sessions, results) if not r.closed_by_cloud])
        return results

    def _close_sessions(self, sessions: list[str]) -> None:
        if not sessions:
            return
        try:
            self.ctx.verifier.call_many([({"op": "close", "session": sid}, None) for sid in sessions])  # type: ignore[union-attr]
        except Exception:  # closing is best effort; the verifier evicts idle sessions itself
            self.ctx.log.debug("verifier close failed for %s", sessions)


_MAX_CODEC_STREAMS = 4096


@register("verifier")
class Verify(Operator):
    """Answers verify requests from caption steps; one session per key frame, bounded."""

    def setup(self) -> None:
        self.model = _load(self.ctx, "default:target")
        from aiflow_stream.models.speculative import Verifier

        self.verifier = Verifier(self.model, max_sessions=int(self.ctx.options.get("max_sessions", 64)))
        self._codec_state: dict[str, Any] = {}
        self._lock = threading.Lock()

    def handle(self, peer: str, meta: dict[str, Any], parts: list[Any]) -> dict[str, Any]:
        op = meta.get("op")
        sid = f"{peer}/{meta.get('session')}"
        with self._lock:
            if op == "close":
                self.verifier.close(sid)
                return {"ok": True}
            if op == "open":
                if "packet" in meta:
                    # codec state (a delta stage's reference) follows the camera's stream, one
                    # per caller and stream, the oldest forgotten beyond a bound
                    stream = f"{peer}/{meta.get('stream', meta.get('session'))}"
                    fake = Item(ItemKind.PACKET, stream, 0, 0, parts, {"packet": meta["packet"]})
                    content, feats = decode_packet(fake, self._codec_state)
                    while len(self._codec_state) > _MAX_CODEC_STREAMS:
                        del self._codec_state[next(iter(self._codec_state))]
                    if content == "frames":
                        feats = self.model.encode([feats])[0]
                else:
                    feats = np.asarray(parts[0], np.float32)
                self.verifier.open(sid, feats)
            elif op != "verify":
                return {"error": f"unknown verifier op {op!r}"}
            res = self.verifier.verify(sid, int(meta["prefix_len"]), list(meta["draft"]))
            return {"accepted": res.accepted, "correction": res.correction, "done": res.done,
                    "forward_passes": res.forward_passes, "resend": res.resend}

    def process(self, item: Item) -> list[Item]:  # pragma: no cover - a service, not a transform
        raise TypeError("verifier is called through handle()")
