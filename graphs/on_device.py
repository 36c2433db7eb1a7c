"""On-device: the small captioner runs next to the camera; nothing crosses a network."""

from aiflow_stream import Pipeline

pipeline = Pipeline("on_device")
with pipeline.on("device"):
    frames = pipeline.capture("capture", "synthetic://?seed=7&fps=30")
    keys = pipeline.keyframe("keyframe", frames)
    captions = pipeline.caption("caption", keys, model="default:draft", batch=8)
    pipeline.publish("publish", captions)
