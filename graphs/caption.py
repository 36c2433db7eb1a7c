"""AI Flow: features to the edge, edge drafts, cloud verifies (DESIGN.md section 1)."""

from aiflow_stream import Pipeline

pipeline = Pipeline("caption")
with pipeline.on("device"):
    frames = pipeline.capture("capture", "synthetic://?seed=7&fps=30")
    keys = pipeline.keyframe("keyframe", frames)
    feats = pipeline.encode("encode", keys, model="default")
    packets = pipeline.compress("compress", feats, codec="learned")
with pipeline.on("cloud"):
    verifier = pipeline.verifier("verify", model="default:target")
with pipeline.on("edge"):
    captions = pipeline.caption("caption", packets, model="default:draft", verifier=verifier, batch=8)
    pipeline.publish("publish", captions)
