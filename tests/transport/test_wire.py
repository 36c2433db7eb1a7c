"""Wire format: round trips, zero copy, every rejection reason, fuzzing, sequence gaps,
batches."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiflow_stream.errors import WireError
from aiflow_stream.transport.wire import (
    PROTOCOL_VERSION,
    BadMessage,
    Batch,
    Header,
    Kind,
    Limits,
    Message,
    PartSpec,
    Reason,
    SeqTracker,
    decode,
    decode_all,
    encode,
    encode_batch,
)

LIMITS = Limits()


def _header(**over):
    m = {"v": PROTOCOL_VERSION, "k": int(Kind.FEATURES), "s": "cam0", "q": 3,
         "p": [["float32", [2, 3], "raw"]]}
    m.update(over)
    return msgpack.packb(m)


@pytest.mark.parametrize("kind", list(Kind))
def test_round_trip_every_kind(kind):
    feats = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    img = np.full((4, 5, 3), 7, dtype=np.uint8)
    msg = Message.build(kind, "cam0", 41, [feats, img, b"tok"], link="encode",
                        capture_ns=123456789, stamps={"capture": 1, "encode": 2},
                        meta={"text": "a red circle", "q": 0.5})
    frames = encode(msg)
    assert frames[1] is feats and frames[2] is img  # payload goes out untouched
    got = decode([bytes(f) for f in frames], LIMITS)
    h = got.header
    assert (h.kind, h.stream, h.seq, h.link, h.capture_ns) == (kind, "cam0", 41, "encode",
                                                              123456789)
    assert h.stamps == {"capture": 1, "encode": 2}
    assert h.meta == {"text": "a red circle", "q": 0.5}
    assert h.parts == [PartSpec("float16", (2, 3, 4)), PartSpec("uint8", (4, 5, 3)),
                       PartSpec("uint8", (3,))]
    a, b, c = got.arrays()
    np.testing.assert_array_equal(a, feats)
    np.testing.assert_array_equal(b, img)
    assert c.tobytes() == b"tok"
    assert got.nbytes == msg.nbytes == feats.nbytes + img.nbytes + 3


def test_control_message_without_payload():
    msg = Message(Header(Kind.EOS, "s", 9))
    got = decode(encode(msg), LIMITS)
    assert got.header.kind is Kind.EOS and got.payload == [] and got.nbytes == 0


def test_coded_part_is_opaque_bytes():
    blob = bytes(range(50))
    spec = PartSpec("float16", (64, 128), codec="lz4")  # decoded shape, coded bytes
    msg = Message(Header(Kind.PACKET, "s", 0, parts=[spec]), [blob])
    got = decode(encode(msg), LIMITS)
    assert got.header.parts[0] == spec
    (arr,) = got.arrays()
    assert arr.dtype == np.uint8 and arr.tobytes() == blob


def test_non_contiguous_array_is_sent_contiguous():
    a = np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2]
    got = decode([bytes(f) for f in encode(Message.build(Kind.FEATURES, "s", 0, [a]))],
                 LIMITS)
    np.testing.assert_array_equal(got.arrays()[0], a)


def test_received_arrays_share_the_zmq_frame_memory():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://wire-zc")
        b.connect("inproc://wire-zc")
        feats = np.random.default_rng(0).random((256, 384), dtype=np.float32)  # 384 KiB
        a.send_multipart(encode(Message.build(Kind.FEATURES, "s", 0, [feats])), copy=False)
        frames = b.recv_multipart(copy=False)
        (arr,) = decode(frames, LIMITS).arrays()
        raw = np.frombuffer(frames[1].buffer, np.uint8)
        assert np.shares_memory(arr, raw)  # a view over the received frame, not a copy
        np.testing.assert_array_equal(arr, feats)
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


BAD = [
    ("empty", [], Reason.GARBAGE, "empty message"),
    ("garbage", [b"\xc1\xc1\xc1 not msgpack"], Reason.GARBAGE, "not msgpack"),
    ("truncated header", [_header()[:-5], b"x" * 24], Reason.GARBAGE, "not msgpack"),
    ("not a map", [msgpack.packb([1, 2, 3])], Reason.GARBAGE, "not a map"),
    ("missing field", [msgpack.packb({"v": PROTOCOL_VERSION, "k": 2, "q": 0, "p": []})],
     Reason.GARBAGE, "lacks field 's'"),
    ("unknown version", [_header(v=99), b"x" * 24], Reason.VERSION, "version 99"),
    ("unknown kind", [_header(k=99), b"x" * 24], Reason.GARBAGE, "unknown message kind 99"),
    ("seq type", [_header(q="7"), b"x" * 24], Reason.GARBAGE, "seq"),
    ("negative seq", [_header(q=-1), b"x" * 24], Reason.GARBAGE, "seq"),
    ("stream type", [_header(s=5), b"x" * 24], Reason.GARBAGE, "stream"),
    ("meta type", [_header(m=[1]), b"x" * 24], Reason.GARBAGE, "meta"),
    ("stamps type", [_header(ts={"a": "b"}), b"x" * 24], Reason.GARBAGE, "stamps"),
    ("part spec", [_header(p=[["float32", [6]]]), b"x" * 24], Reason.GARBAGE, "spec"),
    ("too few frames", [_header(p=[["uint8", [4], "raw"]] * 2), b"abcd"], Reason.SIZE,
     "declares 2 parts but 1"),
    ("too many frames", [_header(), b"x" * 24, b"y"], Reason.SIZE, "declares 1 parts but 2"),
    ("raw size", [_header(), b"x" * 23], Reason.SIZE, "is 23 bytes but float32[2, 3] needs 24"),
    ("negative dim", [_header(p=[["uint8", [-4], "raw"]]), b""], Reason.SHAPE, "dimension -4"),
    ("float dim", [_header(p=[["uint8", [2.5], "raw"]]), b""], Reason.SHAPE, "dimension 2.5"),
    ("unknown dtype", [_header(p=[["object", [1], "raw"]]), b"x"], Reason.SHAPE, "dtype"),
    ("too many dims", [_header(p=[["uint8", [1] * 9, "raw"]]), b"x"], Reason.SHAPE,
     "9 dimensions"),
    ("absurd shape", [_header(p=[["float64", [1 << 40, 1 << 40], "raw"]]), b"x"],
     Reason.LIMIT, "declares"),
]


@pytest.mark.parametrize("name,frames,reason,text", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_rejected_with_reason(name, frames, reason, text):
    with pytest.raises(BadMessage) as info:
        decode(frames, LIMITS)
    assert info.value.reason is reason
    assert text in str(info.value)
    assert isinstance(info.value, WireError)


def test_limits_are_enforced():
    small = Limits(max_parts=2, max_part_bytes=100, max_message_bytes=150,
                   max_header_bytes=200)
    coded = [["uint8", [1], "lz4"]]
    cases = [
        ([_header(p=coded), b"x" * 101], "part 0 is 101 bytes"),
        ([_header(p=coded * 2), b"x" * 80, b"y" * 80], "payload of 160 bytes"),
        ([_header(p=coded * 3), b"", b"", b""], "3 payload frames"),
        ([_header(m={"pad": "z" * 300})], "header of"),
        ([_header(p=[["uint8", [101], "raw"]]), b"x" * 101], "declares uint8[101] = 101 bytes"),
    ]
    for frames, text in cases:
        with pytest.raises(BadMessage) as info:
            decode(frames, small)
        assert info.value.reason is Reason.LIMIT and text in str(info.value)


def test_encode_rejects_inconsistent_messages():
    a = np.zeros(4, np.float32)
    with pytest.raises(WireError, match="1 payload buffers but 2 part specs"):
        encode(Message(Header(Kind.FEATURES, "s", 0, parts=[PartSpec.of(a)] * 2), [a]))
    with pytest.raises(WireError, match="holds 16 bytes but its spec float32"):
        encode(Message(Header(Kind.FEATURES, "s", 0, parts=[PartSpec("float32", (5,))]), [a]))
    with pytest.raises(WireError, match="cannot go on the wire"):
        Message.build(Kind.FEATURES, "s", 0, [np.array([object()])])
    with pytest.raises(WireError, match="cannot be packed"):
        encode(Message.build(Kind.CAPTION, "s", 0, meta={"x": object()}))


# -- fuzzing: nothing but WireError may come out of decode ------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                     st.floats(allow_nan=False), st.text(max_size=8), st.binary(max_size=8))
_values = st.recursive(_scalars, lambda c: st.one_of(
    st.lists(c, max_size=4), st.dictionaries(st.text(max_size=3), c, max_size=4)),
    max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_random_frames_only_raise_wire_error(frames):
    try:
        decode(frames, LIMITS)
    except WireError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional={k: _values for k in
                                           ("v", "k", "s", "q", "p", "l", "t", "ts", "m")}),
       st.sampled_from([1, 2, 3]), st.lists(st.binary(max_size=32), max_size=3),
       st.lists(st.tuples(st.sampled_from(["uint8", "float32", "int64", "x"]),
                          st.lists(st.integers(-3, 1 << 62), max_size=4),
                          st.sampled_from(["raw", "lz4"])), max_size=3))
def test_structured_fuzz_only_raises_wire_error(fields, version, payload, parts):
    fields.setdefault("v", version)
    fields.setdefault("p", [list(p) for p in parts])
    try:
        msg = decode([msgpack.packb(fields), *payload], LIMITS)
    except WireError:
        return
    assert len(msg.payload) == len(msg.header.parts)
    msg.arrays()  # an accepted message must be viewable


# -- sequence tracking ----------------------------------------------------------------------

def test_seq_tracker_counts_gaps_and_reorders():
    t = SeqTracker()
    missed = [t.observe(("p", "a"), s) for s in (0, 1, 2, 5, 6, 4, 6, 7)]
    assert missed == [0, 0, 0, 2, 0, 0, 0, 0]
    assert t.gaps == 2 and t.reordered == 2
    assert t.observe(("p", "b"), 10) == 0  # a new stream starts anywhere
    t.reset("p")
    assert t.observe(("p", "a"), 0) == 0 and t.reordered == 2  # restarted peer: no reorder


def test_seq_tracker_memory_is_bounded():
    t = SeqTracker(max_keys=3)
    for i in range(10):
        t.observe(("p", i), 0)
    assert len(t._next) == 3


# -- batches ------------------------------------------------------------------------------

def _batch_msgs():
    feats = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    coded = PartSpec("float16", (64, 128), codec="lz4")
    return [
        Message.build(Kind.FEATURES, "cam0", 0, [feats], link="encode", capture_ns=7,
                      stamps={"capture": 1}, meta={"q": 0.5}),
        Message(Header(Kind.PACKET, "cam1", 3, parts=[coded]), [bytes(range(50))]),
        Message.build(Kind.CAPTION, "cam0", 1, [np.arange(5, dtype=np.int64), b"tok"],
                      meta={"text": "a red circle"}),
        Message.build(Kind.EOS, "cam0", 2),  # no payload
        Message.build(Kind.FEATURES, "cam0", 3, [feats[:, :, ::2]]),  # non-contiguous
    ]


def test_batch_round_trip_views_one_frame():
    msgs = _batch_msgs()
    frames = encode_batch(msgs)
    assert len(frames) == 2
    blob = zmq.Frame(bytes(frames[1]))
    got = decode_all([bytes(frames[0]), blob], LIMITS)
    assert all(isinstance(m, Message) for m in got) and len(got) == len(msgs)
    raw = np.frombuffer(blob.buffer, np.uint8)
    for sent, m in zip(msgs, got):
        a, b = sent.header, m.header
        assert (b.kind, b.stream, b.seq, b.link, b.capture_ns, b.stamps, b.meta) == (
            a.kind, a.stream, a.seq, a.link, a.capture_ns, a.stamps, a.meta)
        assert [(p.dtype, tuple(p.shape), p.codec) for p in b.parts] == [
            (p.dtype, tuple(p.shape), p.codec) for p in a.parts]
        assert m.nbytes == sent.nbytes
        for x, y in zip(m.arrays(), sent.arrays()):
            np.testing.assert_array_equal(x, y)
            if x.size:
                assert np.shares_memory(x, raw)  # a view of the received blob, no copy


def test_single_messages_and_batches_through_decode_all():
    single = decode_all(encode(_msg_small(4)), LIMITS)
    assert len(single) == 1 and single[0].header.seq == 4
    with pytest.raises(BadMessage, match="a batch where one message was expected"):
        decode(encode_batch([_msg_small(0)]), LIMITS)
    bad = decode_all([b"\xc1"], LIMITS)
    assert len(bad) == 1 and bad[0].reason is Reason.GARBAGE


def _msg_small(seq):
    return Message.build(Kind.FEATURES, "s", seq, [np.full(8, seq, np.uint8)])


def _envelope(frames):
    return msgpack.unpackb(frames[0])


def _repack(env, blob):
    return [msgpack.packb(env), blob]


def test_a_bad_message_in_a_batch_drops_only_itself():
    frames = encode_batch([_msg_small(s) for s in range(4)])
    env = _envelope(frames)
    env["b"][1][0] = 99  # unknown kind
    env["b"][2][4] = [7]  # declares 7 bytes in a slot of 8
    got = decode_all(_repack(env, frames[1]), LIMITS)
    assert [m.header.seq for m in got if isinstance(m, Message)] == [0, 3]
    assert got[1].reason is Reason.GARBAGE and "unknown message kind 99" in str(got[1])
    assert got[2].reason is Reason.SIZE
    np.testing.assert_array_equal(got[3].arrays()[0], np.full(8, 3, np.uint8))


BAD_BATCHES = [
    ("sizes disagree with the blob", lambda e, b: ({**e, "z": [8, 8, 9]}, b), Reason.SIZE, 3),
    ("short blob", lambda e, b: (e, b[:-1]), Reason.SIZE, 3),
    ("size not an int", lambda e, b: ({**e, "z": [8, "8", 8]}, b), Reason.GARBAGE, 3),
    ("lists of two lengths", lambda e, b: ({**e, "z": [8, 16]}, b), Reason.GARBAGE, 1),
    ("no header list", lambda e, b: ({**e, "b": 5}, b), Reason.GARBAGE, 1),
    ("too many", lambda e, b: ({**e, "b": e["b"] * 2000, "z": [0] * 6000}, b""),
     Reason.LIMIT, 1),
]


@pytest.mark.parametrize("name,tamper,reason,count", BAD_BATCHES, ids=[b[0] for b in BAD_BATCHES])
def test_a_bad_envelope_drops_the_batch(name, tamper, reason, count):
    frames = encode_batch([_msg_small(s) for s in range(3)])
    env, blob = tamper(_envelope(frames), bytes(frames[1]))
    got = decode_all(_repack(env, blob), LIMITS)
    assert len(got) == count and all(isinstance(m, BadMessage) and m.reason is reason
                                     for m in got)


def test_batch_with_extra_frames_is_rejected():
    frames = encode_batch([_msg_small(0), _msg_small(1)])
    got = decode_all([*frames, b"x"], LIMITS)
    assert len(got) == 2 and all(m.reason is Reason.SIZE for m in got)


def test_batch_part_specs_are_checked_against_each_receivers_limits():
    frames = encode_batch([Message.build(Kind.FEATURES, "s", 0, [np.zeros((2, 3), np.uint8)])])
    assert isinstance(decode_all(frames, LIMITS)[0], Message)  # validated and remembered
    (got,) = decode_all(frames, Limits(max_ndim=1))  # stricter limits: checked again
    assert got.reason is Reason.SHAPE and "2 dimensions" in str(got)
    (got,) = decode_all(frames, Limits(max_part_bytes=5))
    assert got.reason is Reason.LIMIT


def test_batch_add_rejects_a_bad_message_and_keeps_the_rest():
    b = Batch()
    b.add(_msg_small(0))
    a = np.zeros(4, np.float32)
    with pytest.raises(WireError, match="holds 16 bytes"):
        b.add(Message(Header(Kind.FEATURES, "s", 1, parts=[PartSpec("float32", (5,))]), [a]))
    with pytest.raises(WireError, match="cannot be packed"):
        b.add(Message.build(Kind.CAPTION, "s", 2, meta={"x": object()}))
    assert b.msgs == 1 and b.nbytes == 8
    (got,) = decode_all(b.frames(), LIMITS)
    assert got.header.seq == 0 and b.msgs == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_values, st.lists(_values, min_size=9, max_size=9)), max_size=4),
       st.lists(st.integers(-2, 40), max_size=4), st.binary(max_size=64))
def test_batch_fuzz_never_raises(heads, sizes, blob):
    frames = [msgpack.packb({"v": PROTOCOL_VERSION, "k": 19, "b": heads, "z": sizes}), blob]
    for m in decode_all(frames, LIMITS):
        if isinstance(m, Message):
            m.arrays()
        else:
            assert isinstance(m, BadMessage)


def test_seq_tracker_advance_after_a_run():
    t = SeqTracker()
    t.observe("k", 0)
    t.advance("k", 10)  # 1..9 arrived as one run
    assert t.observe("k", 10) == 0 and t.observe("k", 12) == 1
    t.advance("unknown", 5)  # a forgotten key stays forgotten
    assert t.observe("unknown", 0) == 0
