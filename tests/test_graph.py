"""The DSL: declaration-time type checks, whole-graph validation, placement plan."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aiflow_stream import GraphError, Pipeline, StreamType, Tier
from aiflow_stream.graph import Stream, load_pipeline

ROOT = Path(__file__).resolve().parents[1]


def canonical() -> Pipeline:
    p = Pipeline("t")
    with p.on("device"):
        frames = p.capture("capture", "synthetic://?seed=1")
        keys = p.keyframe("keyframe", frames)
        feats = p.encode("encode", keys)
        packets = p.compress("compress", feats, codec="fp16")
    with p.on("cloud"):
        verifier = p.verifier("verify")
    with p.on("edge"):
        caps = p.caption("caption", packets, model="default:draft", verifier=verifier)
        p.publish("publish", caps)
    return p


def test_canonical_graph_validates_and_places_steps() -> None:
    p = canonical()
    p.validate()
    assert [t.value for t in p.tiers()] == ["device", "edge", "cloud"]
    assert [s.id for s in p.steps_on(Tier.DEVICE)] == ["capture", "keyframe", "encode", "compress"]
    links = {(ln.producer, ln.consumer, ln.rpc) for ln in p.links()}
    assert links == {("compress", "caption", False), ("verify", "caption", True)}


def test_duplicate_id_names_both_steps_and_a_fix() -> None:
    p = Pipeline("t")
    with p.on("device"):
        frames = p.capture("cam", "synthetic://")
        with pytest.raises(GraphError, match=r"'cam' is used twice.*capture.*keyframe.*rename"):
            p.keyframe("cam", frames)


def test_wrong_stream_type_names_step_expected_given_and_fix() -> None:
    p = Pipeline("t")
    with p.on("device"):
        frames = p.capture("capture", "synthetic://")
        feats = p.encode("encode", frames)
        packets = p.compress("compress", feats)
        with pytest.raises(GraphError) as err:
            p.encode("encode2", packets)
    msg = str(err.value)
    assert "'encode2'" in msg and "expects Frames" in msg and "got Packets" in msg and "decompress" in msg


def test_publish_of_frames_is_a_type_error() -> None:
    p = Pipeline("t")
    with p.on("device"):
        frames = p.capture("capture", "synthetic://")
        with pytest.raises(GraphError, match="expects Captions, got Frames"):
            p.publish("publish", frames)


def test_step_without_tier_says_how_to_place_it() -> None:
    p = Pipeline("t")
    with pytest.raises(GraphError, match=r"'capture' \(capture\) has no tier.*p.on\('device'\)"):
        p.capture("capture", "synthetic://")


def test_unknown_tier() -> None:
    p = Pipeline("t")
    with pytest.raises(GraphError, match="unknown tier 'fog'"):
        with p.on("fog"):
            pass


def test_cycle_is_reported() -> None:
    p = Pipeline("t")
    with p.on("edge"):
        frames = p.capture("capture", "synthetic://")
        k1 = p.keyframe("k1", frames)
        k2 = p.keyframe("k2", k1)
        caps = p.caption("caption", k2)
        p.publish("publish", caps)
    # Programmatic feedback edge: k1 also consumes k2's output.
    p._connect("k1", Stream("k2", StreamType.FRAMES))
    with pytest.raises(GraphError, match=r"cycle between steps"):
        p.validate()


def test_codec_without_decoder_on_receiving_side() -> None:
    p = Pipeline("t")
    with p.on("device"):
        frames = p.capture("capture", "synthetic://")
        packets = p.compress("compress", p.encode("encode", frames))
    with p.on("edge"):
        p._add("sink", "keyframe", (), StreamType.FRAMES, None, {}, None)
        p._connect("sink", packets)
        caps = p.caption("caption", p.step("sink").output)
        p.publish("publish", caps)
    with pytest.raises(GraphError, match=r"receives packets from 'compress' but has no decoder.*decompress"):
        p.validate()


def test_tier_with_steps_but_no_address() -> None:
    p = canonical()
    with pytest.raises(GraphError) as err:
        p.validate({Tier.CLOUD: "tcp://10.0.0.3:5557"}, need_addresses=True)
    assert "tier 'edge' has steps (caption, publish)" in str(err.value)
    assert "--peer edge=" in str(err.value)
    p.validate({Tier.CLOUD: "tcp://10.0.0.3:5557", Tier.EDGE: "tcp://10.0.0.2:5556"}, need_addresses=True)


def test_unconsumed_output_and_missing_publish() -> None:
    p = Pipeline("t")
    with p.on("device"):
        frames = p.capture("capture", "synthetic://")
        p.keyframe("keyframe", frames)
    with pytest.raises(GraphError) as err:
        p.validate()
    assert "nothing consumes its Frames" in str(err.value)
    assert "no publish step" in str(err.value)


def test_unused_verifier() -> None:
    p = Pipeline("t")
    with p.on("cloud"):
        p.verifier("verify")
        caps = p.caption("caption", p.capture("capture", "synthetic://"))
        p.publish("publish", caps)
    with pytest.raises(GraphError, match="verifier 'verify' .* is not used"):
        p.validate()


def test_declaring_loads_nothing_heavy() -> None:
    code = ("import sys; from aiflow_stream.graph import load_pipeline; "
            f"load_pipeline({str(ROOT / 'graphs/caption.py')!r}).validate(); "
            "print(sorted(m for m in ('torch', 'transformers', 'numba', 'zmq') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["caption", "cloud_only", "on_device", "device_edge"])
def test_shipped_graphs_are_valid(name: str) -> None:
    p = load_pipeline(str(ROOT / "graphs" / f"{name}.py"))
    p.validate()
    assert any(s.kind == "publish" for s in p.steps)


def test_policy_inherited_from_source() -> None:
    p = canonical()
    assert p.source_policy("caption").value == "latest"
    q = Pipeline("f")
    with q.on("device"):
        caps = q.caption("caption", q.capture("capture", "video.mp4"))
        q.publish("publish", caps)
    assert q.source_policy("caption").value == "block"


def test_aiflow_check_prints_plan_or_errors(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "aiflow_stream.cli", "check", str(ROOT / "graphs/caption.py"),
                         "--peer", "edge=tcp://10.0.0.2:5556", "--peer", "cloud=tcp://10.0.0.3:5557"],
                        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "device:compress => edge:caption" in ok.stdout and "tcp://10.0.0.2:5556" in ok.stdout
    bad = tmp_path / "bad.py"
    bad.write_text("from aiflow_stream import Pipeline\npipeline = Pipeline('bad')\n"
                   "with pipeline.on('device'):\n    pipeline.capture('c', 'synthetic://')\n")
    out = subprocess.run([sys.executable, "-m", "aiflow_stream.cli", "check", str(bad)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2
    assert "no publish step" in out.stderr
