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
from aiflow_stream.operators.base import Operator, register
from aiflow_stream.operators.compress import decode_packet
from aiflow_stream.runtime.items import Item, ItemKind


def _load(ctx: Any, default: str) -> Any:
    import torch

    from aiflow_stream.models import load_captioner

    dtype = getattr(torch, ctx.torch_dtype) if ctx.torch_dtype else None
    return load_captioner(str(ctx.options.get("model", default)), device=ctx.torch_device, dtype=dtype)


@register("caption")
class Caption(Operator):
    def setup(self) -> None:
        self.model = _load(self.ctx, "default")
        self.gamma_opt = self.ctx.options.get("gamma", "auto")
        self.publish_draft = bool(self.ctx.options.get("publish_draft", True))
        self._draft_ns: int | None = None
        self._free = 0  # tokens the drafter already holds for the current caption
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
                      stats: dict[str, Any] | None = None) -> Item:
        out = item.derive(ItemKind.CAPTION, [], meta={"text": text, "model": model, "revision": revision,
                                                       "final": final, "stats": stats or {}})
        out.meta.pop("packet", None)
        if revision > 0 and self._draft_ns is not None:
            out.stamps[self.ctx.step] = self._draft_ns  # the draft's time, so stages stay in order
        out.stamps[self.ctx.step if revision == 0 else f"{self.ctx.step}.verified"] = time.time_ns()
        if revision == 0:
            self._draft_ns = out.stamps[self.ctx.step]
        return out

    def process(self, item: Item) -> list[Item]:
        feats = self._features(item)
        self._draft_ns = None
        self._free = 0
        if self.ctx.verifier is None:
            text = self.model.decode(feats[None])[0]
            return [self._caption_item(item, text, self.model.name, 0, True)]
        from aiflow_stream.models.speculative import Drafter

        drafter = Drafter(self.model)
        drafter.start(feats)
        outs: list[Item] = []
        if self.publish_draft:
            # The drafter keeps what it drafted here, so verifying it afterwards costs no more.
            draft_ids = drafter.caption()
            self._free = len(draft_ids) + 1  # already drafted: sending them costs no draft passes
            draft = self._caption_item(item, self.model.text(draft_ids), self.model.name, 0, False)
            emit = self.ctx.extras.get("emit")
            if emit is not None:
                emit(draft)  # publish now; verification takes round trips
            else:
                outs.append(draft)
        sent0 = getattr(self.ctx.verifier, "bytes_sent", None)
        result = self._speculate(item, feats, drafter)
        if sent0 is not None:  # what really crossed the link (compressed features + token ids)
            result.bytes_up = self.ctx.verifier.bytes_sent - sent0  # type: ignore[union-attr]
        outs.append(self._caption_item(item, result.text, f"{self.model.name}+verified", 1, True, {
            "rounds": result.rounds, "target_passes": result.target_passes,
            "accepted": result.accepted_tokens, "drafted": result.drafted_tokens,
            "bytes_up": result.bytes_up, "gamma": self._gamma()}))
        return outs

    def _gamma(self) -> int:
        if self.gamma_opt != "auto":
            return int(self.gamma_opt)
        from aiflow_stream.models.speculative import choose_gamma

        if self._rtt_ema is None or self._accept_ema is None:
            return 4
        return choose_gamma(self._rtt_ema, self._accept_ema, 0.002, 0.01, free_tokens=self._free)

    def _speculate(self, item: Item, feats: np.ndarray, drafter: Any) -> Any:
        from aiflow_stream.models.speculative import VerifyResult, speculative_generate

        assert self.ctx.verifier is not None
        session = f"{item.stream}:{item.seq}:{next(self._session)}"
        forward_packet = item.kind is ItemKind.PACKET

        def verify_call(session_id: str, prefix_len: int, draft_ids: list[int], features: Any) -> VerifyResult:
            meta: dict[str, Any] = {"op": "verify", "session": session_id, "prefix_len": prefix_len,
                                    "draft": [int(t) for t in draft_ids]}
            parts = None
            if features is not None:
                meta["op"] = "open"
                if forward_packet:  # forward the device's compressed features untouched
                    meta["packet"] = item.meta["packet"]
                    parts = list(item.parts)
                else:
                    parts = [np.ascontiguousarray(features, np.float32)]
            t0 = time.perf_counter()
            reply = self.ctx.verifier.call(meta, parts)  # type: ignore[union-attr]
            rtt = time.perf_counter() - t0
            self._rtt_ema = rtt if self._rtt_ema is None else 0.8 * self._rtt_ema + 0.2 * rtt
            if "error" in reply:
                raise ModelError(f"verifier refused session {session_id}: {reply['error']}")
            return VerifyResult(accepted=int(reply["accepted"]), correction=reply.get("correction"),
                                done=bool(reply["done"]), forward_passes=int(reply.get("forward_passes", 1)),
                                resend=bool(reply.get("resend", False)))

        result = speculative_generate(drafter, verify_call, feats, gamma=self._gamma(), session_id=session,
                                      started=True)
        if result.drafted_tokens:
            rate = result.accepted_tokens / result.drafted_tokens
            self._accept_ema = rate if self._accept_ema is None else 0.8 * self._accept_ema + 0.2 * rate
        try:
            self.ctx.verifier.call({"op": "close", "session": session}, None)
        except Exception:  # closing is best effort; the verifier evicts idle sessions itself
            self.ctx.log.debug("verifier close failed for %s", session)
        return result


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
                    fake = Item(ItemKind.PACKET, str(meta.get("session")), 0, 0, parts, {"packet": meta["packet"]})
                    content, feats = decode_packet(fake, self._codec_state)
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
