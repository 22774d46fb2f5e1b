"""The ``impl="auto" | "torch" | "triton"`` choice shared by every kernel op."""

from __future__ import annotations

import importlib.util
import os

import torch

IMPLS = ("auto", "torch", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """``"torch"`` or ``"triton"`` for tensors like ``x``.

    ``auto`` takes Triton on CUDA when it is installed, torch otherwise. An explicit ``"triton"`` on CPU
    needs Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported).
    """
    check_impl(impl)
    if impl == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton': triton is not importable; install prunelab[triton] or use impl='torch'")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise RuntimeError(f"impl='triton': tensors are on {x.device} but TRITON_INTERPRET is not set; set "
                               "TRITON_INTERPRET=1 before importing triton, or use impl='torch'")
    return impl
