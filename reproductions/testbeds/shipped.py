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


def save_with_vocabulary(model, words, info: dict, path: str | Path) -> str:
    """Write ``model`` as fp16 safetensors with its vocabulary ``words`` and ``info`` (JSON) in the metadata; the
    file's SHA-256."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"vocabulary": "\n".join(words), "info": json.dumps(info)})
    return sha256(path)


def state_with_vocabulary(path: str | Path | None, shipped: Path, digest: str, command: str, words, *,
                          check: bool = True) -> dict:
    """The fp32 tensors of a file :func:`save_with_vocabulary` wrote (checked as :func:`metadata` does); a file
    trained with another vocabulary than ``words`` is refused, naming ``path``."""
    from safetensors.torch import load_file

    path, meta = metadata(path, shipped, digest, command, check=check)
    if meta.get("vocabulary") != "\n".join(words):
        raise ValueError(f"path: {path} was trained with another vocabulary than vocabulary() gives now; retrain it")
    return {k: v.float() for k, v in load_file(str(path)).items()}


def load_with_vocabulary(build, path: str | Path | None, shipped: Path, digest: str, command: str, words, *,
                         check: bool = True):
    """``(model, tokenizer)`` of ``build()`` with the tensors of :func:`state_with_vocabulary` loaded strictly, in
    eval mode: how a test-bed saved with its vocabulary comes back."""
    model, tok = build()
    model.load_state_dict(state_with_vocabulary(path, shipped, digest, command, words, check=check), strict=True)
    return model.eval(), tok
