"""The pipeline DSL: declare steps on tiers, wire typed streams, validate before anything runs.

Declaring builds frozen :class:`Step` objects; no model loads, no socket opens, no frame is read.
Type errors are reported at the line that wires the step; whole-graph checks (cycles, sinks,
decoders, addresses) run in :meth:`Pipeline.validate`, which ``aiflow check`` and every launcher
call before a process starts.

    p = Pipeline("caption")
    with p.on("device"):
        frames = p.capture("capture", "synthetic://?seed=7")
        keys = p.keyframe("keyframe", frames)
        feats = p.encode("encode", keys, model="default")
        packets = p.compress("compress", feats, codec="fp16")
    with p.on("cloud"):
        verifier = p.verifier("verify", model="default:target")
    with p.on("edge"):
        caps = p.caption("caption", packets, model="default:draft", verifier=verifier)
        p.publish("publish", caps)
"""

from __future__ import annotations

import contextlib
import enum
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiflow_stream.errors import GraphError
from aiflow_stream.sources.base import Policy


class Tier(str, enum.Enum):
    DEVICE = "device"
    EDGE = "edge"
    CLOUD = "cloud"


class StreamType(str, enum.Enum):
    FRAMES = "Frames"
    FEATURES = "Features"
    PACKETS = "Packets"
    CAPTIONS = "Captions"
    SERVICE = "Service"  # a verifier endpoint: request/reply, not a stream of items


@dataclass(frozen=True)
class QueueSpec:
    """Bound of a step's input queue. ``policy=None`` inherits the source's policy."""

    max_items: int = 8
    max_bytes: int = 64 << 20
    policy: Policy | None = None
    max_staleness: float | None = None  # seconds; only for ``latest``


@dataclass(frozen=True)
class Stream:
    """A typed output of one step. ``content`` says what a Packets stream carries."""

    producer: str
    type: StreamType
    content: str = ""  # for Packets: "features" or "frames"

    def __repr__(self) -> str:
        return f"<{self.type.value} from {self.producer!r}>"


@dataclass(frozen=True)
class Step:
    id: str
    kind: str  # operator kind: capture, keyframe, encode, compress, decompress, caption, verifier, publish
    tier: Tier
    inputs: tuple[Stream, ...]
    output: Stream | None
    options: Mapping[str, Any] = field(default_factory=dict)
    queue: QueueSpec = QueueSpec()

    def __repr__(self) -> str:
        return f"Step({self.id!r}, {self.kind}, tier={self.tier.value})"


@dataclass(frozen=True)
class Link:
    """An edge between two tiers: it becomes a ZeroMQ link at run time."""

    producer: str
    consumer: str
    src: Tier
    dst: Tier
    type: StreamType
    rpc: bool = False  # request/reply (verifier) rather than a one-way stream


_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_ACCEPTS: dict[str, tuple[StreamType, ...]] = {
    "keyframe": (StreamType.FRAMES,),
    "encode": (StreamType.FRAMES,),
    "compress": (StreamType.FEATURES, StreamType.FRAMES),
    "decompress": (StreamType.PACKETS,),
    "caption": (StreamType.FEATURES, StreamType.PACKETS, StreamType.FRAMES),
    "publish": (StreamType.CAPTIONS,),
}
# Hints shown when a stream of the wrong type is wired into a step.
_FIX: dict[tuple[str, StreamType], str] = {
    ("encode", StreamType.PACKETS): "decompress the packets first: p.decompress('decompress', packets)",
    ("publish", StreamType.FRAMES): "caption the frames first: p.caption('caption', frames)",
    ("publish", StreamType.FEATURES): "caption the features first: p.caption('caption', features)",
    ("publish", StreamType.PACKETS): "caption the packets first: p.caption('caption', packets)",
    ("keyframe", StreamType.FEATURES): "select key frames before encoding: p.keyframe(...) takes the capture's Frames",
}


