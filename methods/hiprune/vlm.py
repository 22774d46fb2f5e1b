"""HiPrune's VLM adapter helpers: the seam's received-attention statistics mapped onto token grids.

The seam (:mod:`prunelab.common.vlm_vision`) gives, per prompt image, the attention received per patch and head
(averaged over the queries) at each requested encoder block: ``[tiles, H, P]`` for CLIP towers (LLaVA-1.5: one
tile; LLaVA-NeXT: the base tile, then the crops in row-major order), CLS column dropped; ``[H, N, m*m]`` per patch
of each merged token in raster order for Qwen2.5-VL. :func:`received_scores` applies HiPrune's own averaging.
Each image becomes one or two :class:`Region` s, each a raster grid of scores plus the span index of every cell,
on which :func:`~prunelab.methods.hiprune.selection.hiprune_select` runs.

LLaVA-NeXT (our choice; the official code forces ``mm_patch_merge_type="spatial"`` in ``llava_arch.py``): the base
tile is one region (``side x side``); the crops are stitched into the image-sized grid that
``LlavaNextModel.pack_image_features`` builds, centre-cropped exactly as ``unpad_image`` crops it (the family
geometry ``prunelab.common.vlm_layout.crop_grid``), and form the second region, so buffers are true image
neighbours across tile seams and padding is never a candidate.
``image_newline`` tokens have no encoder attention and are never scored (see ``HiPrune.keep_newlines``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelab.common.vlm_layout import crop_grid


@dataclass(frozen=True)
class Region:
    """A raster grid of one image: scores ``mid``/``deep`` [rows * cols] and the span index of each cell."""

    mid: torch.Tensor
    deep: torch.Tensor
    grid: tuple[int, int]
    index: torch.Tensor


def received_scores(family: str, value: torch.Tensor) -> torch.Tensor:
    """HiPrune's ``g^l_j = mean_h mean_i A_h[i, j]`` from the seam's per-head query means: the mean over heads
    (``[tiles, H, P]`` -> ``[tiles, P]``); on Qwen2.5-VL also over the 2x2 merge unit of each LLM token
    (``[H, N, m*m]`` -> ``[N]``), as the official Qwen code pools patch scores into merged tokens."""
    value = value.detach().float()
    return value.mean(dim=(0, 2)) if family == "qwen2_5_vl" else value.mean(dim=1)


def image_regions(family: str, span, received: dict, blocks: tuple[int, int]) -> list[Region]:
    """The regions of one image (:class:`~prunelab.common.vlm_layout.ImageSpan`) with its received stats."""
    obj, deep = blocks
    missing = [b for b in blocks if b not in received]
    if missing:
        raise ValueError(f"received: the seam gave no attention statistics for encoder blocks {missing}")
    mid_all, deep_all = received_scores(family, received[obj]), received_scores(family, received[deep])
    n = span.num_tokens
    dev = mid_all.device
    if family == "qwen2_5_vl":  # [N] per merged token, raster order of the merged grid
        return [Region(mid_all, deep_all, span.grid, torch.arange(n, device=dev))]
    base = span.base_tokens
    regions = [Region(mid_all[0], deep_all[0], span.grid, torch.arange(base, device=dev))]
    tiles = mid_all.shape[0]
    if family == "llava" or tiles == 1:
        return regions
    grid = crop_grid(span, tiles - 1)  # the family's geometry: crop patches -> the unpadded grid of the span
    regions.append(Region(grid.stitch(mid_all[1:]), grid.stitch(deep_all[1:]), (grid.height, grid.width),
                          grid.index(dev)))
    return regions


def split_budget(budget: int, sizes: list[int], tiles: int) -> list[int]:
    """NeXT: the base tile gets the official per-crop share ``floor(N' / B)`` (``encode_images``, B = tiles, base
    included), the crops the rest, so exactly N' are kept; a share above a region's size moves to the other."""
    if len(sizes) == 1:
        return [budget]
    base = min(sizes[0], budget // tiles)
    crops = budget - base
    if crops > sizes[1]:
        base, crops = base + crops - sizes[1], sizes[1]
    return [base, crops]
