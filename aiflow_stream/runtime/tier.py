"""One tier process: the sub-graph of one tier, its queues, threads and links.

Each step runs in its own thread and reads a bounded queue; cross-tier edges go through one
egress thread per destination tier (an :class:`Outlet`, credit flow control) and one ingress
thread (an :class:`Inlet`) that routes arriving messages to the consuming step and returns
the link credit when that step is done with the item. End of stream flows through the graph:
a step closes when every upstream it has (local steps, remote peers) has sent EOS, and the tier
returns once every step and link has drained.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiflow_stream.errors import AiflowError, RuntimeFault, TransportError, WireError
from aiflow_stream.graph import Pipeline, Step, StreamType, Tier
from aiflow_stream.operators.base import Operator, OperatorContext, PartialBatchError, create
from aiflow_stream.runtime.items import Counters, DropReason, Item, ItemKind
from aiflow_stream.runtime.queues import BoundedQueue, Closed
from aiflow_stream.sources.base import Policy

log = logging.getLogger(__name__)


def quiet_threads() -> None:
    """One compute thread per stage; passive OpenMP waits so Numba/torch never spin.

    Must run before numba or torch is imported: on a loaded 2-core machine the default active
    wait policy makes every parallel region cost milliseconds.
    """
    for key, value in (("OMP_WAIT_POLICY", "PASSIVE"), ("KMP_BLOCKTIME", "0"), ("NUMBA_NUM_THREADS", "1"),
                       ("OMP_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                       # model loading reports and progress bars belong to the CLI, not to every tier
                       ("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(key, value)


@dataclass
class TierOptions:
    listen: str | None = None  # address this tier binds (if it receives links)
    peers: dict[Tier, str] = field(default_factory=dict)  # where the other tiers listen
    publish: str | None = None  # default PUB address for publish steps
    source: str | None = None  # overrides every capture step's source
    frames: int | None = None  # stop each capture after this many frames
    stream: str | None = None  # stream id of this tier's captures (one device per camera)
    expect_peers: int = 1  # instances of each upstream tier (e.g. 16 device processes)
    window_msgs: int = 8
    window_bytes: int = 64 << 20
    connect_timeout: float = 60.0
    torch_device: str = "cpu"
    torch_dtype: str | None = None
    torch_threads: int = 1
    metrics_path: str | None = None
    curve_dir: str | None = None  # CurveZMQ keys (see runtime.keys); None = plaintext links
    metrics_every: float = 10.0


class _StepRunner:
    def __init__(self, rt: TierRuntime, step: Step, op: Operator, queue: BoundedQueue | None, eos_needed: int) -> None:
        self.rt = rt
        self.step = step
        self.op = op
        self.queue = queue
        self.eos_needed = eos_needed
        self.eos_from: set[tuple[str, Any]] = set()  # (upstream step, peer) that sent EOS
        self.thread = threading.Thread(target=self._run, name=f"step-{step.id}", daemon=True)
        self.busy_s = 0.0
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            if self.step.kind == "capture":
                self._run_capture()
            elif self.step.kind == "verifier":
                self._run_service()
            else:
                self._run_transform()
        except Closed:
            pass
        except BaseException as err:  # a fault in a step stops the tier with a clear report
            self.error = err
            log.exception("tier %s step %s failed", self.rt.tier.value, self.step.id)
            self.rt.fail(err)

    def _run_capture(self) -> None:
        limit = self.rt.opts.frames
        count = 0
        op: Any = self.op
        while not self.rt.stopping.is_set() and not self.rt.draining.is_set():
            item = op.read(timeout=0.5)
            if item is None:
                continue
            if item.kind is ItemKind.EOS or (limit is not None and count >= limit):
                break
            count += 1
            self.rt.counters.add(f"{self.step.id}.out")
            self.rt.emit(self.step, item)
        self.op.close()
        self.rt.emit(self.step, Item.eos(op.stream, self.step.id))

    def _last_eos(self, item: Item) -> bool:
        """Count an EOS once per upstream (step, peer); True when every upstream has ended.

        A repeated EOS from the same sender (a restarted or misbehaving peer) must not end the
        stream for the other peers that are still sending."""
        key = (item.origin, item.meta.get("_peer"))
        if key in self.eos_from:
            log.warning("tier %s step %s: repeated EOS from %s ignored", self.rt.tier.value, self.step.id, key)
        self.eos_from.add(key)
        return len(self.eos_from) >= self.eos_needed

    def _run_transform(self) -> None:
        assert self.queue is not None
        while True:
            item = self.queue.get(timeout=0.5)
            if item is None:
                if self.rt.stopping.is_set():
                    return
                continue
            if item.kind is ItemKind.EOS:
                if self._end(item):
                    return
                continue
            batch, eos = [item], None
            while len(batch) < self.op.max_batch:  # take what is already queued, never wait
                try:
                    more = self.queue.get(timeout=0)
                except Closed:  # stopping: finish what was taken; the next get() ends the step
                    break
                if more is None:
                    break
                if more.kind is ItemKind.EOS:
                    eos = more
                    break
                batch.append(more)
            self._process(batch)
            if eos is not None and self._end(eos):
                return

    def _end(self, eos: Item) -> bool:
        """Handle an EOS; True when it was the last upstream's (the step has ended)."""
        if not self._last_eos(eos):
            return False
        for out in self.op.close():
            self.rt.emit(self.step, out)
        self.rt.emit(self.step, Item.eos(eos.stream, self.step.id))
        return True

    def _process(self, batch: list[Item]) -> None:
        self.rt.counters.add(f"{self.step.id}.in", len(batch))
        if len(batch) > 1:
            self.rt.counters.add(f"{self.step.id}.batches")
        t0 = time.perf_counter()
        outs: list[Item] = []
        try:
            if len(batch) == 1:
                outs = self._process_one(batch[0])
            else:
                try:
                    outs = self.op.process_batch(batch)
                except PartialBatchError as err:
                    for k, it in enumerate(batch):
                        if k not in err.finished:
                            self.rt.item_failed(self.step, it, err.cause)
                except Exception as err:  # find the bad item(s): one by one, each dropped alone
                    log.info("tier %s step %s: a batch of %d failed (%s); retrying one by one",
                             self.rt.tier.value, self.step.id, len(batch), err)
                    outs = [out for it in batch for out in self._process_one(it)]
        finally:
            for it in batch:
                it.done()
        self.busy_s += time.perf_counter() - t0
        for out in outs:
            out.stamps.setdefault(self.step.id, time.time_ns())
            self.rt.emit(self.step, out)

    def _process_one(self, item: Item) -> list[Item]:
        try:
            return self.op.process(item)
        except Exception as err:  # one bad item (often a peer's) is dropped, never fatal
            self.rt.item_failed(self.step, item, err)
            return []

    def _run_service(self) -> None:
        assert self.queue is not None
        op: Any = self.op
        while True:
            item = self.queue.get(timeout=0.5)
            if item is None:
                if self.rt.stopping.is_set():
                    return
                continue
            if item.kind is ItemKind.EOS:
                if self._last_eos(item):
                    return
                continue
            peer = item.meta.pop("_peer", None)
            if item.kind is not ItemKind.REQUEST or peer is None:
                self.rt.counters.add(f"{self.step.id}.{DropReason.INVALID.value}")
                log.warning("tier %s step %s: dropped a %s item from %r; a verifier only answers requests",
                            self.rt.tier.value, self.step.id, item.kind.value, item.origin)
                item.done()
                continue
            t0 = time.perf_counter()
            try:
                reply = op.handle(peer.hex() if isinstance(peer, bytes) else str(peer), item.meta, item.parts)
            except Exception as err:  # answered as an error; the caller decides what to do
                reply = {"error": str(err)}
                self.rt.item_failed(self.step, item, err)
            finally:
                item.done()
            self.busy_s += time.perf_counter() - t0
            self.rt.counters.add(f"{self.step.id}.calls")
            self.rt.reply(peer, item, reply)


