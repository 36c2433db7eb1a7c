"""Captioner adapters: one model split into a device half (``encode``) and a decoder half.

``encode(images) -> features`` runs the vision encoder (the device tier); ``decode(features)``
runs the text decoder greedily on those features (edge or cloud tier), token for token the
same as the model's own ``generate(pixel_values)``. ``start(features)`` opens an incremental
:class:`DecoderState` (the decoder's KV cache over one image) that speculative decoding drives
(see :mod:`aiflow_stream.models.speculative`).

Three Hugging Face architectures are wrapped: ``VisionEncoderDecoderModel`` (the shipped default
family uses it), ``BlipForConditionalGeneration`` and ``GitForCausalLM``. Load one with
:func:`load_captioner`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np
import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from aiflow_stream.errors import ModelError
from aiflow_stream.models.family import DEFAULT_DIR, MEMBERS, preprocess

logger = logging.getLogger(__name__)

# Normalisation BLIP and GIT were trained with (OpenAI CLIP statistics), used when a model has no
# saved image processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)  # ViT's convention, also the default family's


@runtime_checkable
class DecoderState(Protocol):
    """A decoder's cached state over one image's features, advanced a chunk at a time.

    ``length`` counts the text tokens whose keys/values are cached (the prompt included).
    """

    @property
    def length(self) -> int: ...

    def feed(self, ids: Sequence[int]) -> torch.Tensor:
        """Run the decoder over ``ids`` (appended after the cached tokens) in ONE forward pass;
        return float32 logits of shape ``(len(ids), vocab)``: row i predicts the token after
        ``ids[i]``."""
        ...

    def crop(self, length: int) -> None:
        """Forget every cached token past the first ``length``."""
        ...


@runtime_checkable
class Captioner(Protocol):
    """A captioning model split at its vision encoder."""

    @property
    def name(self) -> str: ...

    @property
    def feature_shape(self) -> tuple[int, int]:
        """``(tokens, dim)`` of one image's features."""
        ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        """Tokens every caption starts from (the decoder start / BOS token)."""
        ...

    @property
    def eos_id(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_length(self) -> int:
        """Longest sequence ``generate`` produces, the prompt included."""
        ...

    def encode(self, images: Sequence[np.ndarray]) -> np.ndarray: ...

    def decode(self, features: np.ndarray) -> list[str]: ...

    def decode_ids(self, features: np.ndarray) -> list[list[int]]: ...

    def generate(self, images: Sequence[np.ndarray]) -> list[str]: ...

    def start(self, features: np.ndarray) -> DecoderState: ...

    def text(self, ids: Sequence[int]) -> str: ...


def trim_generated(seq: Sequence[int], prompt_len: int, eos_id: int) -> list[int]:
    """The caption tokens of a generated sequence: after the prompt, up to (without) EOS."""
    out: list[int] = []
    for t in list(seq)[prompt_len:]:
        if int(t) == eos_id:
            break
        out.append(int(t))
    return out


def _crop_cache(cache: Cache, keep: int) -> None:
    # transformers 5.x: crop(-n) removes n tokens (a positive absolute length raises); 4.x also
    # accepts a negative count, so this form works with both.
    cur = cache.get_seq_length()
    if keep < cur:
        cache.crop(keep - cur)


def _check_images(images: Sequence[np.ndarray]) -> None:
    if len(images) == 0:
        raise ModelError("encode() needs at least one image")
    for i, im in enumerate(images):
        if not (isinstance(im, np.ndarray) and im.ndim == 3 and im.shape[2] == 3 and im.dtype == np.uint8):
            got = f"{type(im).__name__} {getattr(im, 'shape', '')} {getattr(im, 'dtype', '')}"
            raise ModelError(f"image {i}: expected an RGB uint8 array of shape (H, W, 3), got {got}")


def _resize_normalize(
    images: Sequence[np.ndarray], size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Fallback preprocessing: area resize to ``size`` (height, width), scale to [0, 1], normalise."""
    h, w = size
    batch = np.stack(
        [im if im.shape[:2] == (h, w) else cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA) for im in images]
    ).astype(np.float32)
    batch /= 255.0
    batch -= np.asarray(mean, np.float32)
    batch /= np.asarray(std, np.float32)
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


def _hw(size: Any) -> tuple[int, int]:
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


class _HFCaptioner:
    """Shared plumbing of the three adapters: device/dtype, preprocessing, batching, text."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str,
        device: torch.device,
        dtype: torch.dtype,
        image_processor: Any = None,
    ) -> None:
        self._model = model.to(device=device, dtype=dtype).eval()
        self._tokenizer = tokenizer
        self._name = name
        self._device = device
        self._dtype = dtype
        self._processor = image_processor
        self._feature_shape: tuple[int, int] | None = None

    # -- properties ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def model(self) -> Any:
        """The wrapped Hugging Face model (for tests and tooling)."""
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def feature_shape(self) -> tuple[int, int]:
        if self._feature_shape is None:
            self._feature_shape = self._config_feature_shape() or self._probe_feature_shape()
        return self._feature_shape

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return (self._start_id(),)

    @property
    def eos_id(self) -> int:
        eos = self._generation_config().eos_token_id
        return int(eos[0] if isinstance(eos, (list, tuple)) else eos)

    @property
    def vocab_size(self) -> int:
        return int(self._model.config.get_text_config(decoder=True).vocab_size)

    @property
    def image_processor(self) -> Any:
        """The model's saved image processor, or None when the documented fallback is used
        (area resize to the vision config's size, then ViT or CLIP normalisation)."""
        return self._processor

    @property
    def max_length(self) -> int:
        gc = self._generation_config()
        if gc.max_length is not None:
            return int(gc.max_length)
        # transformers' own default when a checkpoint sets none: 20 new tokens, within the
        # position table of the model that generates.
        n = 20 + len(self.prompt_ids)
        cap = getattr(self._generating_model().config, "max_position_embeddings", None)
        return min(n, int(cap)) if cap is not None else n

    # -- the two halves -----------------------------------------------------------------------
    def pixel_values(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Model input for RGB uint8 images, on this captioner's device and dtype."""
        _check_images(images)
        if self._processor is not None:
            pv = self._processor(images=list(images), return_tensors="pt")["pixel_values"]
        else:
            pv = self._fallback_pixels(images)
        return pv.to(device=self._device, dtype=self._dtype)

    def encode(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Vision features ``(N, T, D)`` float32 of RGB uint8 images (the device half)."""
        pv = self.pixel_values(images)
        with torch.inference_mode():
            feats = self._encode_pixels(pv)
        return feats.float().cpu().numpy()

    def decode_ids(self, features: np.ndarray) -> list[list[int]]:
        """Greedy caption tokens (no prompt, no EOS) for features ``(N, T, D)``."""
        h = self._features(features)
        with torch.inference_mode():
            seqs = self._generate_from_features(h)
        return [trim_generated(s.tolist(), len(self.prompt_ids), self.eos_id) for s in seqs]

    def decode(self, features: np.ndarray) -> list[str]:
        """Greedy captions for features ``(N, T, D)`` (the edge/cloud half)."""
        return [self.text(ids) for ids in self.decode_ids(features)]

    def generate(self, images: Sequence[np.ndarray]) -> list[str]:
        """Whole-model captions, through the model's own ``generate`` (the reference)."""
        pv = self.pixel_values(images)
        with torch.inference_mode():
            seqs = self._generate_from_pixels(pv)
        return [self.text(trim_generated(s.tolist(), len(self.prompt_ids), self.eos_id)) for s in seqs]

    def text(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True)).strip()

    def start(self, features: np.ndarray) -> DecoderState:
        """An empty incremental decoder state over one image's features ``(T, D)``."""
        f = np.asarray(features)
        if f.ndim == 2:
            f = f[None]
        if f.shape[0] != 1:
            raise ModelError(f"start() takes one image's features (T, D), got shape {features.shape}")
        return self._new_state(self._features(f))

    # -- helpers ------------------------------------------------------------------------------
    def _features(self, features: np.ndarray) -> torch.Tensor:
        f = np.asarray(features)
        t, d = self.feature_shape
        if f.ndim != 3 or f.shape[1:] != (t, d):
            raise ModelError(
                f"{self._name}: expected features of shape (N, {t}, {d}), got {f.shape}; "
                "were they encoded by a model with a different vision encoder?"
            )
        return torch.from_numpy(np.ascontiguousarray(f)).to(device=self._device, dtype=self._dtype)

    def _probe_feature_shape(self) -> tuple[int, int]:
        h, w = self._input_size()
        feats = self.encode([np.zeros((h, w, 3), np.uint8)])
        return int(feats.shape[1]), int(feats.shape[2])

    # Subclass hooks.
    def _config_feature_shape(self) -> tuple[int, int] | None:
        return None

    def _input_size(self) -> tuple[int, int]:
        raise NotImplementedError

    def _fallback_pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return _resize_normalize(images, self._input_size(), CLIP_MEAN, CLIP_STD)

    def _start_id(self) -> int:
        raise NotImplementedError

    def _generating_model(self) -> Any:
        return self._model

    def _generation_config(self) -> Any:
        return self._generating_model().generation_config

    def _encode_pixels(self, pv: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _generate_from_features(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _generate_from_pixels(self, pv: torch.Tensor) -> torch.Tensor:
        return self._model.generate(pixel_values=pv, max_length=self.max_length)

    def _new_state(self, h: torch.Tensor) -> DecoderState:
        raise NotImplementedError


class _CrossAttentionState:
    """Incremental state of a decoder that cross-attends to the image features (GPT-2 in a
    VisionEncoderDecoder, BLIP's text decoder): self-attention cache grows and is cropped,
    the cross-attention keys/values are computed once on the first call."""

    def __init__(self, decoder: Any, hidden: torch.Tensor, mask: torch.Tensor | None) -> None:
        self._decoder = decoder
        self._hidden = hidden
        self._mask = mask
        cfg = decoder.config
        self._cache = EncoderDecoderCache(DynamicCache(config=cfg), DynamicCache(config=cfg))

    @property
    def length(self) -> int:
        return int(self._cache.get_seq_length())

    def feed(self, ids: Sequence[int]) -> torch.Tensor:
        x = torch.tensor([list(ids)], dtype=torch.long, device=self._hidden.device)
        kwargs: dict[str, Any] = {}
        if self._mask is not None:
            kwargs["encoder_attention_mask"] = self._mask
        with torch.inference_mode():
            out = self._decoder(
                input_ids=x,
                encoder_hidden_states=self._hidden,
                cache=self._cache,
                use_cache=True,
                **kwargs,
            )
        return out.logits[0].float()

    def crop(self, length: int) -> None:
        _crop_cache(self._cache, length)


class VisionEncoderDecoderCaptioner(_HFCaptioner):
    """A ``VisionEncoderDecoderModel``; features are the encoder's last hidden state.

    Split path: ``generate(encoder_outputs=...)`` with the features as the encoder output.
    """

    def _config_feature_shape(self) -> tuple[int, int] | None:
        enc = self._model.config.encoder
        if enc.model_type != "vit":
            return None
        h, w = _hw(enc.image_size)
        p = int(enc.patch_size)
        return (h // p) * (w // p) + 1, int(enc.hidden_size)

    def _input_size(self) -> tuple[int, int]:
        return _hw(self._model.config.encoder.image_size)

    def _fallback_pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        # ViT convention ([-1, 1]) with area resize: exactly the default family's preprocessing.
        h, w = self._input_size()
        return preprocess(list(images), size=(w, h))

    def _start_id(self) -> int:
        cfg = self._model.generation_config
        sid = cfg.decoder_start_token_id
        if sid is None:
            sid = self._model.config.decoder_start_token_id
        if sid is None:
            sid = cfg.bos_token_id
        return int(sid)

    def _encode_pixels(self, pv: torch.Tensor) -> torch.Tensor:
        return self._model.encoder(pixel_values=pv).last_hidden_state

    def _generate_from_features(self, h: torch.Tensor) -> torch.Tensor:
        return self._model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=h), max_length=self.max_length
        )

    def _new_state(self, h: torch.Tensor) -> DecoderState:
        proj = getattr(self._model, "enc_to_dec_proj", None)
        with torch.inference_mode():
            hidden = proj(h) if proj is not None else h
        return _CrossAttentionState(self._model.decoder, hidden, None)


class BlipCaptioner(_HFCaptioner):
    """``BlipForConditionalGeneration``; features are the vision model's last hidden state.

    Split path: ``text_decoder.generate(encoder_hidden_states=...)``, stopping on the text
    config's ``sep_token_id``, exactly as ``BlipForConditionalGeneration.generate`` does.
    """

    def _config_feature_shape(self) -> tuple[int, int] | None:
        v = self._model.config.vision_config
        n = (int(v.image_size) // int(v.patch_size)) ** 2 + 1
        return n, int(v.hidden_size)

    def _input_size(self) -> tuple[int, int]:
        return _hw(self._model.config.vision_config.image_size)

    def _start_id(self) -> int:
        return int(self._model.config.text_config.bos_token_id)

    def _generating_model(self) -> Any:
        return self._model.text_decoder

    @property
    def eos_id(self) -> int:
        return int(self._model.config.text_config.sep_token_id)

    def _encode_pixels(self, pv: torch.Tensor) -> torch.Tensor:
        return self._model.vision_model(pixel_values=pv)[0]

    def _generate_from_features(self, h: torch.Tensor) -> torch.Tensor:
        tcfg = self._model.config.text_config
        ids = torch.full((h.shape[0], 1), self._start_id(), dtype=torch.long, device=h.device)
        mask = torch.ones(h.shape[:-1], dtype=torch.long, device=h.device)
        return self._model.text_decoder.generate(
            input_ids=ids,
            eos_token_id=tcfg.sep_token_id,
            pad_token_id=tcfg.pad_token_id,
            encoder_hidden_states=h,
            encoder_attention_mask=mask,
            max_length=self.max_length,
        )

    def _new_state(self, h: torch.Tensor) -> DecoderState:
        mask = torch.ones(h.shape[:-1], dtype=torch.long, device=h.device)
        return _CrossAttentionState(self._model.text_decoder, h, mask)


class _FeatureFeeder(nn.Module):
    """Stands in for GIT's image encoder: its "pixel values" are precomputed features
    ``(N, 1, T, D)`` (rank 4, so GIT's forward takes the single-image path)."""

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=pixel_values[:, 0])


class _GitState:
    """Incremental state of GIT, whose image tokens sit at the head of its own KV cache."""

    def __init__(self, model: Any, feats: torch.Tensor, image_tokens: int) -> None:
        self._model = model
        self._feats = feats[:, None]  # (1, 1, T, D): fed through the _FeatureFeeder
        self._image_tokens = image_tokens
        self._cache = DynamicCache(config=model.config)

    @property
    def length(self) -> int:
        return max(0, int(self._cache.get_seq_length()) - self._image_tokens)

    def feed(self, ids: Sequence[int]) -> torch.Tensor:
        x = torch.tensor([list(ids)], dtype=torch.long, device=self._feats.device)
        first = self._cache.get_seq_length() == 0
        # Text positions count text tokens only; left to itself GIT would count the cached
        # image tokens too once they are in the cache.
        start = self.length
        pos = torch.arange(start, start + len(ids), device=x.device)[None]
        with torch.inference_mode():
            out = self._model(
                input_ids=x,
                position_ids=pos,
                pixel_values=self._feats if first else None,
                cache=self._cache,
                use_cache=True,
            )
        return out.logits[0, -len(ids):].float()

    def crop(self, length: int) -> None:
        _crop_cache(self._cache, self._image_tokens + length)


class GitCaptioner(_HFCaptioner):
    """``GitForCausalLM``; features are the CLIP image encoder's last hidden state.

    GIT has no argument for precomputed image features, so the adapter keeps the real image
    encoder for ``encode`` and puts a pass-through module in its place inside the model: the
    model's own ``generate`` then runs on the features unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        git = self._model.git
        self._vision = git.image_encoder
        git.image_encoder = _FeatureFeeder()

    def _config_feature_shape(self) -> tuple[int, int] | None:
        v = self._model.config.vision_config
        n = (int(v.image_size) // int(v.patch_size)) ** 2 + 1
        return n, int(v.hidden_size)

    def _input_size(self) -> tuple[int, int]:
        return _hw(self._model.config.vision_config.image_size)

    def _start_id(self) -> int:
        return int(self._model.generation_config.bos_token_id)

    def _encode_pixels(self, pv: torch.Tensor) -> torch.Tensor:
        return self._vision(pv).last_hidden_state

    def _generate_from_features(self, h: torch.Tensor) -> torch.Tensor:
        return self._model.generate(pixel_values=h[:, None], max_length=self.max_length)

    def _generate_from_pixels(self, pv: torch.Tensor) -> torch.Tensor:
        return self._generate_from_features(self._encode_pixels(pv))

    def _new_state(self, h: torch.Tensor) -> DecoderState:
        return _GitState(self._model, h, self.feature_shape[0])


# -- loading ------------------------------------------------------------------------------------

_ADAPTERS: dict[str, tuple[str, type[_HFCaptioner]]] = {
    "vision-encoder-decoder": ("VisionEncoderDecoderModel", VisionEncoderDecoderCaptioner),
    "blip": ("BlipForConditionalGeneration", BlipCaptioner),
    "git": ("GitForCausalLM", GitCaptioner),
}


def _resolve(name_or_path: str | Path, member: str) -> tuple[str, str, bool]:
    """(what to pass to from_pretrained, display name, is_local)."""
    if member not in MEMBERS:
        raise ModelError(f"member must be one of {MEMBERS}, got {member!r}")
    spec = str(name_or_path)
    if spec == "default" or spec.startswith("default:"):
        if ":" in spec:
            member = spec.split(":", 1)[1]
            if member not in MEMBERS:
                raise ModelError(f"unknown default family member {member!r}; use default:target or default:draft")
        path = DEFAULT_DIR / member
        if not (path / "config.json").is_file():
            raise ModelError(
                f"the default model family is not installed: {path / 'config.json'} is missing "
                "(train it with `python -m aiflow_stream.models.train`)"
            )
        return str(path), f"default:{member}", True
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return str(path), path.name or spec, True
    if (path / member / "config.json").is_file():  # a family directory: draft/ and target/
        return str(path / member), f"{path.name}:{member}", True
    return spec, spec, False


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available here; use device='cpu'")
    return dev


def load_captioner(
    name_or_path: str | Path,
    *,
    member: str = "target",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    allow_download: bool = False,
) -> Captioner:
    """Load a captioner by local path or Hugging Face hub name.

    ``"default"``, ``"default:target"`` and ``"default:draft"`` name the shipped family; a
    directory holding ``draft/`` and ``target/`` is a family too (``member`` picks one). Hub
    names resolve from the local Hugging Face cache only, unless ``allow_download``. ``dtype``
    defaults to float16 on CUDA and float32 on CPU (the shipped float16 weights are upcast).
    """
    import transformers  # heavy; deferred so importing this module stays cheap to reason about

    dev = _device(device)
    dt = dtype if dtype is not None else (torch.float16 if dev.type == "cuda" else torch.float32)
    target, display, local = _resolve(name_or_path, member)
    offline = not (allow_download and not local)
    tried = (
        f"local path {Path(target).expanduser().resolve()} (no config.json there)"
        if not local
        else f"local path {target}"
    )
    try:
        config = transformers.AutoConfig.from_pretrained(target, local_files_only=offline)
    except Exception as err:  # hub and IO errors come in many types
        where = "the local Hugging Face cache" if offline else "the Hugging Face hub"
        hint = "" if allow_download else " (pass allow_download=True to fetch it)"
        raise ModelError(
            f"captioner {str(name_or_path)!r} not found: tried {tried}, then hub name {target!r} in {where}{hint}: {err}"
        ) from err
    kind = getattr(config, "model_type", None)
    if kind not in _ADAPTERS:
        raise ModelError(
            f"captioner {display!r} has model_type {kind!r}; supported: {', '.join(sorted(_ADAPTERS))}"
        )
    cls_name, adapter = _ADAPTERS[kind]
    model_cls = getattr(transformers, cls_name)
    try:
        model = model_cls.from_pretrained(target, local_files_only=offline, dtype=dt)
    except Exception as err:
        raise ModelError(f"could not load {cls_name} from {target!r}: {err}") from err
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(target, local_files_only=offline)
    except Exception as err:
        raise ModelError(f"captioner {display!r} has no loadable tokenizer at {target!r}: {err}") from err
    processor = None
    if kind != "vision-encoder-decoder" or not display.startswith("default"):
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(target, local_files_only=offline)
        except Exception:  # absent processor: use the documented fallback
            logger.info("no image processor saved with %s; using resize + normalise fallback", display)
    logger.info("loaded %s (%s) on %s as %s", display, cls_name, dev, dt)
    return adapter(model, tokenizer, display, dev, dt, processor)
