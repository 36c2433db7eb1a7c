"""Device-edge: the device encodes and compresses, the edge captions alone (no cloud)."""

from aiflow_stream import Pipeline

pipeline = Pipeline("device_edge")
with pipeline.on("device"):
    frames = pipeline.capture("capture", "synthetic://?seed=7&fps=30")
    keys = pipeline.keyframe("keyframe", frames)
    feats = pipeline.encode("encode", keys, model="default")
    packets = pipeline.compress("compress", feats, codec="learned")
with pipeline.on("edge"):
    captions = pipeline.caption("caption", packets, model="default:draft", batch=8)
    pipeline.publish("publish", captions)
