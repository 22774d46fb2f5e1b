"""Where the images are in a VLM prompt: image-token spans read from ``input_ids``, never from offsets.

Every family marks each visual token with the config's ``image_token_id`` (the processors expand one
``<image>`` into as many ids as the model scatters features in, see ``LlavaModel.get_placeholder_mask`` and
``Qwen2_5_VLModel.get_placeholder_mask``), and ``masked_scatter`` fills those slots in row-major order. So the
i-th image owns the next ``n_i`` image-token positions in that order, where ``n_i`` comes from the model:

- LLaVA-1.5: ``(image_size / patch_size)^2`` (the CLS is dropped by ``vision_feature_select_strategy="default"``);
- LLaVA-NeXT: the base tile, then the unpadded tile grid with one ``image_newline`` per row, exactly as
  ``LlavaNextModel.pack_image_features`` builds it (``get_anyres_image_grid_shape`` and ``unpad_image`` reused);
- Qwen2.5-VL: ``t * h * w / spatial_merge_size^2`` from ``image_grid_thw`` (the 2x2 ``PatchMerger``).

Adjacent images with no text between them are split correctly because counts, not runs, delimit them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelab.common.handle import UnsupportedModelError
from prunelab.common.hf import llava_next_tiles, llava_next_unpadded

FAMILY_CLASSES = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}


def vlm_family(model) -> str | None:
    """"llava", "llava_next" or "qwen2_5_vl" for the supported transformers classes (exact), else ``None``."""
    import transformers

    for name, family in FAMILY_CLASSES.items():
        cls = getattr(transformers, name, None)
        if cls is not None and type(model) is cls:
            return family
    return None


def require_family(model) -> str:
    family = vlm_family(model)
    if family is None:
        raise UnsupportedModelError(
            f"model: {type(model).__module__}.{type(model).__name__} is not a supported VLM; supported: "
            f"transformers {', '.join(FAMILY_CLASSES)}")
    return family


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


def image_token_id(model) -> int:
    return int(model.config.image_token_id)


def _next_layout(model, size) -> tuple[int, tuple[int, int], int, int]:
    """(side, (tile rows, tile cols), unpadded rows, unpadded cols) of one NeXT image of ``size`` (H, W)."""
    v = model.config.vision_config
    side = v.image_size // v.patch_size
    tiles, rows, cols = llava_next_unpadded(size, model.config.image_grid_pinpoints, v.image_size, side)
    return side, tiles, rows, cols


def image_layouts(model, family: str, image_sizes=None, image_grid_thw=None, n_images: int | None = None):
    """Per image: (token count, grid, newline mask or None, base tokens, NeXT tile grid or None)."""
    out = []
    if family == "qwen2_5_vl":
        if image_grid_thw is None:
            raise ValueError("image_grid_thw: Qwen2.5-VL needs the image grids to locate image spans")
        m = model.config.vision_config.spatial_merge_size
        for t, h, w in image_grid_thw.tolist():
            n = t * h * w // (m * m)
            out.append((n, (t * h // m, w // m), None, n, None))
        return out
    v = model.config.vision_config
    side = v.image_size // v.patch_size
    strategy = model.config.vision_feature_select_strategy
    if family == "llava":
        n = side * side + (1 if strategy == "full" else 0)
        return [(n, (side, side), None, n, None)] * int(n_images or 0)
    if image_sizes is None:
        raise ValueError("image_sizes: LLaVA-NeXT needs the image sizes to locate image spans")
    if strategy != "default":
        raise UnsupportedModelError("model: LLaVA-NeXT with vision_feature_select_strategy='full' is not supported")
    for size in image_sizes.tolist():
        _, tiles, ur, uc = _next_layout(model, size)
        base = side * side
        newline = torch.zeros(base + ur * (uc + 1), dtype=torch.bool)
        newline[base + uc::uc + 1] = True  # pack_image_features appends image_newline after each unpadded row
        out.append((int(newline.numel()), (side, side), newline, base, tiles))
    return out


def layouts_from_features(model, family: str, features, position_ids=None) -> list:
    """Per-image layouts from pre-encoded features (``generate()`` encodes images before the forward and passes
    ``mm_encoder_outputs`` without ``image_sizes`` / ``image_grid_thw``). NeXT newlines are the rows equal to the
    ``image_newline`` parameter (``pack_image_features`` concatenates copies of it, so equality is exact); the
    Qwen2.5-VL grid is read back from the span's own M-RoPE (h, w) ids."""
    out = []
    for f in features:
        n = int(f.shape[0])
        if family == "llava_next":
            v = model.config.vision_config
            side = v.image_size // v.patch_size
            newline = (f == model.model.image_newline.to(f)).all(-1)
            out.append((n, (side, side), newline, side * side, None))
        else:
            out.append((n, None, None, n, None))
    return out


def find_image_spans(model, family: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     image_sizes=None, image_grid_thw=None, features=None, position_ids=None) -> list[ImageSpan]:
    """Spans of every image in ``input_ids`` [B, L], in the order the model scatters image features.

    Raises:
        ValueError: no image token in the prompt, or image-token counts that do not match the images.
    """
    tok = image_token_id(model)
    is_image = input_ids == tok
    if attention_mask is not None:
        is_image &= attention_mask.bool()
    total = int(is_image.sum())
    if total == 0:
        raise ValueError(f"input_ids: no image token (image_token_id={tok}) in the prompt; visual-token pruning "
                         "needs at least one image")
    n_images = None
    if family == "llava":
        n_images, rem = divmod(total, image_layouts(model, family, n_images=1)[0][0])
        if rem:
            raise ValueError(f"input_ids: {total} image tokens are not a whole number of images")
    if features is not None and image_sizes is None and image_grid_thw is None:
        layouts = layouts_from_features(model, family, features)
    else:
        layouts = image_layouts(model, family, image_sizes, image_grid_thw, n_images)
    if sum(n for n, *_ in layouts) != total:
        raise ValueError(f"input_ids: {total} image tokens, but the images need {sum(n for n, *_ in layouts)}")
    spans, i = [], 0
    for b in range(input_ids.shape[0]):
        pos = is_image[b].nonzero().flatten()
        start = 0
        while start < pos.numel():
            n, grid, newline, base, tiles = layouts[i]
            if start + n > pos.numel():
                raise ValueError(f"input_ids: image {i} of sample {b} has fewer image tokens than its {n} features")
            where = pos[start:start + n]
            if grid is None:  # Qwen2.5-VL via generate(): the merged grid from the span's (h, w) rope ids
                hw = position_ids[-2:, b, where] if position_ids is not None and position_ids.dim() == 3 else None
                side = int(n ** 0.5)
                grid = tuple(int(r.max() - r.min()) + 1 for r in hw) if hw is not None else (side, n // side)
            spans.append(ImageSpan(b, i, where, grid, newline, base, tiles))
            start, i = start + n, i + 1
    return spans


def crops_per_image(model, family: str, image_sizes=None, n_images: int = 0) -> list[int]:
    """Vision-encoder images (tiles) each prompt image was encoded as: NeXT tiles, else 1."""
    if family != "llava_next" or image_sizes is None:
        return [1] * n_images
    return [llava_next_tiles(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
            for size in image_sizes.tolist()]


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