class TierRuntime:
    """Runs the steps of ``tier`` of ``pipeline`` in this process until end of stream or stop."""

    def __init__(self, pipeline: Pipeline, tier: Tier | str, opts: TierOptions | None = None) -> None:
        self.pipeline = pipeline
        self.tier = Tier(tier)
        self.opts = opts or TierOptions()
        self.counters = Counters()
        self.stopping = threading.Event()  # hard stop: queues close, threads leave at once
        self.draining = threading.Event()  # soft stop: captures end, EOS flows, work in flight drains
        self._drain_deadline: float | None = None
        self._failure: BaseException | None = None
        self._runners: dict[str, _StepRunner] = {}
        self._egress: dict[Tier, tuple[BoundedQueue, Any, threading.Thread]] = {}
        self._rpc: dict[str, Any] = {}
        self._inlet: Any = None
        self._ingress: threading.Thread | None = None
        self._sinks: list[Any] = []
        self._started = time.monotonic()
        self.steps = pipeline.steps_on(self.tier)
        if not self.steps:
            raise RuntimeFault(f"tier {self.tier.value!r} has no steps in pipeline {pipeline.name!r}")

    # ----------------------------------------------------------------- wiring
    def _policy(self, step: Step) -> Policy:
        return step.queue.policy or self.pipeline.source_policy(step.id, self.opts.source)

    def _staleness(self, step: Step) -> float | None:
        if step.kind == "publish":
            return None  # a caption is worth delivering however late; staleness guards work
        if step.queue.max_staleness is not None:
            return step.queue.max_staleness
        caps = [s for s in self.pipeline.steps if s.kind == "capture"]
        vals = [float(s.options.get("max_staleness", 1.0)) for s in caps]
        return max(vals) if vals else None

    def _eos_needed(self, step: Step) -> int:
        n = 0
        if step.kind == "verifier":
            for s in self.pipeline.steps:
                if any(i.producer == step.id for i in s.inputs):
                    n += self.opts.expect_peers if s.tier is not self.tier else 1
            return n
        for i in step.inputs:
            if i.type is StreamType.SERVICE:
                continue
            src = self.pipeline.step(i.producer)
            n += self.opts.expect_peers if src.tier is not self.tier else 1
        return max(n, 1)

    def _context(self, step: Step) -> OperatorContext:
        opts = dict(step.options)
        if step.kind == "capture":
            if self.opts.source:
                opts["source"] = self.opts.source
            if self.opts.stream:
                opts["stream"] = self.opts.stream
        adapter = logging.LoggerAdapter(logging.getLogger(f"aiflow_stream.operators.{step.kind}"),
                                        {"tier": self.tier.value, "step": step.id})
        return OperatorContext(tier=self.tier.value, step=step.id, options=opts, counters=self.counters,
                               log=adapter, torch_device=self.opts.torch_device, torch_dtype=self.opts.torch_dtype)

    def setup(self, progress: Any = None) -> None:
        """Create operators (models load here), queues, links. ``progress(msg)`` reports each step."""
        from aiflow_stream.operators import load_all
        from aiflow_stream.runtime.links import LocalVerifier, RemoteVerifier

        load_all()  # the built-in kinds, even if a graph file registered its own operators first
        self._torch_threads()
        needs_inlet = any(ln.dst is self.tier and not ln.rpc for ln in self.pipeline.links()) or any(
            ln.rpc and ln.src is self.tier for ln in self.pipeline.links())
        ops: dict[str, Operator] = {}
        # Verifiers first: a caption step in the same tier calls them directly.
        order = sorted(self.steps, key=lambda s: 0 if s.kind == "verifier" else 1)
        for step in order:
            if progress:
                progress(f"[{self.tier.value}] setting up {step.id} ({step.kind})")
            ctx = self._context(step)
            if step.kind == "publish":
                ctx.sink = self._open_sink(step)
            if step.kind == "caption":
                svc = next((i for i in step.inputs if i.type is StreamType.SERVICE), None)
                if svc is not None:
                    vstep = self.pipeline.step(svc.producer)
                    if vstep.tier is self.tier:
                        ctx.verifier = LocalVerifier(ops[vstep.id])
                    else:
                        outlet = self._outlet(vstep.tier, identity=f"{self._sender_id()}-{step.id}-rpc")
                        ctx.verifier = RemoteVerifier(outlet, link=step.id, stream=step.id)
                        self._rpc[step.id] = ctx.verifier
                ctx.extras["emit"] = lambda it, _s=step: self._emit_now(_s, it)
            # ``operator=`` picks another registered implementation of the step (tests, plug-ins).
            op = create(str(step.options.get("operator") or step.kind), ctx)
            op.setup()
            ops[step.id] = op
            self._torch_threads()
        for step in self.steps:
            queue = None
            if step.kind != "capture":
                queue = BoundedQueue(f"{step.id}.in", max_items=step.queue.max_items, max_bytes=step.queue.max_bytes,
                                     policy=self._policy(step), max_staleness=self._staleness(step),
                                     drops=self.counters)
            self._runners[step.id] = _StepRunner(self, step, ops[step.id], queue, self._eos_needed(step))
        for ln in self.pipeline.links():
            if ln.src is self.tier and not ln.rpc and ln.dst not in self._egress:
                self._open_egress(ln.dst)
        if needs_inlet:
            self._open_inlet()

    def _torch_threads(self) -> None:
        """Apply ``torch_threads`` once a step has imported torch (a tier without models never
        pays the seconds that importing it costs)."""
        torch = sys.modules.get("torch")
        if torch is not None and torch.get_num_threads() != max(1, self.opts.torch_threads):
            torch.set_num_threads(max(1, self.opts.torch_threads))

    def _emit_now(self, step: Step, item: Item) -> None:
        item.stamps.setdefault(step.id, time.time_ns())
        self.emit(step, item)

    def _sender_id(self) -> str:
        """Unique per sending process (several edges may call one cloud), stable across restarts
        when a stream id is given (the receiver then hands the session over to the new process)."""
        return f"{self.tier.value}-{self.opts.stream or os.getpid()}"

    def _outlet(self, dst: Tier, identity: str) -> Any:
        from aiflow_stream.transport.link import Outlet

        addr = self.opts.peers.get(dst) or self.pipeline.addresses.get(dst)
        if not addr:
            raise RuntimeFault(f"tier {self.tier.value!r} must reach tier {dst.value!r} but has no address for it; "
                               f"pass --peer {dst.value}=tcp://HOST:PORT")
        curve = None
        if self.opts.curve_dir:
            from aiflow_stream.runtime.keys import client_keys

            curve = client_keys(self.opts.curve_dir, self.tier, dst)
        return Outlet(addr, window_msgs=self.opts.window_msgs, window_bytes=self.opts.window_bytes,
                      identity=identity, connect_timeout=self.opts.connect_timeout, curve=curve)

    def _open_egress(self, dst: Tier) -> None:
        outlet = self._outlet(dst, identity=f"{self._sender_id()}-{dst.value}")
        producers = [self.pipeline.step(ln.producer) for ln in self.pipeline.links() if ln.src is self.tier
                     and ln.dst is dst and not ln.rpc]
        policy = Policy.LATEST if any(self._policy(p) is Policy.LATEST for p in producers) else Policy.BLOCK
        q = BoundedQueue(f"egress-{dst.value}", max_items=max(2, self.opts.window_msgs), policy=policy,
                         max_staleness=self._staleness(producers[0]) if producers else None, drops=self.counters)
        pending_eos = {p.id for p in producers}
        t = threading.Thread(target=self._egress_loop, args=(dst, q, outlet, pending_eos), name=f"egress-{dst.value}",
                             daemon=True)
        self._egress[dst] = (q, outlet, t)

    def _egress_loop(self, dst: Tier, q: BoundedQueue, outlet: Any, pending_eos: set[str]) -> None:
        from aiflow_stream.runtime.links import item_to_message

        link_seq: dict[str, int] = {}  # per stream: consecutive, so the receiver can count gaps
        warned = 0.0
        try:
            while pending_eos:
                item = q.get(timeout=0.5)
                if item is None:
                    if self.stopping.is_set():
                        return
                    continue
                try:
                    seq = link_seq.get(item.stream, 0)
                    msg = item_to_message(item, item.origin, seq=seq)
                    # Short sends, so a stop is seen even while the receiver withholds credit or
                    # is away; a receiver that is away (restarting) is waited for, not fatal.
                    since = time.monotonic()
                    while True:
                        tried = time.monotonic()
                        try:
                            # A backlog goes out in batches; the last queued item flushes it.
                            outlet.send(msg, timeout=0.5, flush=len(q) == 0 or item.kind is ItemKind.EOS)
                            break
                        except TransportError as err:
                            # A receiver gone past its peer_timeout fails every send at once: wait
                            # out the try instead of spinning (the Outlet's heartbeat thread still
                            # handles the reconnect meanwhile).
                            if self.stopping.wait(max(0.0, 0.5 - (time.monotonic() - tried))):
                                return
                            now = time.monotonic()
                            if now - since > 10.0 and now - warned > 60.0:  # slow is normal; stuck is not
                                warned = now
                                log.warning("tier %s: tier %s has taken nothing for %.0f s: %s", self.tier.value,
                                            dst.value, now - since, err)
                    link_seq[item.stream] = seq + 1
                    # Data and end-of-stream are counted apart, so every frame can be accounted for.
                    self.counters.add(f"egress-{dst.value}.{'eos' if item.kind is ItemKind.EOS else 'sent'}")
                    self.counters.add(f"egress-{dst.value}.bytes", item.nbytes)
                finally:
                    item.done()
                if item.kind is ItemKind.EOS:
                    pending_eos.discard(item.origin)
        except Closed:
            pass
        except BaseException as err:
            log.exception("tier %s: link to %s failed", self.tier.value, dst.value)
            self.fail(err)

    def _open_inlet(self) -> None:
        from aiflow_stream.transport.link import Inlet

        addr = self.opts.listen or self.opts.peers.get(self.tier) or self.pipeline.addresses.get(self.tier)
        if not addr:
            raise RuntimeFault(f"tier {self.tier.value!r} receives from other tiers but has no listen address; "
                               f"pass --listen tcp://0.0.0.0:PORT")
        curve = None
        if self.opts.curve_dir:
            from aiflow_stream.runtime.keys import server_keys

            curve = server_keys(self.opts.curve_dir, self.tier)
        self._inlet = Inlet(addr, window_msgs=self.opts.window_msgs, window_bytes=self.opts.window_bytes,
                            curve=curve)
        self._ingress = threading.Thread(target=self._ingress_loop, name="ingress", daemon=True)

    def _ingress_loop(self) -> None:
        from aiflow_stream.runtime.links import message_to_item

        inlet = self._inlet
        while not self.stopping.is_set() and any(r.thread.is_alive() for r in self._runners.values()
                                                 if r.queue is not None):
            got = inlet.recv(timeout=0.2)
            if got is None:
                continue
            peer, msg = got
            nbytes = msg.nbytes
            try:
                item = message_to_item(msg)
            except WireError as err:  # valid on the wire, but nothing this runtime takes
                self._invalid(peer, str(err))
                inlet.release(peer, nbytes)
                continue
            item.on_done = (lambda p=peer, n=nbytes: inlet.release(p, n))
            targets = self._route_remote(item)
            if not targets:
                self._invalid(peer, f"message for unknown link {item.origin!r}")
                item.done()
                continue
            if item.kind in (ItemKind.REQUEST, ItemKind.EOS):
                item.meta["_peer"] = peer  # whom to answer; whose end of stream it is
            try:
                for runner, one in zip(targets, _fan_out(item, len(targets))):
                    self._deliver(runner, one)
            except Closed:  # stopping: the queues are closed
                item.done()
                return

    def _invalid(self, peer: bytes, text: str) -> None:
        n = self.counters.get(f"ingress.{DropReason.INVALID.value}") + 1
        self.counters.add(f"ingress.{DropReason.INVALID.value}")
        if n <= 10 or n & (n - 1) == 0:  # rate-limited: the first ten, then powers of two
            log.warning("tier %s: dropped a message from peer %r (#%d): %s", self.tier.value, peer, n, text)

    def item_failed(self, step: Step, item: Item, err: BaseException) -> None:
        """Count and log an item a step could not process (it is dropped, the step goes on)."""
        key = f"{step.id}.{DropReason.ERROR.value}"
        self.counters.add(key)
        n = self.counters.get(key)
        if n <= 10 or n & (n - 1) == 0:
            log.warning("tier %s step %s dropped %s#%d (#%d): %s", self.tier.value, step.id, item.stream,
                        item.seq, n, err, exc_info=not isinstance(err, AiflowError))

    def _route_remote(self, item: Item) -> list[_StepRunner]:
        out = []
        for r in self._runners.values():
            for i in r.step.inputs:
                if i.producer == item.origin:
                    out.append(r)
            if r.step.kind == "verifier":
                for s in self.pipeline.steps:
                    if s.id == item.origin and any(i.producer == r.step.id for i in s.inputs):
                        out.append(r)
        return out

    def _deliver(self, runner: _StepRunner, item: Item) -> None:
        assert runner.queue is not None
        while not self.stopping.is_set():
            if runner.queue.put(item, timeout=0.5):
                return
        item.done()

    def reply(self, peer: Any, request: Item, meta: dict[str, Any]) -> None:
        from aiflow_stream.transport.wire import Header, Kind, Message

        header = Header(kind=Kind.REPLY, stream=request.stream, seq=request.seq, link=request.origin,
                        capture_ns=request.capture_ns, stamps={}, parts=[], meta=meta)
        self._inlet.reply(peer, Message(header, []))

    # ----------------------------------------------------------------- routing
    def emit(self, step: Step, item: Item) -> None:
        """Send ``step``'s output ``item`` to every consumer: local queues or the egress link."""
        item.origin = step.id
        local: list[_StepRunner] = []
        remote: list[Tier] = []
        for c in self.pipeline.consumers(step.id):
            if c.tier is self.tier:
                local.append(self._runners[c.id])
            elif c.tier not in remote:
                remote.append(c.tier)  # one message per destination tier; it fans out there
        copies = _fan_out(item, len(local) + len(remote))
        for runner, one in zip(local, copies):
            self._deliver(runner, one)
        for tier, one in zip(remote, copies[len(local):]):
            q = self._egress[tier][0]
            while not self.stopping.is_set():
                if q.put(one, timeout=0.5):
                    break

    # ----------------------------------------------------------------- lifecycle
    def _open_sink(self, step: Step) -> Any:
        from aiflow_stream.transport.pubsub import CaptionPublisher

        addr = step.options.get("address") or self.opts.publish or "tcp://127.0.0.1:5560"
        sink = CaptionPublisher(addr)
        self._sinks.append(sink)
        return sink

    def fail(self, err: BaseException) -> None:
        if self._failure is None:
            self._failure = err
        self.stopping.set()

    def stop(self, drain_s: float = 1.5) -> None:
        """Stop (signal handlers call this): captures end their streams so downstream tiers see
        EOS and drain; whatever is still running after ``drain_s`` seconds is stopped hard. A
        second call stops hard at once."""
        if self.draining.is_set() or drain_s <= 0:
            self.stopping.set()
            return
        self._drain_deadline = time.monotonic() + drain_s
        self.draining.set()

    def run(self) -> dict[str, Any]:
        """Start every thread, wait for end of stream (or stop), close everything; return metrics."""
        for r in self._runners.values():
            r.thread.start()
        for _, _, t in self._egress.values():
            t.start()
        if self._ingress is not None:
            self._ingress.start()  # after the runners: it serves until they have all finished
        next_report = time.monotonic() + self.opts.metrics_every
        threads = [r.thread for r in self._runners.values()] + [t for _, _, t in self._egress.values()]
        while any(t.is_alive() for t in threads):
            if self.stopping.is_set():
                break
            if self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
                log.warning("tier %s: not drained in time; stopping hard", self.tier.value)
                self.stopping.set()
                break
            time.sleep(0.05)
            if time.monotonic() >= next_report:
                next_report += self.opts.metrics_every
                self._write_metrics()
        if self.stopping.is_set():
            for r in self._runners.values():
                if r.queue is not None:
                    r.queue.close()
            for q, _, _ in self._egress.values():
                q.close()
        for t in threads:
            t.join(timeout=2.0)
        for rpc in self._rpc.values():
            try:
                if not self.stopping.is_set():
                    rpc.send_eos()
            except AiflowError as err:
                log.warning("tier %s: could not send EOS to verifier: %s", self.tier.value, err)
        metrics = self._write_metrics()
        self.close()
        if self._failure is not None:
            raise RuntimeFault(f"tier {self.tier.value} failed: {self._failure}") from self._failure
        return metrics

    def close(self) -> None:
        for r in self._runners.values():
            if r.queue is not None:
                r.queue.close()
        self.stopping.set()
        if self._ingress is not None and self._ingress.is_alive():
            self._ingress.join(timeout=2.0)
        for _, outlet, _ in self._egress.values():
            outlet.close()
        for rpc in self._rpc.values():
            rpc.outlet.close()
        if self._inlet is not None:
            self._inlet.close()
        for s in self._sinks:
            s.close()

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tier": self.tier.value, "uptime_s": round(time.monotonic() - self._started, 3),
                               "counters": self.counters.snapshot(), "steps": {}}
        for sid, r in self._runners.items():
            out["steps"][sid] = {"busy_s": round(r.busy_s, 3), "queue": len(r.queue) if r.queue else 0,
                                 "queue_high_water": r.queue.high_water if r.queue else 0}
            if r.step.kind == "capture":
                out["steps"][sid]["source_state"] = getattr(r.op, "state", "n/a")
        if self._inlet is not None:
            out["inlet"] = _stats(self._inlet)
        out["links"] = {dst.value: _stats(o) for dst, (_, o, _) in self._egress.items()}
        out["rpc"] = {k: {"calls": v.calls, "bytes_sent": v.bytes_sent} for k, v in self._rpc.items()}
        drops: dict[str, int] = {}
        for k, v in out["counters"].items():
            reason = k.rsplit(".", 1)[-1]
            if reason in {d.value for d in DropReason}:
                drops[reason] = drops.get(reason, 0) + v
        if self._inlet is not None:  # what the link itself refused (by wire reason in "inlet")
            st = self._inlet.stats
            if st.invalid:
                drops[DropReason.INVALID.value] = drops.get(DropReason.INVALID.value, 0) + sum(st.invalid.values())
            if st.gaps:
                drops[DropReason.GAP.value] = st.gaps
        out["drops"] = drops
        return out

    def _write_metrics(self) -> dict[str, Any]:
        m = self.metrics()
        log.info("tier %s metrics: %s", self.tier.value, json.dumps(m["counters"]))
        if self.opts.metrics_path:
            p = Path(self.opts.metrics_path)
            tmp = p.with_suffix(".tmp")
            tmp.write_text(json.dumps(m, default=str))
            tmp.replace(p)
        return m


def _fan_out(item: Item, n: int) -> list[Item]:
    """``n`` items for ``n`` consumers: copies share the payload buffers (read-only) but not meta
    or stamps, which steps change; the original's ``on_done`` (a link credit) runs once, after
    every copy is done."""
    if n <= 1:
        return [item]
    release, left, lock = item.on_done, [n], threading.Lock()

    def one_done() -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last and release is not None:
            release()

    return [dataclasses.replace(item, parts=list(item.parts), meta=dict(item.meta), stamps=dict(item.stamps),
                                codecs=list(item.codecs), on_done=one_done) for _ in range(n)]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {(k.hex() if isinstance(k, bytes) else str(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if dataclasses.is_dataclass(value):
        return _jsonable({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    return str(value)


def _stats(obj: Any) -> Any:
    st = getattr(obj, "stats", None)
    if st is None:
        return {}
    if dataclasses.is_dataclass(st):
        # not asdict(): it rebuilds a Counter from (key, count) pairs, counting the pairs
        return _jsonable({f.name: getattr(st, f.name) for f in dataclasses.fields(st)})
    return _jsonable(vars(st) if hasattr(st, "__dict__") else st)
