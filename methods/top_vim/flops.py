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

__all__ = ["VimDims", "token_macs", "visit_macs", "vim_macs", "dense_macs", "top_vim_macs", "SCAN_CONVENTIONS",
           "PlainDims", "plain_mamba_macs"]


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


# -- PlainMamba --------------------------------------------------------------------------------------------------------
SCAN_CONVENTIONS = {"prunelab": 2, "fvcore": 9}  # MACs per scan step, state and channel


@dataclass(frozen=True)
class PlainDims:
    """The sizes that determine a PlainMamba's MACs."""

    depth: int
    embed_dim: int
    d_inner: int
    d_state: int
    conv_size: int
    dt_rank: int
    grid: tuple[int, int]
    stem: tuple[int, int]  # the stem's output size
    in_chans: int
    num_convs: int  # 3x3 64-channel convs after the stem
    patch_half: int  # the projection's kernel size (patch_size / 2)
    dwconv_layers: int  # layers with the 3x3 depthwise conv after them (L1: one)
    num_outputs: int

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @classmethod
    def from_model(cls, model: Any) -> PlainDims:
        """The sizes of a :class:`~prunelab.methods.top_vim.plain_mamba.PlainMamba`."""
        cfg, mixer = model.cfg, model.layers[0].mamba
        stem = tuple((s + 2 * 3 - 7) // 2 + 1 for s in cfg.img_size)
        return cls(depth=cfg.depth, embed_dim=cfg.embed_dim, d_inner=mixer.d_inner, d_state=mixer.d_state,
                   conv_size=cfg.conv_size, dt_rank=mixer.dt_rank, grid=model.grid, stem=stem, in_chans=cfg.in_chans,
                   num_convs=cfg.num_convs_patch_embed, patch_half=cfg.patch_size // 2,
                   dwconv_layers=len(cfg.layers_with_dwconv), num_outputs=getattr(model.head, "out_features", 0))


def plain_mamba_macs(dims: PlainDims, tokens_per_block: Sequence[int] | None = None,
                     scan_convention: str = "prunelab") -> int:
    """MACs of a PlainMamba forward pass of one image, with ``tokens_per_block`` tokens in each block (default:
    every grid cell).

    Per block, on the tokens it holds: ``in_proj`` C * 2 d_inner, ``out_proj`` d_inner * C and four scans of
    ``s`` N d_inner each; on every grid cell (as :class:`~prunelab.methods.top_vim.plain_mamba.PlainMamba2D`
    computes them, since a scan step may read Δ, B, C of an empty cell): the depthwise conv d_inner k^2, ``x_proj``
    d_inner (dt_rank + 2 N) and ``dt_proj`` dt_rank d_inner. A run of empty cells decays the state in one step with
    the next kept token, so gaps cost nothing extra. ``s`` is 2 under ``scan_convention="prunelab"`` (the state
    update and the read-out, as :func:`vim_macs` counts) and 9 under ``"fvcore"`` (the selective-scan count of the
    fvcore handle VMamba and PlainMamba report GFLOPs with: dense PlainMamba-L1 3.0 G, L3 14.4 G).
    """
    if scan_convention not in SCAN_CONVENTIONS:
        raise ValueError(f"scan_convention: expected one of {sorted(SCAN_CONVENTIONS)}, got {scan_convention!r}")
    cells = dims.num_tokens
    tokens = list(tokens_per_block) if tokens_per_block is not None else [cells] * dims.depth
    if len(tokens) != dims.depth or any(not 1 <= n <= cells for n in tokens):
        raise ValueError(f"tokens_per_block: expected {dims.depth} counts in [1, {cells}], got {tokens}")
    c, d, n, r = dims.embed_dim, dims.d_inner, dims.d_state, dims.dt_rank
    per_token = c * 2 * d + d * c + 4 * SCAN_CONVENTIONS[scan_convention] * n * d
    per_cell = d * dims.conv_size ** 2 + d * (r + 2 * n) + r * d
    stem_cells = dims.stem[0] * dims.stem[1]
    embed = (stem_cells * (dims.in_chans * 49 * 64 + dims.num_convs * 9 * 64 * 64)
             + cells * 64 * dims.patch_half ** 2 * c)
    blocks = sum(k * per_token + cells * per_cell for k in tokens) + dims.dwconv_layers * cells * 9 * c
    return embed + blocks + c * dims.num_outputs