class Pipeline:
    """A declared graph of steps placed on tiers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._steps: dict[str, Step] = {}
        self._tier: Tier | None = None
        self.addresses: dict[Tier, str] = {}

    # ----------------------------------------------------------------- placement
    @contextlib.contextmanager
    def on(self, tier: str | Tier) -> Iterator[Pipeline]:
        """Place every step declared inside the block on ``tier``."""
        previous, self._tier = self._tier, _tier(tier, where="Pipeline.on()")
        try:
            yield self
        finally:
            self._tier = previous

    def address(self, tier: str | Tier, address: str) -> None:
        """Set the address ``tier`` listens on (deployments and CLI flags can override it)."""
        self.addresses[_tier(tier, where="Pipeline.address()")] = address

    # ----------------------------------------------------------------- steps
    def capture(self, step_id: str, source: str, *, tier: str | None = None, max_staleness: float = 1.0,
                queue: QueueSpec | None = None, **options: Any) -> Stream:
        """Read frames from a source string (``synthetic://``, ``rtsp://``, ``camera://0``, a file...)."""
        if not isinstance(source, str) or not source:
            raise GraphError(f"step {step_id!r} (capture): source must be a non-empty source string such as "
                             f"'synthetic://?seed=7' or 'rtsp://host/path', got {source!r}")
        return self._add(step_id, "capture", (), StreamType.FRAMES, tier,
                         dict(options, source=source, max_staleness=max_staleness), queue)

    def keyframe(self, step_id: str, frames: Stream, *, tier: str | None = None, queue: QueueSpec | None = None,
                 **options: Any) -> Stream:
        """Keep only frames that add something (options go to the key-frame selector)."""
        return self._add(step_id, "keyframe", (frames,), StreamType.FRAMES, tier, options, queue)

    def encode(self, step_id: str, frames: Stream, *, model: str = "default", tier: str | None = None,
               queue: QueueSpec | None = None, **options: Any) -> Stream:
        """The device half of a captioner: frames -> features."""
        return self._add(step_id, "encode", (frames,), StreamType.FEATURES, tier, dict(options, model=model), queue)

    def compress(self, step_id: str, data: Stream, *, codec: str = "fp16", tier: str | None = None,
                 queue: QueueSpec | None = None, **options: Any) -> Stream:
        """Encode features (a feature codec chain) or frames (``jpeg:75``, ``lz4``) into packets."""
        content = "features" if data.type is StreamType.FEATURES else "frames"
        return self._add(step_id, "compress", (data,), StreamType.PACKETS, tier, dict(options, codec=codec),
                         queue, content=content)

    def decompress(self, step_id: str, packets: Stream, *, tier: str | None = None,
                   queue: QueueSpec | None = None) -> Stream:
        """Decode packets back into what was compressed (features or frames)."""
        self._check_input(step_id, "decompress", packets)
        out = StreamType.FEATURES if packets.content == "features" else StreamType.FRAMES
        return self._add(step_id, "decompress", (packets,), out, tier, {}, queue)

    def verifier(self, step_id: str, *, model: str = "default:target", tier: str | None = None,
                 **options: Any) -> Stream:
        """A speculative-decoding verifier (the large model): a service a caption step calls."""
        return self._add(step_id, "verifier", (), StreamType.SERVICE, tier, dict(options, model=model), None)

    def caption(self, step_id: str, data: Stream, *, model: str = "default", verifier: Stream | None = None,
                tier: str | None = None, queue: QueueSpec | None = None, **options: Any) -> Stream:
        """Caption frames, features or packets. With ``verifier``, this step drafts tokens and the
        verifier (usually on another tier) accepts or corrects them."""
        if verifier is not None and (not isinstance(verifier, Stream) or verifier.type is not StreamType.SERVICE):
            raise GraphError(f"step {step_id!r} (caption): verifier= expects the value returned by "
                             f"p.verifier(...), got {verifier!r}")
        inputs = (data,) if verifier is None else (data, verifier)
        return self._add(step_id, "caption", inputs, StreamType.CAPTIONS, tier, dict(options, model=model), queue)

    def publish(self, step_id: str, captions: Stream, *, address: str | None = None, tier: str | None = None,
                queue: QueueSpec | None = None) -> None:
        """Publish captions on a ZeroMQ PUB socket, topic = stream id."""
        self._add(step_id, "publish", (captions,), None, tier, {"address": address}, queue)

    # ----------------------------------------------------------------- internals
    def _check_input(self, step_id: str, kind: str, stream: Any) -> None:
        if not isinstance(stream, Stream):
            raise GraphError(f"step {step_id!r} ({kind}): expected a stream returned by another step, "
                             f"got {type(stream).__name__} {stream!r}")
        if stream.producer not in self._steps:
            raise GraphError(f"step {step_id!r} ({kind}): its input comes from {stream.producer!r}, "
                             f"which is not a step of pipeline {self.name!r}")
        accepted = _ACCEPTS.get(kind, ())
        if stream.type is StreamType.SERVICE:
            raise GraphError(f"step {step_id!r} ({kind}): {stream.producer!r} is a verifier service, not a "
                             f"stream; pass it as p.caption(..., verifier=...)")
        if stream.type not in accepted:
            want = " or ".join(t.value for t in accepted)
            hint = _FIX.get((kind, stream.type), f"wire a {want} stream into it")
            raise GraphError(f"step {step_id!r} ({kind}) expects {want}, got {stream.type.value} from step "
                             f"{stream.producer!r}; fix: {hint}")

    def _add(self, step_id: str, kind: str, inputs: tuple[Stream, ...], out: StreamType | None,
             tier: str | Tier | None, options: dict[str, Any], queue: QueueSpec | None,
             content: str = "") -> Stream:
        if not isinstance(step_id, str) or not _ID.match(step_id):
            raise GraphError(f"step id {step_id!r} ({kind}): ids are non-empty names of letters, digits, '_' "
                             f"and '-', starting with a letter or '_'")
        if step_id in self._steps:
            other = self._steps[step_id]
            raise GraphError(f"step id {step_id!r} is used twice: by a {other.kind} step on tier "
                             f"{other.tier.value!r} and now by a {kind} step; step ids must be unique, "
                             f"rename one (e.g. {step_id + '_2'!r})")
        for s in inputs:
            if s.type is StreamType.SERVICE and kind == "caption":
                if s.producer not in self._steps:
                    raise GraphError(f"step {step_id!r} (caption): verifier {s.producer!r} is not a step of "
                                     f"pipeline {self.name!r}")
                continue
            self._check_input(step_id, kind, s)
        placed = _tier(tier, where=f"step {step_id!r} ({kind})") if tier is not None else self._tier
        if placed is None:
            raise GraphError(f"step {step_id!r} ({kind}) has no tier: declare it inside `with p.on('device'):` "
                             f"(or 'edge', 'cloud') or pass tier='edge'")
        step = Step(step_id, kind, placed, inputs,
                    Stream(step_id, out, content) if out is not None else None, dict(options),
                    queue or QueueSpec())
        self._steps[step_id] = step
        return step.output  # type: ignore[return-value]

    # ----------------------------------------------------------------- queries
    @property
    def steps(self) -> list[Step]:
        return list(self._steps.values())

    def step(self, step_id: str) -> Step:
        try:
            return self._steps[step_id]
        except KeyError:
            raise GraphError(f"pipeline {self.name!r} has no step {step_id!r}; steps: "
                             f"{', '.join(self._steps) or '(none)'}") from None

    def consumers(self, step_id: str) -> list[Step]:
        return [s for s in self._steps.values() if any(i.producer == step_id for i in s.inputs)]

    def tiers(self) -> list[Tier]:
        """Tiers that have steps, in device -> edge -> cloud order."""
        used = {s.tier for s in self._steps.values()}
        return [t for t in Tier if t in used]

    def steps_on(self, tier: Tier) -> list[Step]:
        return [s for s in self._steps.values() if s.tier is tier]

    def links(self) -> list[Link]:
        """Every edge that crosses tiers (each becomes a network link)."""
        out = []
        for s in self._steps.values():
            for i in s.inputs:
                src = self._steps[i.producer]
                if src.tier is not s.tier:
                    out.append(Link(src.id, s.id, src.tier, s.tier, i.type, rpc=i.type is StreamType.SERVICE))
        return out

    def source_policy(self, step_id: str, source_override: str | None = None) -> Policy:
        """The policy inherited from the capture steps upstream of ``step_id`` (latest wins).

        Captions are never dropped: a publish step's queue blocks whatever the source."""
        if self._steps[step_id].kind == "publish":
            return Policy.BLOCK
        seen, todo = set(), [step_id]
        while todo:
            sid = todo.pop()
            if sid in seen:
                continue
            seen.add(sid)
            st = self._steps[sid]
            if st.kind == "capture":
                src = source_override or st.options["source"]
                if _source_policy(src, st.options.get("policy")) is Policy.LATEST:
                    return Policy.LATEST
            todo.extend(i.producer for i in st.inputs if i.type is not StreamType.SERVICE)
        return Policy.BLOCK

    # ----------------------------------------------------------------- validation
    def validate(self, addresses: Mapping[Tier, str] | None = None, *, need_addresses: bool = False) -> list[str]:
        """Check the whole graph; raise :class:`GraphError` listing every problem found.

        ``addresses`` (tier -> listen address) overrides the pipeline's own; with
        ``need_addresses`` every tier that receives a link must have one.
        """
        problems: list[str] = []
        if not self._steps:
            problems.append(f"pipeline {self.name!r} has no steps: declare at least a capture, a caption "
                            f"and a publish step")
        problems += self._check_cycles()
        for s in self._steps.values():
            if s.kind == "capture":
                continue
            if s.output is not None and not self.consumers(s.id):
                what = "its captions" if s.output.type is StreamType.CAPTIONS else f"its {s.output.type.value}"
                fix = "p.publish('publish', ...)" if s.output.type is StreamType.CAPTIONS else "a consumer step"
                if s.kind == "verifier":
                    problems.append(f"verifier {s.id!r} (tier {s.tier.value}) is not used by any caption "
                                    f"step; pass verifier=... to p.caption(...) or remove it")
                else:
                    problems.append(f"step {s.id!r} ({s.kind}, tier {s.tier.value}): nothing consumes {what}, "
                                    f"so the work never reaches a sink; add {fix}")
            for i in s.inputs:
                if i.type is StreamType.PACKETS and s.kind not in ("caption", "decompress"):
                    problems.append(f"step {s.id!r} ({s.kind}, tier {s.tier.value}) receives packets from "
                                    f"{i.producer!r} but has no decoder for them; add "
                                    f"p.decompress(...) on tier {s.tier.value!r}")
        for s in self._steps.values():
            if s.kind == "capture" and not self.consumers(s.id):
                problems.append(f"capture step {s.id!r} (tier {s.tier.value}): its frames go nowhere; wire "
                                f"them into a keyframe, encode or caption step")
        if self._steps and not any(s.kind == "publish" for s in self._steps.values()):
            problems.append(f"pipeline {self.name!r} has no publish step, so no caption ever leaves it; add "
                            f"p.publish('publish', captions)")
        if need_addresses:
            addrs = dict(self.addresses)
            addrs.update(addresses or {})
            receivers = {ln.dst for ln in self.links()}
            for tier in self.tiers():
                if tier in receivers and tier not in addrs:
                    names = ", ".join(s.id for s in self.steps_on(tier))
                    problems.append(f"tier {tier.value!r} has steps ({names}) that receive from other tiers but no "
                                    f"address; pass --peer {tier.value}=tcp://HOST:PORT (or --listen on that tier), "
                                    f"or set [tiers.{tier.value}] address in the deployment file")
        if problems:
            raise GraphError("invalid pipeline {!r}:\n  - {}".format(self.name, "\n  - ".join(problems)))
        return []

    def _check_cycles(self) -> list[str]:
        # Steps can only consume streams of steps declared before them, so a cycle needs a
        # stream forged by hand; still checked, since graphs may be built programmatically.
        state: dict[str, int] = {}
        problems = []

        def visit(sid: str, path: list[str]) -> None:
            state[sid] = 1
            for i in self._steps[sid].inputs:
                if i.producer not in self._steps:
                    continue
                if state.get(i.producer) == 1:
                    cyc = path[path.index(i.producer):] + [i.producer] if i.producer in path else [sid, i.producer]
                    problems.append(f"cycle between steps: {' <- '.join(cyc)}; a dataflow graph must be acyclic "
                                    f"(feed back through a new stream id instead)")
                elif state.get(i.producer) is None:
                    visit(i.producer, path + [i.producer])
            state[sid] = 2

        for sid in self._steps:
            if sid not in state:
                visit(sid, [sid])
        return problems

    def _connect(self, step_id: str, stream: Stream) -> None:
        """Add an input to an existing step (used to build graphs programmatically, e.g. feedback)."""
        st = self.step(step_id)
        self._steps[step_id] = Step(st.id, st.kind, st.tier, st.inputs + (stream,), st.output, st.options, st.queue)

    # ----------------------------------------------------------------- plan
    def plan(self, addresses: Mapping[Tier, str] | None = None) -> str:
        """A human-readable placement plan: tiers, steps, links with addresses."""
        addrs = dict(self.addresses)
        addrs.update(addresses or {})
        lines = [f"pipeline {self.name}"]
        for tier in self.tiers():
            lines.append(f"  tier {tier.value}  listen={addrs.get(tier, '(auto)')}")
            for s in self.steps_on(tier):
                ins = ", ".join(i.producer for i in s.inputs) or "-"
                out = s.output.type.value if s.output else "sink"
                opts = " ".join(f"{k}={v}" for k, v in s.options.items() if v is not None)
                lines.append(f"    {s.id:<12} {s.kind:<10} in: {ins:<20} out: {out:<9} {opts}")
        links = self.links()
        if links:
            lines.append("  links")
            for ln in links:
                arrow = "<=>" if ln.rpc else "=>"
                lines.append(f"    {ln.src.value}:{ln.producer} {arrow} {ln.dst.value}:{ln.consumer}  "
                             f"{ln.type.value}  via {addrs.get(ln.dst if not ln.rpc else ln.src, '(auto)')}")
        return "\n".join(lines)


def _tier(value: str | Tier, where: str) -> Tier:
    try:
        return Tier(value)
    except ValueError:
        raise GraphError(f"{where}: unknown tier {value!r}; use one of "
                         f"{', '.join(repr(t.value) for t in Tier)}") from None


def _source_policy(source: str, explicit: str | None) -> Policy:
    if explicit:
        return Policy(explicit)
    scheme = source.split("://", 1)[0] if "://" in source else "file"
    if scheme in ("rtsp", "camera", "rtsps", "http", "https"):
        return Policy.LATEST
    if scheme == "synthetic":
        return Policy.BLOCK if "live=0" in source else Policy.LATEST
    return Policy.BLOCK


def load_pipeline(path: str) -> Pipeline:
    """Load a graph module (a file path or ``package.module``) and return its ``pipeline``."""
    import importlib
    import importlib.util
    from pathlib import Path

    p = Path(path)
    if p.suffix == ".py" or p.exists():
        if not p.exists():
            raise GraphError(f"graph file {path!r} does not exist; pass a path like graphs/caption.py")
        spec = importlib.util.spec_from_file_location(f"aiflow_graph_{p.stem}", p)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(path)
        except ImportError as err:
            raise GraphError(f"cannot import graph module {path!r}: {err}") from err
    pipeline = getattr(module, "pipeline", None)
    if not isinstance(pipeline, Pipeline):
        raise GraphError(f"graph {path!r} must define a module-level `pipeline = Pipeline(...)`; "
                         f"found {type(pipeline).__name__}")
    return pipeline
