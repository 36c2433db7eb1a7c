"""The default model family: one small ViT encoder shared by a draft and a target GPT-2 decoder.

Both members are ordinary ``VisionEncoderDecoderModel`` checkpoints (``draft/`` and ``target/``
under the family directory, with the tokenizer beside them), so the standard ``generate`` works
and anyone can load them without this package. The two encoders hold identical weights: the
device runs the encoder once and either decoder can caption its features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    SwinConfig,
    SwinModel,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTModel,
)

from aiflow_stream.models.tokenizer import build_tokenizer
from aiflow_stream.scenes import MODEL_INPUT_SIZE, to_model_input

DEFAULT_DIR = Path(__file__).resolve().parent / "default"
MEMBERS = ("draft", "target")


@dataclass(frozen=True)
class FamilySpec:
    """Sizes of the default family (see the model card in ``default/README.md``)."""

    image_size: tuple[int, int] = (MODEL_INPUT_SIZE[1], MODEL_INPUT_SIZE[0])  # (height, width)
    patch: int = 8
    enc_hidden: int = 160
    enc_layers: int = 4
    enc_heads: int = 4
    target_hidden: int = 256
    target_layers: int = 3
    target_heads: int = 4
    draft_hidden: int = 128
    draft_layers: int = 2
    draft_heads: int = 2
    # "vit": plain ViT (patch 8); "swin": hierarchical shifted-window ViT (patch 4, 3 stages).
    encoder: str = "vit"
    # Room for the longest caption (26 words + EOS) plus a speculative draft of up to 16 tokens.
    n_positions: int = 48


def _decoder(spec: FamilySpec, tok: PreTrainedTokenizerFast, hidden: int, layers: int, heads: int) -> GPT2LMHeadModel:
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=spec.n_positions,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_inner=hidden * 3,
        add_cross_attention=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        is_decoder=True,  # type: ignore[call-arg]  # a PretrainedConfig kwarg the GPT2Config stub omits
    )
    return GPT2LMHeadModel(cfg)


def build_family(spec: FamilySpec = FamilySpec(), seed: int = 0) -> tuple[PreTrainedTokenizerFast, dict[str, VisionEncoderDecoderModel]]:
    """Fresh, randomly initialised family whose members share one encoder module."""
    torch.manual_seed(seed)
    tok = build_tokenizer()
    enc_cfg = ViTConfig(
        image_size=spec.image_size,
        patch_size=spec.patch,
        hidden_size=spec.enc_hidden,
        num_hidden_layers=spec.enc_layers,
        num_attention_heads=spec.enc_heads,
        intermediate_size=spec.enc_hidden * 2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    encoder: ViTModel | SwinModel
    if spec.encoder == "swin":
        swin_cfg = SwinConfig(image_size=spec.image_size, patch_size=4, embed_dim=48, depths=[2, 2, 2],
                              num_heads=[2, 4, 8], window_size=4, mlp_ratio=2.0, drop_path_rate=0.0,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        encoder = SwinModel(swin_cfg, add_pooling_layer=False)
    else:
        encoder = ViTModel(enc_cfg, add_pooling_layer=False)
    sizes = {
        "target": (spec.target_hidden, spec.target_layers, spec.target_heads),
        "draft": (spec.draft_hidden, spec.draft_layers, spec.draft_heads),
    }
    members = {}
    for name, (h, n, k) in sizes.items():
        model = VisionEncoderDecoderModel(encoder=encoder, decoder=_decoder(spec, tok, h, n, k))
        model.config.decoder_start_token_id = tok.bos_token_id
        model.config.pad_token_id = tok.pad_token_id
        model.config.eos_token_id = tok.eos_token_id
        model.generation_config.decoder_start_token_id = tok.bos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.bos_token_id = tok.bos_token_id
        model.generation_config.max_length = spec.n_positions - 16
        members[name] = model
    return tok, members


def save_family(directory: Path, tok: PreTrainedTokenizerFast, members: dict[str, VisionEncoderDecoderModel], dtype: torch.dtype = torch.float16) -> None:
    """Write ``directory/{draft,target}`` (safetensors) and the tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(directory)
    for name, model in members.items():
        # Cast a copy so a training run can keep going in float32.
        state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
        model.save_pretrained(directory / name, state_dict=state, safe_serialization=True)
        tok.save_pretrained(directory / name)


def preprocess(frames: list[np.ndarray] | np.ndarray, size: tuple[int, int] = MODEL_INPUT_SIZE) -> torch.Tensor:
    """RGB uint8 frames (any resolution) -> normalised ``pixel_values`` (N, 3, H, W) in [-1, 1]."""
    if isinstance(frames, np.ndarray) and frames.ndim == 3:
        frames = [frames]
    batch = np.stack([to_model_input(f, size) for f in frames])
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    return x.div_(127.5).sub_(1.0)
