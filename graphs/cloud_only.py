"""Cloud-only baseline: JPEG key frames to the cloud, which runs the whole (large) captioner."""

from aiflow_stream import Pipeline

pipeline = Pipeline("cloud_only")
with pipeline.on("device"):
    frames = pipeline.capture("capture", "synthetic://?seed=7&fps=30")
    keys = pipeline.keyframe("keyframe", frames)
    jpegs = pipeline.compress("compress", keys, codec="jpeg:75")
with pipeline.on("cloud"):
    captions = pipeline.caption("caption", jpegs, model="default:target", batch=8)
    pipeline.publish("publish", captions)
