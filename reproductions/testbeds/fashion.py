"""Fashion-MNIST loading shared by the offline test-beds.

The images come from the Debian package ``dataset-fashion-mnist`` as IDX gz files (uint8 28 x 28, 60k train,
10k test). :func:`preprocess` turns them into the ViT test-bed's input: upsampled 28 -> 56 px, so that a 4 x 4
patch embedding gives DeiT's 14 x 14 grid (196 patch tokens + CLS); the ViT family's reproductions use it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# One lower-case word per class for prompts; NAMES[i] names CLASSES[i] (label i), PLURALS[i] its plural. Each is one
# token of SmolLM2's tokenizer after a space (" bag"), so an answer is one next-token choice: T-shirt/top -> "top",
# pullover -> "knit", sandal -> "slide" (a sandal type), sneaker -> "shoe", ankle boot -> "boot".
NAMES = ("top", "trousers", "knit", "dress", "coat", "slide", "shirt", "shoe", "bag", "boot")
PLURALS = ("tops", "trousers", "knits", "dresses", "coats", "slides", "shirts", "shoes", "bags", "boots")

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# IDX magic numbers: two zero bytes, dtype code 0x08 (uint8), number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


def read_idx(path: str, magic: int) -> np.ndarray:
    """Reads one gzip-compressed IDX file of unsigned bytes.

    Args:
        path: Path of the ``.gz`` file.
        magic: Expected magic number (``IMAGES_MAGIC`` or ``LABELS_MAGIC``).

    Returns:
        A uint8 array shaped by the dimensions stored in the header.

    Raises:
        ValueError: If the magic number or the payload size does not match.
    """
    with gzip.open(path, "rb") as f:
        raw = f.read()
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: bad IDX magic number {got:#010x}, expected {magic:#010x}")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header announces {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def split_paths(split: str, root: str | None = None) -> tuple[str, str]:
    """Returns the (images, labels) paths of ``split`` under ``root``.

    Raises:
        ValueError: If ``split`` is not ``"train"`` or ``"test"``.
        FileNotFoundError: If a file is missing, with instructions to install the data.
    """
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got split={split!r}")
    root = DEFAULT_ROOT if root is None else root
    paths = tuple(os.path.join(root, name) for name in FILES[split])
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Fashion-MNIST file not found: {path}. Install the Debian package dataset-fashion-mnist "
                "(apt-get install dataset-fashion-mnist) or pass --data DIR"
            )
    return paths  # type: ignore[return-value]


def load_fashion_mnist(split: str, root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads one Fashion-MNIST split.

    Args:
        split: ``"train"`` (60k images) or ``"test"`` (10k images).
        root: Folder holding the four IDX gz files; defaults to ``DEFAULT_ROOT``.

    Returns:
        ``(images, labels)``: uint8 ``[N, 28, 28]`` and int64 ``[N]``.
    """
    img_path, lbl_path = split_paths(split, root)
    images = read_idx(img_path, IMAGES_MAGIC)
    labels = read_idx(lbl_path, LABELS_MAGIC)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"inconsistent IDX shapes {images.shape} and {labels.shape} under {root}")
    # np.frombuffer gives a read-only view; copy so that torch owns writable memory.
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def file_sha256(path: str) -> str:
    """Returns the hex sha256 of a file (identifies the exact training data used)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
