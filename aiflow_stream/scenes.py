"""The synthetic scene grammar: coloured shapes on a 3x3 grid, each scene with its caption.

Shared by the synthetic frame source (``sources/synthetic.py``) and the default captioner's
training and evaluation (``models/``). Everything here is deterministic given a seed.

A scene holds 1 to 3 shapes, each in its own cell of a 3x3 grid, with a size, a colour and a
kind. Its caption lists the shapes in reading order (row by row, left to right)::

    a large red circle at the top left and a small blue square in the center

Held-out split: a scene belongs to the held-out split when the CRC32 of its caption is 0 modulo
``HELDOUT_MODULUS``; training only ever sees the others, so evaluation is on compositions the
model has never seen.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: tuple[str, ...] = ("small", "large")
# Saturated, mutually distinct colours (RGB); each render jitters them a little.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "white": (235, 235, 235),
    "purple": (160, 60, 200),
}
# Cell index (row * 3 + col) -> the words that place a shape there.
POSITIONS: tuple[str, ...] = (
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the center",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
)
# Half-extent of a shape as a fraction of the cell's smaller side.
SIZE_EXTENT: dict[str, float] = {"small": 0.22, "large": 0.42}
HELDOUT_MODULUS = 20
MAX_SHAPES = 3


def vocabulary() -> list[str]:
    """Every word a caption can contain, in a fixed order."""
    words = ["a", "and"]
    words += list(SIZES) + list(COLOURS) + list(SHAPES)
    for phrase in POSITIONS:
        for w in phrase.split():
            if w not in words:
                words.append(w)
    return words


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    cell: int  # 0..8, row-major

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.kind} {POSITIONS[self.cell]}"


@dataclass(frozen=True)
class Scene:
    """One scene: the shapes (sorted by cell) plus rendering parameters that do not change
    the caption (exact placement inside the cell, background, clutter)."""

    shapes: tuple[Shape, ...]
    seed: int
    background: tuple[int, int, int] = (30, 30, 30)
    clutter: int = 0
    offsets: tuple[tuple[float, float], ...] = field(default_factory=tuple)

    @property
    def caption(self) -> str:
        return " and ".join(s.phrase() for s in self.shapes)

    @property
    def heldout(self) -> bool:
        return is_heldout(self.caption)


def is_heldout(caption: str) -> bool:
    return zlib.crc32(caption.encode()) % HELDOUT_MODULUS == 0


def random_scene(rng: np.random.Generator, clutter: bool = True) -> Scene:
    n = int(rng.integers(1, MAX_SHAPES + 1))
    cells = sorted(rng.choice(9, size=n, replace=False).tolist())
    colour_names = list(COLOURS)
    shapes = tuple(
        Shape(
            kind=SHAPES[int(rng.integers(len(SHAPES)))],
            colour=colour_names[int(rng.integers(len(colour_names)))],
            size=SIZES[int(rng.integers(len(SIZES)))],
            cell=int(c),
        )
        for c in cells
    )
    bg = tuple(int(v) for v in rng.integers(10, 70, size=3))
    offsets = tuple((float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1))) for _ in shapes)
    return Scene(
        shapes=shapes,
        seed=int(rng.integers(2**31)),
        background=bg,  # type: ignore[arg-type]
        clutter=int(rng.integers(0, 6)) if clutter else 0,
        offsets=offsets,
    )


def scenes(seed: int, split: str = "train", clutter: bool = True) -> Iterator[Scene]:
    """An endless deterministic stream of scenes of one split (``train``, ``heldout``, ``any``)."""
    if split not in ("train", "heldout", "any"):
        raise ValueError(f"split must be 'train', 'heldout' or 'any', got {split!r}")
    rng = np.random.default_rng(seed)
    while True:
        s = random_scene(rng, clutter=clutter)
        if split == "any" or (split == "heldout") == s.heldout:
            yield s


def heldout_scenes(n: int, seed: int = 1234) -> list[Scene]:
    """The first ``n`` held-out scenes of the evaluation stream (the evaluation set)."""
    it = scenes(seed, split="heldout")
    return [next(it) for _ in range(n)]


def _shape_points(kind: str, cx: float, cy: float, r: float) -> np.ndarray | None:
    if kind == "triangle":
        pts = [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    elif kind == "cross":
        t = r * 0.38
        pts = [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
            (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
            (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]
    else:
        return None
    return np.array(pts, dtype=np.float64)


_SHIFT = 4  # fixed-point bits for sub-pixel drawing


def render(
    scene: Scene,
    width: int = 1280,
    height: int = 720,
    *,
    noise: float = 0.0,
    motion: tuple[float, float] = (0.0, 0.0),
    rng: np.random.Generator | None = None,
    noise_bank: np.ndarray | None = None,
) -> np.ndarray:
    """Draw ``scene`` as an RGB uint8 image of ``height x width``.

    ``motion`` shifts every shape by a fraction of its cell's free room (small camera/object
    motion that never moves a shape out of its cell, so the caption holds). ``noise`` is the
    standard deviation of per-pixel Gaussian noise; with ``noise_bank`` (int8 tiles, see
    :func:`noise_bank`) a precomputed tile is added instead, which is ~20x cheaper.
    """
    rng = rng if rng is not None else np.random.default_rng(scene.seed)
    img = np.empty((height, width, 3), np.uint8)
    # Background: the base colour with a soft vertical gradient.
    grad = np.linspace(0.85, 1.15, height, dtype=np.float32)[:, None, None]
    img[:] = np.clip(np.asarray(scene.background, np.float32)[None, None, :] * grad, 0, 255)
    cw, ch = width / 3.0, height / 3.0
    unit = min(cw, ch)
    srng = np.random.default_rng(scene.seed)  # placement jitter fixed per scene
    # Clutter: thin grey strokes and specks, far smaller than any shape, never captioned.
    for _ in range(scene.clutter):
        x0, y0 = srng.uniform(0, width), srng.uniform(0, height)
        ang = srng.uniform(0, np.pi)
        ln = srng.uniform(0.1, 0.35) * unit
        grey = int(srng.integers(70, 140))
        p0 = (int(x0 * 16), int(y0 * 16))
        p1 = (int((x0 + ln * np.cos(ang)) * 16), int((y0 + ln * np.sin(ang)) * 16))
        cv2.line(img, p0, p1, (grey, grey, grey), max(1, int(unit * 0.012)), cv2.LINE_AA, _SHIFT)
    offsets = scene.offsets or tuple((0.0, 0.0) for _ in scene.shapes)
    for shape, (ox, oy) in zip(scene.shapes, offsets):
        r = SIZE_EXTENT[shape.size] * unit
        room_x, room_y = cw / 2 - r * 1.05, ch / 2 - r * 1.05
        row, col = divmod(shape.cell, 3)
        mx = np.clip(ox * 0.7 + motion[0] * 0.3, -1, 1)
        my = np.clip(oy * 0.7 + motion[1] * 0.3, -1, 1)
        cx = (col + 0.5) * cw + mx * room_x
        cy = (row + 0.5) * ch + my * room_y
        base = np.asarray(COLOURS[shape.colour], np.int32) + srng.integers(-18, 19, size=3)
        colour = tuple(int(v) for v in np.clip(base, 0, 255))
        if shape.kind == "circle":
            cv2.circle(img, (int(cx * 16), int(cy * 16)), int(r * 16), colour, -1, cv2.LINE_AA, _SHIFT)
        elif shape.kind == "square":
            s = r * 0.88
            pts = np.array([(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)])
            cv2.fillPoly(img, [np.round(pts * 16).astype(np.int32)], colour, cv2.LINE_AA, _SHIFT)
        else:
            poly = _shape_points(shape.kind, cx, cy, r)
            assert poly is not None
            cv2.fillPoly(img, [np.round(poly * 16).astype(np.int32)], colour, cv2.LINE_AA, _SHIFT)
    if noise_bank is not None:
        tile = noise_bank[int(rng.integers(len(noise_bank)))]
        _add_tile(img, tile, rng)
    elif noise > 0:
        n = rng.normal(0.0, noise, size=img.shape).astype(np.int16)
        img = np.clip(img.astype(np.int16) + n, 0, 255).astype(np.uint8)
    return img


def noise_bank(height: int, width: int, std: float, count: int = 6, seed: int = 0) -> np.ndarray:
    """Precomputed int8 Gaussian noise tiles (``count x H x W x 3``) for cheap camera noise."""
    rng = np.random.default_rng(seed)
    n = rng.normal(0.0, std, size=(count, height, width, 3))
    return np.clip(n, -127, 127).astype(np.int8)


def _add_tile(img: np.ndarray, tile: np.ndarray, rng: np.random.Generator) -> None:
    # A random roll keeps consecutive frames from carrying identical noise.
    dy = int(rng.integers(0, tile.shape[0]))
    tile = np.roll(tile, dy, axis=0)
    signed = img.astype(np.int16)
    signed += tile
    np.clip(signed, 0, 255, out=signed)
    img[:] = signed


MODEL_INPUT_SIZE = (112, 64)  # (width, height) the default captioner sees


def to_model_input(frame: np.ndarray, size: tuple[int, int] = MODEL_INPUT_SIZE) -> np.ndarray:
    """Resize a captured RGB frame to the model's input with area averaging."""
    if frame.shape[1] == size[0] and frame.shape[0] == size[1]:
        return frame
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
