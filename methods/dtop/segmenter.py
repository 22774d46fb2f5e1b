"""A plain-ViT segmenter with auxiliary heads, the host DToP prunes (Tang et al., ICCV 2023).

The encoder is a timm ``VisionTransformer`` without class token (as DToP's official code builds it) and without
its final norm; the heads sit after the 0-based blocks in ``stage_ends`` (ViT-B: 5, 7, 11; ViT-L: 7, 15, 23),
the last one after the last block. timm's modules are called as they are (patch embedding, position embedding,
blocks); nothing of timm's forward is copied. The dense forward below is the reference that DToP, installed
through :mod:`prunelab.methods.dtop.seam`, must reproduce exactly when no token exits.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
import torch.nn as nn

from prunelab.common.flops import ViTDims, block_macs
from prunelab.common.handle import Handle
from prunelab.common.validate import check_choice, check_int, check_ints
from prunelab.methods.dtop.heads import ATMHead, HeadOutput, LinearHead, upsample

HEADS = {"linear": LinearHead, "atm": ATMHead}

# The official configs' head positions (0-based blocks), by encoder depth: ViT-B/16 and ViT-L/16.
STAGE_ENDS = {12: (5, 7, 11), 24: (7, 15, 23)}


class Segmenter(nn.Module):
    """Encoder blocks in stages, a head at the end of each stage; the last head's output is the segmentation.

    Args:
        vit: a timm ``VisionTransformer`` with ``class_token=False``, no register tokens, a fixed image size.
        stage_ends: ascending 0-based blocks after which a head sits; the last must be the last block.
        heads: one head per stage (:class:`LinearHead` or :class:`ATMHead`).
    """

    def __init__(self, vit: nn.Module, stage_ends: Sequence[int], heads: Sequence[nn.Module]):
        super().__init__()
        depth = len(vit.blocks)
        ends = check_ints(stage_ends, "stage_ends", low=0, high=depth - 1)
        if list(ends) != sorted(set(ends)) or ends[-1] != depth - 1:
            raise ValueError(f"stage_ends: must be ascending and unique and end at the last block {depth - 1}, "
                             f"got {ends}")
        if len(heads) != len(ends):
            raise ValueError(f"heads: one head per stage expected ({len(ends)}), got {len(heads)}")
        if vit.num_prefix_tokens:
            raise ValueError("vit: the segmenter's encoder takes patch tokens only (class_token=False, no "
                             "register tokens), as DToP's official encoder")
        if getattr(vit.patch_embed, "dynamic_img_size", False):
            raise ValueError("vit: dynamic_img_size encoders are not supported (the token grid must be fixed)")
        self.vit, self.stage_ends, self.heads = vit, ends, nn.ModuleList(heads)
        self.num_classes = heads[-1].num_classes
        self.grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        self.img_size = tuple(int(s) for s in vit.patch_embed.img_size)

    @classmethod
    def create(cls, model_name: str, num_classes: int, *, stage_ends: Sequence[int] | None = None,
               head: str = "linear", head_kwargs: dict | None = None, pretrained: bool = False,
               **timm_kwargs) -> Segmenter:
        """A segmenter on ``timm.create_model(model_name, ...)`` with one ``head`` per stage (built with
        ``head_kwargs``, e.g. the ATM head's ``heads``).

        ``stage_ends`` defaults to the official positions for 12- and 24-block encoders.
        """
        check_choice(head, "head", tuple(HEADS))
        num_classes = check_int(num_classes, "num_classes", low=1)
        vit = timm.create_model(model_name, pretrained=pretrained, class_token=False, global_pool="avg",
                                num_classes=0, final_norm=False, **timm_kwargs)
        depth = len(vit.blocks)
        if stage_ends is None:
            if depth not in STAGE_ENDS:
                raise ValueError(f"stage_ends: no official head positions for a {depth}-block encoder; pass them")
            stage_ends = STAGE_ENDS[depth]
        heads = [HEADS[head](vit.embed_dim, num_classes, **(head_kwargs or {})) for _ in stage_ends]
        return cls(vit, stage_ends, heads)

    @property
    def stages(self) -> list[range]:
        """The blocks of each stage."""
        starts = (0, *(e + 1 for e in self.stage_ends[:-1]))
        return [range(s, e + 1) for s, e in zip(starts, self.stage_ends)]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with position embeddings, [B, N, D], as timm's ``forward_features`` starts."""
        if tuple(images.shape[-2:]) != self.img_size:
            raise ValueError(f"images: expected {self.img_size[0]} x {self.img_size[1]} pixels, got "
                             f"{tuple(images.shape[-2:])}")
        vit = self.vit
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))

    def to_map(self, out: HeadOutput) -> torch.Tensor:
        """A head's output as [B, C, H, W] segmentation scores at image size."""
        return upsample(self.heads[-1].scores(out.tokens, out.image), self.grid, self.img_size)

    def forward(self, images: torch.Tensor, return_heads: bool = False):
        """Dense segmentation scores [B, C, H, W]; with ``return_heads``, also every head's :class:`HeadOutput`
        (the auxiliary heads run only then, as in training)."""
        x = self.embed(images)
        outs = []
        for s, blocks in enumerate(self.stages):
            for b in blocks:
                x = self.vit.blocks[b](x)
            if s == len(self.stages) - 1 or return_heads:
                outs.append(self.heads[s](x))
        seg = self.to_map(outs[-1])
        return (seg, outs) if return_heads else seg

    def loss(self, outs: Sequence[HeadOutput], target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        """The training loss: every head's own loss on its output (weight 1 each) against ``target`` [B, H, W]."""
        return sum(h.loss(o, target, self.grid, ignore_index) for h, o in zip(self.heads, outs))

    def prunelab_seam(self, method) -> Handle:
        """``prunelab.apply``'s entry: install an early-exit method (:mod:`prunelab.methods.dtop.seam`)."""
        from prunelab.methods.dtop.seam import install

        return install(self, method)

    @property
    def dims(self) -> ViTDims:
        return ViTDims.from_timm(self.vit)

    def macs(self, tokens_per_block: Sequence[int], tokens_per_head: Sequence[int]) -> int:
        """MACs of one image: patch embedding, every block over its tokens, every head over its tokens."""
        dims = self.dims
        embed = dims.num_patches * dims.patch_in * dims.embed_dim
        return (embed + sum(block_macs(int(n), dims) for n in tokens_per_block)
                + sum(h.macs(int(n)) for h, n in zip(self.heads, tokens_per_head)))

    def dense_macs(self) -> int:
        """MACs of the dense forward: the auxiliary heads do not run (as in mmseg's inference)."""
        n = self.dims.num_patches
        return self.macs([n] * len(self.vit.blocks), [0] * (len(self.heads) - 1) + [n])
