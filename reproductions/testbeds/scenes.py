"""Segmentation canvases of Fashion-MNIST garments with a per-pixel class mask (the DToP test-bed's data).

Each 48 x 48 canvas holds garments at random positions and scales on a textured background; a pixel belongs to a
garment where the garment's (resized) intensity exceeds :data:`INK`, and a later garment covers an earlier one. The
mask has the 10 garment classes and background (:data:`BACKGROUND` = 10).

Difficulty varies on purpose, so that an early exit has easy tokens to take:

- *easy*: 1-2 large garments (24-36 px), placed without overlap where possible, on a faint smooth texture;
- *hard*: 3-5 small garments (12-22 px), overlapping, on a strong high-frequency texture with clutter (background
  patches as bright as the garments).

Train canvases draw garments from Fashion-MNIST's training split, test canvases from its test split; everything is
a function of the seed.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from prunelab.reproductions.testbeds.fashion import load_fashion_mnist

SIZE = 48  # canvas pixels; with 4 px patches a 12 x 12 token grid
BACKGROUND = 10
NUM_CLASSES = 11
INK = 0.2  # a resized garment pixel brighter than this is the garment's
EASY = {"items": (1, 2), "scale": (24, 36), "texture": 0.10, "freq": (1, 3), "clutter": 0}
HARD = {"items": (3, 5), "scale": (12, 22), "texture": 0.30, "freq": (4, 9), "clutter": (2, 4)}
MEAN, STD = 0.22, 0.25  # of the canvases' pixels (measured on 2,000 training canvases, rounded)


class Canvases(NamedTuple):
    """``images`` [N, 1, 48, 48] float (normalised), ``masks`` [N, 48, 48] int64, ``hard`` [N] bool."""

    images: torch.Tensor
    masks: torch.Tensor
    hard: torch.Tensor


def _texture(rng: np.random.Generator, amplitude: float, freq: tuple[int, int]) -> np.ndarray:
    """A sum of two random gratings and pixel noise in [0, amplitude]."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    t = np.zeros((SIZE, SIZE))
    for _ in range(2):
        fy, fx = rng.integers(freq[0], freq[1] + 1, size=2)
        t += np.sin(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 2 * np.pi))
    t = (t - t.min()) / max(np.ptp(t), 1e-6)
    return amplitude * (0.8 * t + 0.2 * rng.random((SIZE, SIZE)))


def _resize(item: np.ndarray, size: int) -> np.ndarray:
    x = torch.from_numpy(item).float()[None, None] / 255.0
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()


def _place(rng, size: int, boxes: list, avoid: bool) -> tuple[int, int]:
    """Top-left corner for a ``size`` square; with ``avoid``, one not overlapping ``boxes`` if 20 draws find it."""
    for _ in range(20 if avoid else 1):
        y, x = (int(v) for v in rng.integers(0, SIZE - size + 1, size=2))
        if not avoid or all(y + size <= by or by + bs <= y or x + size <= bx or bx + bs <= x for by, bx, bs in boxes):
            break
    return y, x


def render(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, hard: bool
           ) -> tuple[np.ndarray, np.ndarray]:
    """One canvas (float [48, 48] in [0, 1]) and its mask (int64 [48, 48]) from garments drawn out of ``images``."""
    spec = HARD if hard else EASY
    canvas = _texture(rng, spec["texture"], spec["freq"])
    mask = np.full((SIZE, SIZE), BACKGROUND, dtype=np.int64)
    if spec["clutter"]:
        for _ in range(int(rng.integers(spec["clutter"][0], spec["clutter"][1] + 1))):
            h, w = (int(v) for v in rng.integers(4, 12, size=2))
            y, x = int(rng.integers(0, SIZE - h + 1)), int(rng.integers(0, SIZE - w + 1))
            canvas[y:y + h, x:x + w] = rng.uniform(0.3, 0.8) * _texture(rng, 1.0, (3, 8))[:h, :w] ** 0.5
    boxes: list[tuple[int, int, int]] = []
    for _ in range(int(rng.integers(spec["items"][0], spec["items"][1] + 1))):
        i = int(rng.integers(len(images)))
        size = int(rng.integers(spec["scale"][0], spec["scale"][1] + 1))
        item = _resize(images[i], size)
        y, x = _place(rng, size, boxes, avoid=not hard)
        boxes.append((y, x, size))
        ink = item > INK
        canvas[y:y + size, x:x + size][ink] = item[ink]
        mask[y:y + size, x:x + size][ink] = int(labels[i])
    return canvas, mask


def make_canvases(split: str, n: int, seed: int = 0, *, hard_share: float = 0.5, root: str | None = None
                  ) -> Canvases:
    """``n`` canvases from Fashion-MNIST's ``split`` ("train" or "test"), a ``hard_share`` of them hard."""
    if not 0.0 <= hard_share <= 1.0:
        raise ValueError(f"hard_share: must lie in [0, 1], got {hard_share}")
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    images, labels = load_fashion_mnist(split, root)
    images, labels = images.numpy(), labels.numpy()
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    hard = rng.random(n) < hard_share
    pix, masks = zip(*(render(rng, images, labels, bool(h)) for h in hard))
    x = torch.from_numpy(np.stack(pix)).float()[:, None]
    return Canvases((x - MEAN) / STD, torch.from_numpy(np.stack(masks)), torch.from_numpy(hard))
