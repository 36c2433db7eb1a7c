"""Split inference: decode(encode(x)) equals each model's own generate(x), token for token."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    GitConfig,
    GitForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTModel,
)

from aiflow_stream.errors import ModelError
from aiflow_stream.models.adapters import Captioner, load_captioner, trim_generated
from aiflow_stream.models.family import DEFAULT_DIR
from aiflow_stream.models.tokenizer import build_tokenizer
from aiflow_stream.scenes import render

# Small random models; a large init range makes their greedy outputs depend on the image.
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
              image_size=32, patch_size=8, initializer_range=0.5)
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
            max_position_embeddings=40, initializer_range=0.5)


def _blip(vocab: int) -> torch.nn.Module:
    cfg = BlipConfig(
        text_config=dict(TEXT, vocab_size=vocab, bos_token_id=1, sep_token_id=2, eos_token_id=2, pad_token_id=0),
        vision_config=VISION,
    )
    return BlipForConditionalGeneration(cfg)


def _git(vocab: int) -> torch.nn.Module:
    cfg = GitConfig(vision_config=VISION, vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0, **TEXT)
    return GitForCausalLM(cfg)


def _ved(vocab: int) -> torch.nn.Module:
    enc = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                             image_size=[24, 40], patch_size=8, initializer_range=0.5), add_pooling_layer=False)
    dec = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=40, n_embd=24, n_layer=2, n_head=2,
                                     add_cross_attention=True, is_decoder=True, initializer_range=0.5,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model = VisionEncoderDecoderModel(encoder=enc, decoder=dec)  # 32 -> 24: exercises enc_to_dec_proj
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 1, 0, 2
    model.generation_config.max_length = 24
    return model


BUILDERS = {"blip": _blip, "git": _git, "ved": _ved}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer()
    for i, (name, build) in enumerate(BUILDERS.items()):
        torch.manual_seed(i)
        build(len(tok)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    # BLIP ships its image processor; GIT and the VED fall back to resize + normalise.
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "blip")
    return root


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (int(rng.integers(20, 60)), int(rng.integers(20, 60)), 3), dtype=np.uint8)
            for _ in range(n)]


def _model_generate(kind: str, path: Path, cap: Captioner, images: list[np.ndarray]) -> list[list[int]]:
    """The model's own generate(pixel_values), loaded independently of the adapter."""
    cls = {"blip": BlipForConditionalGeneration, "git": GitForCausalLM, "ved": VisionEncoderDecoderModel}[kind]
    model = cls.from_pretrained(path).eval()
    with torch.inference_mode():
        out = model.generate(pixel_values=cap.pixel_values(images))  # type: ignore[attr-defined]
    return [trim_generated(s.tolist(), len(cap.prompt_ids), cap.eos_id) for s in out]


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_split_equals_model_generate(tiny_dir: Path, kind: str) -> None:
    cap = load_captioner(tiny_dir / kind)
    assert (cap.image_processor is not None) == (kind == "blip")  # type: ignore[attr-defined]
    assert cap.vocab_size == len(cap.tokenizer)
    images = _images(6)
    feats = cap.encode(images)
    assert feats.dtype == np.float32 and feats.shape == (6, *cap.feature_shape)
    split = cap.decode_ids(feats)
    assert split == _model_generate(kind, tiny_dir / kind, cap, images)
    assert cap.decode(feats) == cap.generate(images)
    assert all(len(ids) > 0 for ids in split)


def _greedy_stepwise(cap: Captioner, feats: np.ndarray) -> list[int]:
    state = cap.start(feats)
    seq, pending = list(cap.prompt_ids), list(cap.prompt_ids)
    while len(seq) < cap.max_length:
        tok = int(state.feed(pending)[-1].argmax())
        seq.append(tok)
        pending = [tok]
        if tok == cap.eos_id:
            break
    return trim_generated(seq, len(cap.prompt_ids), cap.eos_id)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_incremental_state_matches_generate_and_crops(tiny_dir: Path, kind: str) -> None:
    cap = load_captioner(tiny_dir / kind)
    feats = cap.encode(_images(3, seed=1))
    ref = cap.decode_ids(feats)
    for i in range(3):
        assert _greedy_stepwise(cap, feats[i]) == ref[i]
    # One pass over a whole sequence predicts what the step-by-step loop did; cropping back
    # and re-feeding the tail gives the same logits.
    seq = [*cap.prompt_ids, *ref[0]]
    state = cap.start(feats[0])
    full = state.feed(seq)
    assert state.length == len(seq)
    assert full[:-1].argmax(-1).tolist() == seq[1:]
    state.crop(2)
    assert state.length == 2
    tail = state.feed(seq[2:])
    assert torch.allclose(tail, full[2:], atol=1e-4)


def test_default_split_equals_model_generate(target: Captioner, draft: Captioner) -> None:
    # Random-weight models say little; the trained family must agree too.
    from aiflow_stream.scenes import heldout_scenes

    images = [render(s, 448, 256, noise=4.0) for s in heldout_scenes(16, seed=99)]
    for cap, member in ((target, "target"), (draft, "draft")):
        feats = cap.encode(images)
        split = cap.decode_ids(feats)
        assert split == _model_generate("ved", DEFAULT_DIR / member, cap, images)
        assert cap.decode(feats) == cap.generate(images)
        assert all(_greedy_stepwise(cap, f) == ids for f, ids in zip(feats[:4], split[:4], strict=True))


def test_default_members_share_the_encoder(target: Captioner, draft: Captioner) -> None:
    images = _images(2, seed=3)
    assert target.feature_shape == draft.feature_shape == (113, 160)
    np.testing.assert_array_equal(target.encode(images), draft.encode(images))


def test_float16_features_give_the_same_captions(target: Captioner, heldout_features: np.ndarray) -> None:
    f = heldout_features[:20]
    assert target.decode(f.astype(np.float16).astype(np.float32)) == target.decode(f)


def test_missing_local_path_names_what_was_tried(tmp_path: Path) -> None:
    missing = tmp_path / "no-model-here"
    with pytest.raises(ModelError) as err:
        load_captioner(missing)
    msg = str(err.value)
    assert str(missing) in msg and "local path" in msg and "cache" in msg


def test_unknown_hub_name_is_not_downloaded() -> None:
    with pytest.raises(ModelError, match="local Hugging Face cache.*allow_download"):
        load_captioner("aiflow-nonexistent-org/no-such-captioner")


def test_bad_member_and_device() -> None:
    with pytest.raises(ModelError, match="default:target or default:draft"):
        load_captioner("default:huge")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            load_captioner("default", device="cuda")


def test_wrong_inputs_raise_model_error(target: Captioner) -> None:
    with pytest.raises(ModelError, match=r"expected features of shape \(N, 113, 160\)"):
        target.decode(np.zeros((1, 17, 32), np.float32))
    with pytest.raises(ModelError, match="RGB uint8"):
        target.encode([np.zeros((10, 10), np.uint8)])
