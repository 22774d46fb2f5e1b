"""What every kernel op shares: the ``impl="auto" | "torch" | "triton"`` choice and input checks."""

from __future__ import annotations

import importlib.util
import os

import torch

IMPLS = ("auto", "torch", "triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def attention_tiles(head_dim: int, dtype: torch.dtype, block_m: int | None = None,
                    block_n: int | None = None) -> dict:
    """Launch settings of the flash-style attention kernels (``attention_received``, ``image_query_received``):
    ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_D``, ``UPCAST`` (bf16 dots in fp32 under the interpreter), ``DOT_PRECISION``
    (IEEE for fp32: no TF32), ``num_warps`` and ``num_stages``. Under the interpreter fewer, larger programs are
    cheaper; on a GPU wider heads take more warps and fewer stages."""
    import triton

    block_d = max(16, triton.next_power_of_2(head_dim))
    warps, stages = (4, 1) if interpreting() else ((4, 3) if block_d <= 64 else (8, 2))
    return dict(BLOCK_M=block_m or 64, BLOCK_N=block_n or 64, BLOCK_D=block_d,
                UPCAST=interpreting() and dtype == torch.bfloat16,
                DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)


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


def check_decode_qk(q: torch.Tensor, k_cache: torch.Tensor) -> None:
    """Shared checks for a decode query ``[B, Hq, d]`` against a key cache ``[B, Hkv, T, d]``."""
    for name, t, shape in (("q", q, "[B, Hq, d]"), ("k_cache", k_cache, "[B, Hkv, T, d]")):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != len(shape.split(",")):
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name}: dtype must be one of float32/float16/bfloat16, got {t.dtype}")
        if 0 in t.shape:
            raise ValueError(f"{name}: all sizes must be >= 1, got shape {tuple(t.shape)}")
    B, hq, d = q.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != d:
        raise ValueError(f"k_cache: B and d must match q {(B, d)}, got shape {tuple(k_cache.shape)}")
    if hq % k_cache.shape[1]:
        raise ValueError(f"k_cache: its Hkv={k_cache.shape[1]} heads must divide q's Hq={hq} heads (GQA)")
    if k_cache.dtype != q.dtype or k_cache.device != q.device:
        raise ValueError(f"k_cache: dtype/device must match q ({q.dtype}, {q.device}), got ({k_cache.dtype}, "
                         f"{k_cache.device})")
