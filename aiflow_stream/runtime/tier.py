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
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiflow_stream.errors import AiflowError, RuntimeFault
from aiflow_stream.graph import Pipeline, Step, StreamType, Tier
from aiflow_stream.operators.base import Operator, OperatorContext, create
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
                       ("OMP_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1"), ("TOKENIZERS_PARALLELISM", "false")):
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
    metrics_every: float = 10.0


class _StepRunner:
    def __init__(self, rt: TierRuntime, step: Step, op: Operator, queue: BoundedQueue | None, eos_needed: int) -> None:
        self.rt = rt
        self.step = step
        self.op = op
        self.queue = queue
        self.eos_needed = eos_needed
        self.eos_seen = 0
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
        while not self.rt.stopping.is_set():
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

    def _run_transform(self) -> None:
        assert self.queue is not None
        while True:
            item = self.queue.get(timeout=0.5)
            if item is None:
                if self.rt.stopping.is_set():
                    return
                continue
            if item.kind is ItemKind.EOS:
                self.eos_seen += 1
                if self.eos_seen >= self.eos_needed:
                    for out in self.op.close():
                        self.rt.emit(self.step, out)
                    self.rt.emit(self.step, Item.eos(item.stream, self.step.id))
                    return
                continue
            self.rt.counters.add(f"{self.step.id}.in")
            t0 = time.perf_counter()
            try:
                outs = self.op.process(item)
            except AiflowError as err:
                self.rt.counters.add(f"{self.step.id}.{DropReason.ERROR.value}")
                log.warning("tier %s step %s dropped %s#%d: %s", self.rt.tier.value, self.step.id,
                            item.stream, item.seq, err)
                outs = []
            finally:
                item.done()
            self.busy_s += time.perf_counter() - t0
            for out in outs:
                out.stamps.setdefault(self.step.id, time.time_ns())
                self.rt.emit(self.step, out)

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
                self.eos_seen += 1
                if self.eos_seen >= self.eos_needed:
                    return
                continue
            peer = item.meta.pop("_peer")
            t0 = time.perf_counter()
            try:
                reply = op.handle(peer.hex() if isinstance(peer, bytes) else str(peer), item.meta, item.parts)
            except AiflowError as err:
                reply = {"error": str(err)}
                self.rt.counters.add(f"{self.step.id}.{DropReason.ERROR.value}")
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
        self.stopping = threading.Event()
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
        from aiflow_stream.runtime.links import LocalVerifier, RemoteVerifier

        try:
            import torch

            torch.set_num_threads(max(1, self.opts.torch_threads))
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
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
                        outlet = self._outlet(vstep.tier, identity=f"{self.tier.value}-{step.id}-rpc")
                        ctx.verifier = RemoteVerifier(outlet, link=step.id, stream=step.id)
                        self._rpc[step.id] = ctx.verifier
                ctx.extras["emit"] = lambda it, _s=step: self._emit_now(_s, it)
            op = create(step.kind, ctx)
            op.setup()
            ops[step.id] = op
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

    def _emit_now(self, step: Step, item: Item) -> None:
        item.stamps.setdefault(step.id, time.time_ns())
        self.emit(step, item)

    def _outlet(self, dst: Tier, identity: str) -> Any:
        from aiflow_stream.transport.link import Outlet

        addr = self.opts.peers.get(dst) or self.pipeline.addresses.get(dst)
        if not addr:
            raise RuntimeFault(f"tier {self.tier.value!r} must reach tier {dst.value!r} but has no address for it; "
                               f"pass --peer {dst.value}=tcp://HOST:PORT")
        return Outlet(addr, window_msgs=self.opts.window_msgs, window_bytes=self.opts.window_bytes,
                      identity=identity, connect_timeout=self.opts.connect_timeout)

    def _open_egress(self, dst: Tier) -> None:
        outlet = self._outlet(dst, identity=f"{self.tier.value}-{self.opts.stream or os.getpid()}-{dst.value}")
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

        try:
            while pending_eos:
                item = q.get(timeout=0.5)
                if item is None:
                    if self.stopping.is_set():
                        return
                    continue
                try:
                    outlet.send(item_to_message(item, item.origin))
                    self.counters.add(f"egress-{dst.value}.sent")
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
        self._inlet = Inlet(addr, window_msgs=self.opts.window_msgs, window_bytes=self.opts.window_bytes)
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
            item = message_to_item(msg)
            nbytes = msg.nbytes
            item.on_done = (lambda p=peer, n=nbytes: inlet.release(p, n))
            targets = self._route_remote(item)
            if not targets:
                self.counters.add(f"ingress.{DropReason.INVALID.value}")
                log.warning("tier %s: message for unknown link %r from peer %r dropped", self.tier.value,
                            item.origin, peer)
                item.done()
                continue
            if item.kind is ItemKind.REQUEST:
                item.meta["_peer"] = peer
            self._deliver(targets[0], item)

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
        consumers = self.pipeline.consumers(step.id)
        sent_remote: set[Tier] = set()
        for c in consumers:
            if c.tier is self.tier:
                self._deliver(self._runners[c.id], item)
            elif c.tier not in sent_remote:
                sent_remote.add(c.tier)
                q = self._egress[c.tier][0]
                while not self.stopping.is_set():
                    if q.put(item, timeout=0.5):
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

    def stop(self) -> None:
        """Ask every thread to stop (signal handlers call this)."""
        self.stopping.set()

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


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {(k.hex() if isinstance(k, bytes) else str(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if dataclasses.is_dataclass(value):
        return _jsonable(dataclasses.asdict(value))  # type: ignore[arg-type]
    return str(value)


def _stats(obj: Any) -> Any:
    st = getattr(obj, "stats", None)
    if st is None:
        return {}
    if dataclasses.is_dataclass(st):
        return _jsonable(dataclasses.asdict(st))  # type: ignore[arg-type]
    return _jsonable(vars(st) if hasattr(st, "__dict__") else st)
