"""HiPrune's VLM adapter helpers: the seam's received-attention statistics mapped onto token grids.

The seam (:mod:`prunelab.common.vlm_vision`) gives, per prompt image, the mean attention received per patch at
each requested encoder block: ``[tiles, P]`` for CLIP towers (LLaVA-1.5: one tile; LLaVA-NeXT: the base tile,
then the crops in row-major order), CLS column dropped; ``[N]`` per merged token in raster order for
Qwen2.5-VL. Each image becomes one or two :class:`Region` s, each a raster grid of scores plus the span
index of every cell, on which :func:`~prunelab.methods.hiprune.selection.hiprune_select` runs.

LLaVA-NeXT (our choice; the official code forces ``mm_patch_merge_type="spatial"``, card Sec. 2): the base
tile is one region (``side x side``); the crops are stitched into the image-sized grid that
``LlavaNextModel.pack_image_features`` builds, centre-cropped exactly as ``unpad_image`` crops it, and form
the second region, so buffers are true image neighbours across tile seams and padding is never a candidate.
``image_newline`` tokens have no encoder attention and are never scored (see ``HiPrune.keep_newlines``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Region:
    """A raster grid of one image: scores ``mid``/``deep`` [rows * cols] and the span index of each cell."""

    mid: torch.Tensor
    deep: torch.Tensor
    grid: tuple[int, int]
    index: torch.Tensor


def next_crop_grid(tiles: int, side: int, unpadded: tuple[int, int],
                   candidates: tuple[tuple[int, int], ...] | None = None) -> tuple[int, int]:
    """(rows, cols) of the crop tiles of a NeXT image, from what its span shows.

    The seam's span knows the unpadded grid ``(ur, uc)`` (rows = its newline count) and the tile count, not
    the image size. ``unpad_image`` keeps one side whole and crops an even number of cells from the other
    (``padding`` from both ends), which leaves few grids. ``candidates`` are the model's
    ``image_grid_pinpoints`` grids in config order; when two fit (e.g. 1x2 and 2x1 both unpad to a
    ``side x side`` square), the first wins, as ``select_best_resolution`` keeps the first of equal fits.
    That tie rule is a heuristic: the exact answer needs ``image_sizes``, which the seam does not pass on.

    Raises:
        ValueError: no grid fits, or two fit and ``candidates`` is None (naming ``image_sizes``).
    """
    ur, uc = unpadded
    n = tiles - 1
    pairs = candidates if candidates is not None else tuple((r, n // r) for r in range(1, n + 1) if n % r == 0)

    def fits(r, c):
        h, w = r * side, c * side
        crops_h = w == uc and h >= ur and (h - ur) % 2 == 0
        crops_w = h == ur and w >= uc and (w - uc) % 2 == 0
        return r * c == n and (crops_h or crops_w)

    found = [p for p in pairs if fits(*p)]
    if not found or (candidates is None and len(found) > 1):
        raise ValueError(f"image_sizes: cannot place the {n} crop tiles of a LLaVA-NeXT image with an unpadded "
                         f"{ur}x{uc} grid (tile grids that fit: {found}); build the method with "
                         "HiPrune.for_model(model, ...) so it knows the model's image_grid_pinpoints")
    return found[0]


def image_regions(family: str, span, received: dict, blocks: tuple[int, int],
                  anyres_grids: tuple[tuple[int, int], ...] | None = None) -> list[Region]:
    """The regions of one image (:class:`~prunelab.common.vlm_layout.ImageSpan`) with its received stats."""
    obj, deep = blocks
    missing = [b for b in blocks if b not in received]
    if missing:
        raise ValueError(f"received: the seam gave no attention statistics for encoder blocks {missing}")
    mid_all, deep_all = received[obj].detach().float(), received[deep].detach().float()
    n = span.num_tokens
    dev = mid_all.device
    if family == "qwen2_5_vl":  # [N] per merged token, raster order of the merged grid
        return [Region(mid_all, deep_all, span.grid, torch.arange(n, device=dev))]
    base = span.base_tokens
    regions = [Region(mid_all[0], deep_all[0], span.grid, torch.arange(base, device=dev))]
    tiles = mid_all.shape[0]
    if family == "llava" or tiles == 1:
        return regions
    side = span.grid[1]
    ur = int(span.newline.sum())
    uc = (n - base) // ur - 1  # each unpadded row is uc cells and one newline
    rows, cols = next_crop_grid(tiles, side, (ur, uc), anyres_grids)
    top, left = (rows * side - ur) // 2, (cols * side - uc) // 2  # unpad_image's centre crop

    def stitch(s: torch.Tensor) -> torch.Tensor:  # [tiles-1, P] -> the unpadded [ur, uc] grid
        full = s.view(rows, cols, side, side).permute(0, 2, 1, 3).reshape(rows * side, cols * side)
        return full[top:top + ur, left:left + uc].reshape(-1)

    cell = torch.arange(ur * uc, device=dev)
    index = base + (cell // uc) * (uc + 1) + cell % uc  # skip one newline per row
    regions.append(Region(stitch(mid_all[1:]), stitch(deep_all[1:]), (ur, uc), index))
    return regions


def split_budget(budget: int, sizes: list[int], tiles: int) -> list[int]:
    """NeXT: the base tile gets the official per-crop share ``floor(N' / B)`` (card Sec. 2, B = tiles, base
    included), the crops the rest, so exactly N' are kept; a share above a region's size moves to the other."""
    if len(sizes) == 1:
        return [budget]
    base = min(sizes[0], budget // tiles)
    crops = budget - base
    if crops > sizes[1]:
        base, crops = base + crops - sizes[1], sizes[1]
    return [base, crops]


def anyres_grids_of(model) -> tuple[tuple[int, int], ...]:
    """The (rows, cols) tile grids a LLaVA-NeXT model can pick (its ``image_grid_pinpoints``, in order)."""
    size = model.config.vision_config.image_size
    return tuple(dict.fromkeys((h // size, w // size) for h, w in model.config.image_grid_pinpoints))
