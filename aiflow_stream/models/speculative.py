"""Speculative decoding split across processes: the edge drafts, the cloud verifies.

The edge runs the small *draft* decoder (:class:`Drafter`), the cloud the large *target*
decoder (:class:`Verifier`); both read the same vision features. A key frame's features travel
to the cloud once (``Verifier.open``); after that each round carries only token ids: the edge
sends ``gamma`` drafted tokens, the cloud checks them in ONE forward pass of the target decoder
over its KV cache and answers with the number it accepts plus its own next token (the
correction, or a bonus token when all were accepted). Greedy acceptance keeps the result equal
to the target's own greedy caption.

These are in-process classes; the runtime carries ``verify_call`` over the network. Nothing
here opens a socket.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgpack
import numpy as np

from aiflow_stream.errors import ModelError
from aiflow_stream.models.adapters import Captioner, DecoderState

logger = logging.getLogger(__name__)

MAX_GAMMA = 16  # the default family leaves 16 positions past the longest caption


@dataclass(frozen=True)
class VerifyResult:
    """The cloud's answer to one round.

    ``accepted`` draft tokens were right; ``correction`` is the target's token after them
    (None when the caption ended inside the draft or hit the length limit); ``done`` says the
    caption is complete. ``resend`` asks the edge to send the features again (the cloud lost the
    session: evicted or restarted); nothing was verified then.
    """

    accepted: int
    correction: int | None
    done: bool
    forward_passes: int
    resend: bool = False


VerifyCall = Callable[[str, int, list[int], "np.ndarray | None"], VerifyResult]


@dataclass
class _Session:
    state: DecoderState
    ids: list[int]  # committed tokens, prompt included; the last one is not in the cache yet
    touched: float


class Verifier:
    """Cloud side: holds one target-decoder KV cache per session (one key frame's caption).

    Sessions are evicted least-recently-used beyond ``max_sessions`` and after ``ttl_s``
    seconds without a call, so memory stays bounded whatever the edges do. Thread-safe.
    """

    def __init__(
        self,
        target: Captioner,
        *,
        max_sessions: int = 64,
        ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._clock = clock
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, session_id: str, features: np.ndarray) -> None:
        """Start (or restart) a session on one image's features ``(T, D)`` or ``(1, T, D)``."""
        state = self.target.start(features)
        with self._lock:
            self._expire()
            self._sessions.pop(session_id, None)
            self._sessions[session_id] = _Session(state, list(self.target.prompt_ids), self._clock())
            while len(self._sessions) > self.max_sessions:
                old, _ = self._sessions.popitem(last=False)
                self.evicted += 1
                logger.debug("evicted session %s (LRU bound %d)", old, self.max_sessions)

    def close(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def verify(self, session_id: str, prefix_len: int, draft_ids: Sequence[int]) -> VerifyResult:
        """Check ``draft_ids`` drafted after the first ``prefix_len`` committed caption tokens
        (prompt excluded) in one target forward pass.

        A repeated round (the edge retrying after a lost answer) rolls back to ``prefix_len``
        first, so a retry gets the same answer. An unknown session answers ``resend=True``.
        """
        with self._lock:
            self._expire()
            s = self._sessions.get(session_id)
            if s is None:
                return VerifyResult(0, None, False, 0, resend=True)
            self._sessions.move_to_end(session_id)
            s.touched = self._clock()
            result = self._verify(s, prefix_len, list(draft_ids))
            if result.done:
                del self._sessions[session_id]
            return result

    def __call__(
        self, session_id: str, prefix_len: int, draft_ids: list[int], features: np.ndarray | None = None
    ) -> VerifyResult:
        """One round as the runtime delivers it: features (first round only) plus draft ids."""
        if features is not None:
            self.open(session_id, features)
        return self.verify(session_id, prefix_len, draft_ids)

    def _verify(self, s: _Session, prefix_len: int, draft: list[int]) -> VerifyResult:
        tgt = self.target
        p = len(tgt.prompt_ids)
        if not 0 <= prefix_len <= len(s.ids) - p:
            raise ModelError(
                f"verify: edge says {prefix_len} tokens are committed but the cloud holds "
                f"{len(s.ids) - p}; the session is out of step (restart it with open())"
            )
        if prefix_len < len(s.ids) - p:  # a retried round: roll back
            del s.ids[p + prefix_len :]
            s.state.crop(min(s.state.length, len(s.ids) - 1))
        room = tgt.max_length - len(s.ids)  # tokens still allowed after the committed ones
        if room <= 0:
            return VerifyResult(0, None, True, 0)
        draft = draft[:room]
        if any(not 0 <= t < tgt.vocab_size for t in draft):
            raise ModelError(f"verify: draft token ids must lie in [0, {tgt.vocab_size}), got {draft}")
        # Feed the committed tokens the cache lacks (normally just the last one) and the draft.
        pending = s.ids[s.state.length :]
        logits = s.state.feed([*pending, *draft])
        preds = logits[len(pending) - 1 :].argmax(-1).tolist()
        eos = tgt.eos_id
        accepted = 0
        while accepted < len(draft) and preds[accepted] == draft[accepted]:
            accepted += 1
            if draft[accepted - 1] == eos:
                break
        s.ids.extend(draft[:accepted])
        s.state.crop(len(s.ids))  # keys/values of rejected draft tokens go
        if accepted and draft[accepted - 1] == eos:
            return VerifyResult(accepted, None, True, 1)
        if len(s.ids) >= tgt.max_length:
            return VerifyResult(accepted, None, True, 1)
        correction = int(preds[accepted])
        s.ids.append(correction)
        done = correction == eos or len(s.ids) >= tgt.max_length
        return VerifyResult(accepted, correction, done, 1)

    def _expire(self) -> None:
        now = self._clock()
        while self._sessions:
            sid, s = next(iter(self._sessions.items()))
            if now - s.touched <= self.ttl_s:
                break
            del self._sessions[sid]
            self.evicted += 1
            logger.debug("expired session %s (idle > %.1f s)", sid, self.ttl_s)


class Drafter:
    """Edge side: the draft decoder's greedy continuation of the committed caption.

    Drafted tokens are kept: when the cloud's bonus token equals the next one already drafted,
    the draft goes on without recomputation, so the edge's own full caption (revision 0,
    :meth:`caption`) costs nothing extra when it is then verified.
    """

    def __init__(self, draft: Captioner, max_length: int | None = None) -> None:
        self.model = draft
        self.max_length = max_length if max_length is not None else draft.max_length
        self._state: DecoderState | None = None
        self._ids: list[int] = []
        self._buffer: list[int] = []
        self.forward_passes = 0

    def start(self, features: np.ndarray) -> None:
        """Begin a caption for one image's features ``(T, D)``."""
        self._state = self.model.start(features)
        self._ids = list(self.model.prompt_ids)
        self._buffer = []
        self.forward_passes = 0

    def seed(self, caption_ids: Sequence[int]) -> None:
        """Take the draft model's own greedy caption (no prompt, no EOS), computed elsewhere,
        e.g. by a batched ``decode_ids`` over several key frames, as already drafted. Nothing
        is in the cache yet: the next forward pass that needs one fills it in one go."""
        if self._state is None:
            raise ModelError("Drafter.seed() before start()")
        ids = [int(t) for t in caption_ids]
        room = self.max_length - len(self._ids)
        self._buffer = (ids + [self.model.eos_id])[:room]

    @property
    def committed(self) -> list[int]:
        """Caption tokens confirmed by the cloud (prompt excluded)."""
        return self._ids[len(self.model.prompt_ids) :]

    def draft(self, gamma: int) -> list[int]:
        """The next ``gamma`` greedy draft tokens (fewer at EOS or the length limit)."""
        if self._state is None:
            raise ModelError("Drafter.draft() before start()")
        eos = self.model.eos_id
        while len(self._buffer) < gamma:
            if self._buffer and self._buffer[-1] == eos:
                break
            if len(self._ids) + len(self._buffer) >= self.max_length:
                break
            seq = self._ids + self._buffer
            logits = self._state.feed(seq[self._state.length :])
            self.forward_passes += 1
            self._buffer.append(int(logits[-1].argmax()))
        return self._buffer[:gamma]

    def accept(self, n_accepted: int, correction: int | None) -> None:
        """Commit the first ``n_accepted`` drafted tokens and the cloud's correction."""
        if self._state is None:
            raise ModelError("Drafter.accept() before start()")
        if not 0 <= n_accepted <= len(self._buffer):
            raise ModelError(f"accepted {n_accepted} of {len(self._buffer)} drafted tokens")
        base = len(self._ids)
        self._ids.extend(self._buffer[:n_accepted])
        rest = self._buffer[n_accepted:]
        if correction is None:
            self._buffer = []
        else:
            self._ids.append(correction)
            if rest and rest[0] == correction:
                self._buffer = rest[1:]  # the draft still agrees: keep it and its cache
                return
            self._buffer = []
        self._state.crop(min(self._state.length, base + n_accepted))

    def caption(self) -> list[int]:
        """The draft model's own full greedy caption from the committed tokens (no EOS)."""
        toks = self.draft(self.max_length)
        eos = self.model.eos_id
        return self.committed + (toks[: toks.index(eos)] if eos in toks else toks)


@dataclass
class SpecResult:
    """A verified caption and what it cost."""

    ids: list[int]
    text: str
    rounds: int
    target_passes: int
    accepted_tokens: int
    drafted_tokens: int
    bytes_up: int
    draft_passes: int = 0
    round_gammas: list[int] = field(default_factory=list)
    closed_by_cloud: bool = False  # False: the cloud may still hold the session (close it)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


def features_wire_bytes(features: np.ndarray) -> int:
    """Bytes of one key frame's features on the wire: float16 payload plus a small header."""
    return int(np.asarray(features).size) * 2 + len(
        msgpack.packb({"dtype": "float16", "shape": list(np.asarray(features).shape)})
    )


def round_wire_bytes(session_id: str, prefix_len: int, draft_ids: Sequence[int]) -> int:
    """Bytes of one verify round's request (msgpack-sized)."""
    return len(msgpack.packb([session_id, prefix_len, [int(t) for t in draft_ids]]))


class _Speculation:
    """One caption's speculative decoding as a state machine: :meth:`request` gives the next
    round to send (None when the caption is complete), :meth:`reply` takes the cloud's answer.
    :func:`speculative_generate` runs one; :func:`speculative_generate_many` runs several in
    lockstep so their rounds share round trips."""

    def __init__(self, drafter: Drafter, features: np.ndarray, gamma: int, max_new_tokens: int | None,
                 session_id: str | None, started: bool) -> None:
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        self.drafter = drafter
        self.features = features
        self.gamma = gamma
        self.sid = session_id or uuid.uuid4().hex
        if not started:
            drafter.start(features)
        self.prompt = len(drafter.model.prompt_ids)
        self.limit = drafter.max_length if max_new_tokens is None else min(drafter.max_length,
                                                                         self.prompt + max_new_tokens)
        self.passes = self.rounds = self.accepted = self.drafted = self.bytes_up = 0
        self.gammas: list[int] = []
        self._send: np.ndarray | None = features
        self._resends = 0
        self._replay = 0
        self._draft: list[int] = []
        self.finished = False
        self.closed_by_cloud = False  # the cloud said done, so it has already dropped the session

    def request(self) -> tuple[str, int, list[int], np.ndarray | None] | None:
        if self.finished:
            return None
        committed = self.drafter.committed
        room = self.limit - self.prompt - len(committed)
        if room <= 0:
            self.finished = True
            return None
        self._draft = self.drafter.draft(min(self.gamma, room))
        # After a lost session the committed tokens are replayed as draft: the cloud accepts
        # them all (they are its own greedy tokens) in the same single pass.
        replay = committed if self._resends else []
        self._replay = len(replay)
        prefix = len(committed) - len(replay)
        if self._send is not None:
            self.bytes_up += features_wire_bytes(self._send)
        self.bytes_up += round_wire_bytes(self.sid, prefix, [*replay, *self._draft])
        return self.sid, prefix, [*replay, *self._draft], self._send

    def reply(self, res: VerifyResult) -> None:
        self.rounds += 1
        self.passes += res.forward_passes
        if res.resend:
            self._resends += 1
            if self._resends > 2:
                raise ModelError(f"cloud lost session {self.sid} again after the features were resent")
            self._send = self.features
            return
        self._send = None
        new = res.accepted - self._replay
        if new < 0:
            raise ModelError(f"cloud rejected replayed tokens of session {self.sid}; models out of step")
        self._resends = 0
        self.accepted += new
        self.drafted += len(self._draft)
        self.gammas.append(len(self._draft))
        self.drafter.accept(new, res.correction)
        if res.done:
            self.finished = self.closed_by_cloud = True

    def result(self) -> SpecResult:
        ids = self.drafter.committed[: self.limit - self.prompt]
        eos = self.drafter.model.eos_id
        if eos in ids:
            ids = ids[: ids.index(eos)]
        return SpecResult(
            ids=ids,
            text=self.drafter.model.text(ids),
            rounds=self.rounds,
            target_passes=self.passes,
            accepted_tokens=self.accepted,
            drafted_tokens=self.drafted,
            bytes_up=self.bytes_up,
            draft_passes=self.drafter.forward_passes,
            round_gammas=self.gammas,
            closed_by_cloud=self.closed_by_cloud,
        )


def speculative_generate(
    drafter: Drafter,
    verify_call: VerifyCall,
    features: np.ndarray,
    gamma: int,
    max_new_tokens: int | None = None,
    *,
    session_id: str | None = None,
    started: bool = False,
) -> SpecResult:
    """Greedy caption of the target model, drafted by ``drafter`` and verified by
    ``verify_call(session_id, prefix_len, draft_ids, features_or_None)`` (in-process in tests,
    over the network in the runtime). The features go with the first round only (again if
    the cloud answers ``resend``). ``started=True`` keeps a drafter already started on these
    features (e.g. after publishing its own draft caption).
    """
    spec = _Speculation(drafter, features, gamma, max_new_tokens, session_id, started)
    while (req := spec.request()) is not None:
        spec.reply(verify_call(*req))
    return spec.result()


VerifyMany = Callable[[list[tuple[str, int, list[int], "np.ndarray | None"]]], list[VerifyResult]]


def speculative_generate_many(
    drafters: Sequence[Drafter],
    verify_many: VerifyMany,
    features: Sequence[np.ndarray],
    gammas: Sequence[int],
    *,
    session_ids: Sequence[str | None] | None = None,
    started: bool = False,
    on_done: Callable[[int, SpecResult], None] | None = None,
) -> list[SpecResult]:
    """:func:`speculative_generate` for several captions in lockstep: each round drafts for
    every unfinished caption, then sends all their rounds at once through
    ``verify_many(requests) -> results`` (one round trip for all), so N captions cost about as
    many round trips as the longest one alone. Each result equals its caption's own
    :func:`speculative_generate` result (the target's greedy caption). ``on_done(i, result)``
    is called as soon as caption ``i`` is complete, while longer ones go on."""
    sids = list(session_ids) if session_ids is not None else [None] * len(drafters)
    if not len(drafters) == len(features) == len(gammas) == len(sids):
        raise ValueError("speculative_generate_many: drafters, features, gammas and session ids differ in length")
    specs = [_Speculation(d, f, g, None, sid, started) for d, f, g, sid in zip(drafters, features, gammas, sids)]
    done: dict[int, SpecResult] = {}

    def finish(i: int) -> None:
        if i not in done:
            done[i] = specs[i].result()
            if on_done is not None:
                on_done(i, done[i])

    while True:
        live = []
        for i, spec in enumerate(specs):
            req = spec.request()
            if req is not None:
                live.append((i, req))
            else:
                finish(i)
        if not live:
            break
        results = verify_many([req for _, req in live])
        if len(results) != len(live):
            raise ModelError(f"verifier answered {len(results)} of {len(live)} rounds")
        for (i, _), res in zip(live, results):
            specs[i].reply(res)
        for i, _ in live:
            if specs[i].finished:  # publish it now, before drafting the next round of the others
                finish(i)
    return [done[i] for i in range(len(specs))]


def draft_caption(draft: Captioner, features: np.ndarray) -> str:
    """The edge's own greedy caption (published at once as revision 0)."""
    return draft.decode(np.asarray(features).reshape(1, *draft.feature_shape))[0]


def expected_tokens(gamma: int, acceptance_rate: float) -> float:
    """Tokens committed per round with ``gamma`` drafts each accepted with probability
    ``acceptance_rate`` independently (the accepted run plus the target's own token)."""
    a = min(max(acceptance_rate, 0.0), 1.0)
    if a >= 1.0:
        return float(gamma + 1)
    return (1.0 - a ** (gamma + 1)) / (1.0 - a)


def choose_gamma(
    rtt_s: float,
    acceptance_rate: float,
    t_draft_token_s: float,
    t_verify_s: float,
    *,
    max_gamma: int = MAX_GAMMA,
    free_tokens: int = 0,
) -> int:
    """Draft length maximising committed tokens per second of a round
    (``gamma`` drafts + one round trip + one verify pass). Long round trips and high
    acceptance favour long drafts; a slow drafter or poor acceptance favours short ones.
    ``free_tokens`` are already drafted (e.g. the published draft caption) and cost nothing."""
    best, best_rate = 1, -math.inf
    for g in range(1, max(1, max_gamma) + 1):
        t = max(g - free_tokens, 0) * max(t_draft_token_s, 0.0) + max(rtt_s, 0.0) + max(t_verify_s, 0.0)
        rate = expected_tokens(g, acceptance_rate) / t if t > 0 else float(g)
        if rate > best_rate + 1e-12:
            best, best_rate = g, rate
    return best
