"""Preprocessing of Fashion-MNIST for the tiny Zero-TPrune reproduction.

Loading lives in ``prunelab.reproductions.testbeds.fashion`` (re-exported here). The images are upsampled
28 -> 56 so that a 4 x 4 patch embedding yields DeiT's 14 x 14 grid (196 patch tokens + CLS).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from prunelab.reproductions.testbeds.fashion import (  # noqa: F401  (re-exported for existing callers)
    CLASSES,
    DEFAULT_ROOT,
    FILES,
    IMAGES_MAGIC,
    LABELS_MAGIC,
    NAMES,
    file_sha256,
    load_fashion_mnist,
    read_idx,
    split_paths,
)

# Statistics of the 60k training images after the 56 px bilinear upsampling, on the [0, 1] scale.
# Fixed constants so that preprocessing does not depend on which subset was loaded.
MEAN = 0.2860
STD = 0.3369

IMG_SIZE = 56


def preprocess(images_uint8: torch.Tensor, size: int = IMG_SIZE) -> torch.Tensor:
    """Turns uint8 images ``[N, 28, 28]`` into normalised float ``[N, 1, size, size]`` (default 56).

    Bilinear upsampling to 56 px makes a 4 x 4 patch grid 14 x 14, i.e. DeiT's 196 patch tokens.
    """
    x = images_uint8.to(torch.float32).div_(255.0)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - MEAN) / STD


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    size: int = IMG_SIZE,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields preprocessed ``(x, y)`` batches; shuffled when a generator is given.

    Preprocessing happens per batch so the 56 px float copy of the data never sits in memory at once.
    """
    n = len(images)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield preprocess(images[idx], size), labels[idx]
