"""Benchmark-only graph: one of the four placements of graphs/*.py, chosen by environment.

Same operators and placement as ``graphs/caption.py`` (aiflow), ``graphs/cloud_only.py``,
``graphs/on_device.py`` and ``graphs/device_edge.py``; the benches only need knobs those graphs
fix: the feature codec, the key-frame selector options and the capture's ``max_staleness``.
Every tier process of a run loads this file with the same environment (``start_local(env=)``):

    AIFLOW_BENCH_SCHEME     aiflow | cloud_only | on_device | device_edge (default aiflow)
    AIFLOW_BENCH_CODEC      feature codec spec (default fp16; cloud_only always sends jpeg:75)
    AIFLOW_BENCH_KEYFRAME   JSON object of keyframe options, e.g. {"max_gap": 100000}
    AIFLOW_BENCH_STALENESS  capture max_staleness in seconds (default 1.0, the engine's)
    AIFLOW_BENCH_BATCH      every caption step's batch (default 8, as in graphs/*.py; 1 = no batching)
"""

import json
import os

from aiflow_stream import Pipeline

SCHEMES = ("cloud_only", "on_device", "device_edge", "aiflow")

scheme = os.environ.get("AIFLOW_BENCH_SCHEME", "aiflow")
if scheme not in SCHEMES:
    raise ValueError(f"AIFLOW_BENCH_SCHEME={scheme!r}; use one of {', '.join(SCHEMES)}")
codec = os.environ.get("AIFLOW_BENCH_CODEC", "fp16")
key_opts = json.loads(os.environ.get("AIFLOW_BENCH_KEYFRAME", "{}"))
staleness = float(os.environ.get("AIFLOW_BENCH_STALENESS", "1.0"))
batch = int(os.environ.get("AIFLOW_BENCH_BATCH", "8"))

pipeline = Pipeline(f"bench_{scheme}")
with pipeline.on("device"):
    frames = pipeline.capture("capture", "synthetic://?seed=7&fps=30", max_staleness=staleness)
    keys = pipeline.keyframe("keyframe", frames, **key_opts)
    if scheme == "cloud_only":
        jpegs = pipeline.compress("compress", keys, codec="jpeg:75")
    elif scheme == "on_device":
        captions = pipeline.caption("caption", keys, model="default:draft", batch=batch)
        pipeline.publish("publish", captions)
    else:
        feats = pipeline.encode("encode", keys, model="default")
        packets = pipeline.compress("compress", feats, codec=codec)
if scheme == "cloud_only":
    with pipeline.on("cloud"):
        captions = pipeline.caption("caption", jpegs, model="default:target", batch=batch)
        pipeline.publish("publish", captions)
elif scheme == "device_edge":
    with pipeline.on("edge"):
        captions = pipeline.caption("caption", packets, model="default:draft", batch=batch)
        pipeline.publish("publish", captions)
elif scheme == "aiflow":
    with pipeline.on("cloud"):
        verifier = pipeline.verifier("verify", model="default:target")
    with pipeline.on("edge"):
        captions = pipeline.caption("caption", packets, model="default:draft", verifier=verifier, batch=batch)
        pipeline.publish("publish", captions)
