"""Shipped weights files of the test-beds: their checksum and the checked opening of their metadata."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256(path: str | Path) -> str:
    """The SHA-256 hex digest of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def metadata(path: str | Path | None, shipped: Path, digest: str, command: str, *, check: bool = True
             ) -> tuple[Path, dict]:
    """``(path, metadata)`` of a safetensors weights file, ``path`` defaulting to ``shipped``.

    Raises naming ``path`` when the file is missing (saying how to train it with ``command``) or when the shipped
    file's SHA-256 is not ``digest`` (unless ``check`` is False)."""
    from safetensors.torch import safe_open

    path = Path(shipped if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no test-bed weights at {path}; train them with `{command}`")
    if check and path == shipped and sha256(path) != digest:
        raise ValueError(f"path: {path} does not match the recorded SHA-256 {digest}; retrain or restore it")
    with safe_open(str(path), "pt") as f:
        return path, f.metadata() or {}
