"""One adapter per VLM family: every place where LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL differ.

The stage engine (``prunelab.common.vlm``) is written once against :class:`Family`; each supported transformers
class has one adapter (``vlm_clip.py``: LLaVA-1.5 and LLaVA-NeXT, ``vlm_qwen.py``: Qwen2.5-VL) that says

- where the vision tower, its blocks and their attention modules are;
- how many visual tokens each image becomes, and their grid (``image_layouts``; NeXT's tiles and newlines,
  Qwen's 2x2 merge units), also from pre-encoded features (``layouts_from_features``, the generate() path);
- how the raw vision statistics of one tower forward split into images (``split_stats``);
- how tokens are dropped inside the tower (``install_tower_stages``) and where the tokens a tower stage kept sit
  in the image's span of the prompt (``span_ids``; NeXT's crop-tile-to-grid geometry, :func:`crop_grid`);
- whether the language model's positions are 1-D or M-RoPE ids (``mrope``).

A new family (e.g. a LISA-style model) is one new adapter registered with :func:`register`, not new branches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["FAMILIES", "CropGrid", "Family", "ImageSpan", "Tower", "crop_grid", "register"]


@dataclass(frozen=True)
class ImageSpan:
    """One image of the batch and the prompt positions of its visual tokens.

    Attributes:
        sample: batch row holding the image.
        image: index of the image in the batch's image order (``pixel_values`` order).
        positions: int64 [N] positions in the prompt (sorted) of the image's visual tokens.
        grid: (rows, cols) of the token grid: the patch grid (LLaVA), the base tile's grid (NeXT), or the
            merged grid ``(t * h / m, w / m)`` (Qwen2.5-VL).
        newline: bool [N], True at NeXT's ``image_newline`` tokens (``None`` for the other families).
        base_tokens: tokens of the base (global) tile at the start of a NeXT span; N for the other families.
        tiles: NeXT only, (rows, cols) of the crop-tile grid ``get_anyres_image_grid_shape`` picked for the image
            (the unpadded grid is cut from ``rows * side x cols * side``); ``None`` for the other families, and
            for NeXT spans located from pre-encoded features without ``image_sizes`` (the grid is then unknown).
    """

    sample: int
    image: int
    positions: torch.Tensor
    grid: tuple[int, int]
    newline: torch.Tensor | None
    base_tokens: int
    tiles: tuple[int, int] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())


@dataclass(frozen=True)
class CropGrid:
    """LLaVA-NeXT: where one image's crop-tile patches land in its span, as ``pack_image_features`` lays them out.

    The crops form a ``tiles = (rows, cols)`` grid of ``side x side`` patch tiles; ``unpad_image`` keeps the
    centred ``height x width`` window of it (offsets ``top``, ``left``), and each kept row is followed by one
    ``image_newline`` token. The span starts with the base tile's ``base`` tokens.
    """

    tiles: tuple[int, int]
    side: int
    height: int
    width: int
    top: int
    left: int
    base: int

    def stitch(self, per_crop: torch.Tensor) -> torch.Tensor:
        """Values per crop patch ``[crops, side * side, ...]`` -> the unpadded grid ``[height * width, ...]``."""
        (rows, cols), s, rest = self.tiles, self.side, per_crop.shape[2:]
        full = per_crop.reshape(rows, cols, s, s, *rest).transpose(1, 2).reshape(rows * s, cols * s, *rest)
        window = full[self.top:self.top + self.height, self.left:self.left + self.width]
        return window.reshape(self.height * self.width, *rest)

    def index(self, device=None) -> torch.Tensor:
        """[height * width] the span token of each unpadded cell (one newline skipped per row)."""
        cell = torch.arange(self.height * self.width, device=device)
        return self.base + (cell // self.width) * (self.width + 1) + cell % self.width


def crop_grid(span: ImageSpan, crops: int) -> CropGrid:
    """The :class:`CropGrid` of a LLaVA-NeXT span whose image was encoded as a base tile and ``crops`` crops."""
    base, side = span.base_tokens, span.grid[1]
    height = int(span.newline.sum())
    width = (span.num_tokens - base) // height - 1  # each unpadded row is ``width`` cells and one newline
    if span.tiles is None or span.tiles[0] * span.tiles[1] != crops:
        # The tile grid is only defined by image_sizes; the seam sets span.tiles whenever it has them.
        raise ValueError(f"image_sizes: the crop-tile grid of a LLaVA-NeXT image is unknown (span tiles "
                         f"{span.tiles}, {crops} crops); pass image_sizes with the images")
    rows, cols = span.tiles
    return CropGrid(span.tiles, side, height, width, (rows * side - height) // 2, (cols * side - width) // 2, base)


@dataclass
class Tower:
    """What the tower stages of one vision forward dropped (reset at every tower forward).

    Attributes:
        held: ``(l, rows)`` after each stage at encoder layer ``l``: the rows layers ``> l`` hold, as indices into
            the unpruned rows (CLIP: ``[tiles, 1 + K]`` positions, CLS first; Qwen2.5-VL: ``[U']`` merge units in
            window order, or patches ``unit * m * m + p`` when the stages select patches).
        full: rows per tile (CLIP) or merge units (Qwen2.5-VL) before any drop.
        history: ``(stage name, kept ids per image)`` of each tower stage, ids per tile ``[tiles, K]``.
        extra: the adapter's own bookkeeping (e.g. Qwen2.5-VL's windows).
    """

    held: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    full: int = 0
    ids: torch.Tensor | None = None
    history: list[tuple[str, list[torch.Tensor]]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def held_at(self, block: int) -> torch.Tensor | None:
        """The rows encoder layer ``block`` runs on, or ``None`` when no stage before it dropped any."""
        rows = [r for layer, r in self.held if layer < block]
        return rows[-1] if rows else None


class Family:
    """The engine's view of one model family; subclasses override what differs. See the module docstring.

    Layouts are tuples ``(token count, grid, newline mask or None, base tokens, NeXT tile grid or None)``.
    """

    name = ""
    model_class = ""  # the transformers class name this adapter serves (matched exactly)
    has_cls = True  # the vision tower prepends a CLS token
    mrope = False  # the language model takes [3, B, L] M-RoPE position ids
    same_count = False  # every image gives the same token count (the image count is read off input_ids)
    tiles_from_sizes = False  # tiles per image are only known from ``image_sizes`` (LLaVA-NeXT)

    # -- the vision tower --------------------------------------------------------------------------------
    def tower(self, model):
        raise NotImplementedError

    def vision_blocks(self, model) -> list:
        raise NotImplementedError

    def vision_attention(self, block):
        raise NotImplementedError

    # -- where the images are ----------------------------------------------------------------------------
    def image_layouts(self, model, image_sizes=None, image_grid_thw=None, n_images: int | None = None) -> list:
        raise NotImplementedError

    def layouts_from_features(self, model, features) -> list:
        return [(int(f.shape[0]), None, None, int(f.shape[0]), None) for f in features]

    def crops(self, model, image_sizes=None, n_images: int = 0) -> list[int]:
        """Vision-encoder images (tiles) each prompt image was encoded as."""
        return [1] * n_images

    def grid_from_spans(self, model, spans: list[ImageSpan]) -> torch.Tensor | None:
        """The vision grids of the prompt's images when a call omitted them (generate() pre-encodes), if needed."""
        return None

    # -- statistics and pruning inside the tower ---------------------------------------------------------
    def split_stats(self, model, store: dict, tiles: list[int], grid_thw=None, tower: Tower | None = None,
                    layers=None) -> list:
        """The raw statistics of one tower forward, per image (only the encoder ``layers`` given, if any); rows a
        tower stage dropped read 0."""
        raise NotImplementedError

    def on_tower_call(self, state, args, kwargs) -> None:
        """Read what a tower stage needs (tiles per image, grids) from the tower's own call."""

    def install_tower_stages(self, model, layers, state, run, reads: dict | None = None, patches: bool = False) -> list:
        """Stages after encoder ``layers``: ``run(layer, images)`` asks the plan; ``reads[layer]`` are the encoder
        layers whose statistics those stages read; ``patches``: the stages select patches (``Stage.patches``)."""
        raise ValueError(f"where: vision-encoder stages are not supported on {self.name}")

    def span_ids(self, model, span: ImageSpan, ids: torch.Tensor) -> torch.Tensor:
        """The span's token ids [K'] (sorted) of what the tower stages kept, ``ids`` [tiles, K] per tile."""
        raise NotImplementedError


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add an adapter; the engine then serves ``family.model_class``."""
    FAMILIES[family.name] = family
    return family
