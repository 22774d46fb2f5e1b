"""Analytic per-image MACs of a Vim whose token count changes from block to block (ToP-ViM, arXiv 2409.18962).

Convention, as ``prunelab.common.flops``: one multiply-accumulate is one FLOP (the papers' "GFLOPs"), and only
products are counted, never norms, activations, the gate or adds. A Vim block spends, per token it computes:

- ``in_proj`` C * 2 d_inner and ``out_proj`` d_inner * C;
- per scan direction (two): the depthwise causal conv d_inner * d_conv, ``x_proj`` d_inner * (dt_rank + 2 N),
  ``dt_proj`` dt_rank * d_inner, and the scan 2 N d_inner: the state update h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t
  (one MAC per state and channel) and the read-out C_t h_t (one more).

With this count dense Vim-S is 5.08 G and the official physical removal (blocks 5, 10, 15 at 0.8) 3.57 G, the figures
cited for Vim-S dense and EViT-style pruning (``tests/test_top_vim.py``).

Under the aligned modes the scans also walk the pruned slots. Such a visit is charged the state decay only,
h_t = exp(Δ_t A) h_{t-1}: N d_inner per direction (:func:`visit_macs`), as a scan driven by a position map would
compute it (the paper's kernel, not released); the projections and the conv are charged for the kept tokens only,
as the paper states that only survivors are computed outside the scan. Vim-S then costs 3.61 G (cited for ToP-ViM:
3.60 G). The plain-PyTorch reference in :mod:`.seam` computes more than this: it runs every block over all slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["VimDims", "token_macs", "visit_macs", "vim_macs", "dense_macs", "top_vim_macs"]


@dataclass(frozen=True)
class VimDims:
    """The sizes that determine a Vim's MACs."""

    depth: int
    embed_dim: int
    d_inner: int
    d_state: int
    d_conv: int
    dt_rank: int
    num_patches: int
    patch_in: int  # in_chans * patch_h * patch_w: MACs per patch and output channel of the patch embedding
    num_outputs: int  # classifier outputs (0 without a head)

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1

    @classmethod
    def from_model(cls, model: Any) -> VimDims:
        """The sizes of a :class:`~prunelab.methods.top_vim.vim.VisionMamba`."""
        mixer, proj = model.layers[0].mixer, model.patch_embed.proj
        head = model.head
        return cls(depth=len(model.layers), embed_dim=model.cfg.embed_dim, d_inner=mixer.d_inner,
                   d_state=mixer.d_state, d_conv=mixer.d_conv, dt_rank=mixer.dt_rank,
                   num_patches=model.patch_embed.num_patches,
                   patch_in=proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1],
                   num_outputs=getattr(head, "out_features", 0))


def token_macs(dims: VimDims) -> int:
    """MACs one block spends on one token it computes (module docstring)."""
    c, d, n, r = dims.embed_dim, dims.d_inner, dims.d_state, dims.dt_rank
    direction = d * dims.d_conv + d * (r + 2 * n) + r * d + 2 * n * d
    return c * 2 * d + 2 * direction + d * c


def visit_macs(dims: VimDims) -> int:
    """MACs of both scans passing one pruned slot: the state decay, N d_inner per direction."""
    return 2 * dims.d_state * dims.d_inner


def vim_macs(dims: VimDims, tokens_per_block: Sequence[int] | None = None,
             slots_per_block: Sequence[int] | None = None) -> int:
    """MACs of a forward pass of one image.

    Args:
        dims: model sizes (:meth:`VimDims.from_model`).
        tokens_per_block: tokens each block computes; default: every token (the dense model).
        slots_per_block: sequence slots each block's scans walk (>= its tokens); default: its tokens (no pruned
            slot is visited, as under physical removal).
    """
    tokens = list(tokens_per_block) if tokens_per_block is not None else [dims.num_tokens] * dims.depth
    slots = list(slots_per_block) if slots_per_block is not None else tokens
    if len(tokens) != dims.depth or len(slots) != dims.depth:
        raise ValueError(f"tokens_per_block: expected {dims.depth} entries (and as many slots), got {len(tokens)} "
                         f"and {len(slots)}")
    if any(not 1 <= n <= s <= dims.num_tokens for n, s in zip(tokens, slots)):
        raise ValueError(f"tokens_per_block: each count must lie in [1, slots <= {dims.num_tokens}], got {tokens} "
                         f"over {slots}")
    embed = dims.num_patches * dims.patch_in * dims.embed_dim
    blocks = sum(n * token_macs(dims) + (s - n) * visit_macs(dims) for n, s in zip(tokens, slots))
    return embed + blocks + dims.embed_dim * dims.num_outputs


def dense_macs(model: Any) -> int:
    """MACs of the dense model for one image."""
    return vim_macs(VimDims.from_model(model))


def top_vim_macs(model: Any, method: Any) -> int:
    """MACs of one image under ``method`` (a :class:`~prunelab.methods.top_vim.method.ToPViM`), from its schedule."""
    dims = VimDims.from_model(model)
    return vim_macs(dims, method.tokens_per_block(dims.num_tokens, dims.depth),
                    method.slots_per_block(dims.num_tokens, dims.depth))
