"""The ``aiflow`` command: run --json, captions --json, check, argument errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

import pytest

from aiflow_stream.cli import main
from aiflow_stream.graph import load_pipeline
from aiflow_stream.transport.pubsub import CaptionPublisher, CaptionRecord
from tests.runtime.support import STUB_GRAPH, LineReader, aiflow, expected_texts, stub_env

GRAPHS = sorted((Path(__file__).resolve().parents[1] / "graphs").glob("*.py"))
RECORD_FIELDS = {f.name for f in dataclasses.fields(CaptionRecord)}


def test_run_json_prints_one_record_per_caption() -> None:
    source = "synthetic://?seed=6&live=0&frames=30&width=160&height=96"
    done = subprocess.run(aiflow("run", str(STUB_GRAPH), "--source", source, "--json", "--timeout", "60"),
                          env=stub_env(every=3), capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    recs = [json.loads(line) for line in lines]  # every line is one JSON object, nothing else
    assert all(set(r) == RECORD_FIELDS for r in recs)
    assert {r["seq"]: r["text"] for r in recs} == expected_texts(source, 3)
    assert len(recs) == 10
    assert all(r["stream"] == "capture" and r["model"] == "stub" and not r["eos"] for r in recs)
    assert all(r["latency_ms"]["total"] >= r["latency_ms"]["compress"] > 0 for r in recs)


def _record(seq: int, **kw: object) -> dict:
    rec = {"stream": "cam1", "seq": seq, "capture_ns": 1_000 + seq, "publish_ns": 2_000 + seq,
           "text": f"caption {seq}", "model": "m", "latency_ms": {"total": 1.0}}
    rec.update(kw)
    return rec


def test_captions_json_prints_records_live(tmp_path: Path, procs: list[subprocess.Popen]) -> None:
    addr = f"ipc://{tmp_path}/captions.sock"
    pub = CaptionPublisher(addr)
    open_ = True
    try:
        p = subprocess.Popen(aiflow("captions", addr, "--json", "--until-eos", "--stream", "cam1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        out = LineReader(p.stdout)  # type: ignore[arg-type]
        # PUB drops what is sent before the subscriber has joined: repeat the first record
        # until it shows up, which also proves records are printed as they arrive.
        first = None
        deadline = time.monotonic() + 20
        while first is None and time.monotonic() < deadline:
            pub.send("cam1", _record(0))
            first = out.get(timeout=0.2)
        assert first is not None, "aiflow captions printed nothing"
        assert json.loads(first)["seq"] == 0
        pub.send("cam2", _record(1, stream="cam2"))  # not subscribed to
        for seq in (1, 2):
            pub.send("cam1", _record(seq, revision=1, final=False, stats={"rounds": 2}))
        pub.close()  # sends the end-of-stream record
        open_ = False
        assert p.wait(10) == 0
    finally:
        if open_:
            pub.close()
    recs = [json.loads(line) for line in out.all]
    tail = [r for r in recs if r["seq"] != 0]
    assert [(r["stream"], r["seq"]) for r in tail] == [("cam1", 1), ("cam1", 2)]
    assert tail[0] == CaptionRecord.from_map(_record(1, revision=1, final=False, stats={"rounds": 2})).to_dict()


@pytest.mark.parametrize("graph", GRAPHS, ids=lambda g: g.stem)
def test_check_shipped_graphs(graph: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(graph)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("ok: graph is valid")
    for step in load_pipeline(str(graph)).steps:
        assert f" {step.id} " in out, f"plan does not list step {step.id}"


def test_check_with_addresses_lists_links(capsys: pytest.CaptureFixture[str]) -> None:
    graph = str(next(g for g in GRAPHS if g.stem == "caption"))
    assert main(["check", graph, "--peer", "edge=tcp://10.0.0.2:5556", "--peer", "cloud=tcp://10.0.0.3:5557"]) == 0
    out = capsys.readouterr().out
    assert "device:compress => edge:caption  Packets  via tcp://10.0.0.2:5556" in out
    assert "cloud:verify <=> edge:caption  Service  via tcp://10.0.0.3:5557" in out


def test_check_reports_an_invalid_graph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from aiflow_stream import Pipeline\n"
                   "pipeline = Pipeline('bad')\n"
                   "with pipeline.on('device'):\n"
                   "    frames = pipeline.capture('capture', 'synthetic://?seed=1')\n"
                   "    pipeline.keyframe('keyframe', frames)\n")
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "keyframe" in err and "no publish step" in err


def test_tier_rejects_a_malformed_peer() -> None:
    with pytest.raises(SystemExit, match="--peer expects TIER=ADDRESS"):
        main(["tier", "device", str(STUB_GRAPH), "--peer", "tcp://10.0.0.2:5556"])


@pytest.mark.slow
def test_run_json_with_the_default_models() -> None:
    # The canonical graph end to end with the shipped models: a draft (revision 0) then the
    # verified caption (revision 1) for every key frame, and every tier exits 0.
    source = "synthetic://?seed=3&live=0&frames=60&min_scene_s=0.5&max_scene_s=1"
    done = subprocess.run(aiflow("run", "graphs/caption.py", "--source", source, "--json", "--timeout", "240"),
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    recs = [json.loads(line) for line in done.stdout.splitlines()]
    finals = [r for r in recs if r["final"]]
    drafts = [r for r in recs if not r["final"]]
    assert finals and {r["seq"] for r in finals} == {r["seq"] for r in drafts}
    assert all(r["revision"] == 1 and r["model"].endswith("+verified") for r in finals)
    assert all(r["text"] and r["truth"] for r in finals)
    assert all(r["stats"]["accepted"] <= r["stats"]["drafted"] for r in finals)
