"""Analytic FLOPs of a ViT whose token count changes from block to block.

Convention: one multiply-accumulate counts as one FLOP, as in fvcore and in the DeiT, ToMe and
Zero-TPrune papers (so dense DeiT-S is 4.6 GFLOPs). Only matrix products are counted: patch embedding,
qkv, attention (QK^T and AV), output projection, MLP and head. Norms, softmax, GELU and adds are left
out, as fvcore leaves them out. Multiply by 2 to compare with counters that count FLOPs as 2 x MACs
(``torch.utils.flop_counter``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ViTDims:
    """The sizes that determine a ViT's FLOPs."""

    depth: int
    embed_dim: int
    attn_dim: int
    mlp_hidden: int
    num_patches: int
    num_prefix: int
    patch_in: int  # in_chans * patch_h * patch_w
    head_in: int  # features entering the classifier head(s)
    num_outputs: int  # total classifier outputs (DeiT distilled: two heads)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches

    @classmethod
    def from_timm(cls, model) -> ViTDims:
        blk = model.blocks[0]
        pe = model.patch_embed
        in_chans = pe.proj.in_channels
        ph, pw = pe.patch_size
        heads = [getattr(model, name, None) for name in ("head", "head_dist")]
        heads = [h for h in heads if hasattr(h, "out_features")]
        return cls(
            depth=len(model.blocks),
            embed_dim=model.embed_dim,
            attn_dim=blk.attn.attn_dim,
            mlp_hidden=blk.mlp.fc1.out_features,
            num_patches=pe.num_patches,
            num_prefix=model.num_prefix_tokens,
            patch_in=in_chans * ph * pw,
            head_in=model.embed_dim,
            num_outputs=sum(h.out_features for h in heads),
        )


def block_macs(n: int, dims: ViTDims) -> int:
    """MACs of one transformer block over ``n`` tokens."""
    d, a = dims.embed_dim, dims.attn_dim
    return n * d * 3 * a + 2 * n * n * a + n * a * d + 2 * n * d * dims.mlp_hidden


def vit_macs(dims: ViTDims, tokens_per_block: Sequence[int] | None = None) -> int:
    """MACs of a forward pass of one image.

    Args:
        dims: model sizes (:meth:`ViTDims.from_timm`).
        tokens_per_block: tokens entering each block; default: every block sees all tokens.
    """
    tokens = list(tokens_per_block) if tokens_per_block is not None else [dims.num_tokens] * dims.depth
    if len(tokens) != dims.depth:
        raise ValueError(f"tokens_per_block has {len(tokens)} entries for a {dims.depth}-block model")
    if any(not 1 <= n <= dims.num_tokens for n in tokens):
        raise ValueError(f"tokens_per_block must lie in [1, {dims.num_tokens}], got {tokens}")
    embed = dims.num_patches * dims.patch_in * dims.embed_dim
    return embed + sum(block_macs(n, dims) for n in tokens) + dims.head_in * dims.num_outputs


def vit_gflops(dims: ViTDims, tokens_per_block: Sequence[int] | None = None) -> float:
    """:func:`vit_macs` in units of 1e9 (the papers' "GFLOPs")."""
    return vit_macs(dims, tokens_per_block) / 1e9
