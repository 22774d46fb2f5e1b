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

import torch

from prunelab.common.handle import UnsupportedModelError
from prunelab.common.vlm_clip import LLAVA, LLAVA_NEXT
from prunelab.common.vlm_family import FAMILIES, CropGrid, Family, ImageSpan, crop_grid
from prunelab.common.vlm_qwen import QWEN2_5_VL

__all__ = ["FAMILIES", "FAMILY_CLASSES", "CropGrid", "ImageSpan", "adapter", "crop_grid", "crops_per_image",
           "find_image_spans", "image_layouts", "require_family", "vlm_family"]
BUILT_IN = (LLAVA, LLAVA_NEXT, QWEN2_5_VL)  # registered in FAMILIES when their modules are imported

FAMILY_CLASSES = {f.model_class: f.name for f in FAMILIES.values()}


def vlm_family(model) -> str | None:
    """The family name ("llava", "llava_next", "qwen2_5_vl") of a supported transformers class (exact), else None."""
    import transformers

    for family in FAMILIES.values():
        cls = getattr(transformers, family.model_class, None)
        if cls is not None and type(model) is cls:
            return family.name
    return None


def require_family(model) -> str:
    family = vlm_family(model)
    if family is None:
        raise UnsupportedModelError(
            f"model: {type(model).__module__}.{type(model).__name__} is not a supported VLM; supported: "
            f"transformers {', '.join(FAMILY_CLASSES)}")
    return family


def adapter(family: str | Family) -> Family:
    """The :class:`~prunelab.common.vlm_family.Family` adapter of a family name (or the adapter itself)."""
    return family if isinstance(family, Family) else FAMILIES[family]


def image_token_id(model) -> int:
    return int(model.config.image_token_id)


def image_layouts(model, family, image_sizes=None, image_grid_thw=None, n_images: int | None = None):
    """Per image: (token count, grid, newline mask or None, base tokens, NeXT tile grid or None)."""
    return adapter(family).image_layouts(model, image_sizes, image_grid_thw, n_images)


def crops_per_image(model, family, image_sizes=None, n_images: int = 0) -> list[int]:
    """Vision-encoder images (tiles) each prompt image was encoded as: NeXT tiles, else 1."""
    return adapter(family).crops(model, image_sizes, n_images)


def find_image_spans(model, family: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     image_sizes=None, image_grid_thw=None, features=None, position_ids=None) -> list[ImageSpan]:
    """Spans of every image in ``input_ids`` [B, L], in the order the model scatters image features.

    Raises:
        ValueError: no image token in the prompt, or image-token counts that do not match the images.
    """
    family = adapter(family)
    tok = image_token_id(model)
    is_image = input_ids == tok
    if attention_mask is not None:
        is_image &= attention_mask.bool()
    total = int(is_image.sum())
    if total == 0:
        raise ValueError(f"input_ids: no image token (image_token_id={tok}) in the prompt; visual-token pruning "
                         "needs at least one image")
    n_images = None
    if family.same_count:
        n_images, rem = divmod(total, family.image_layouts(model, n_images=1)[0][0])
        if rem:
            raise ValueError(f"input_ids: {total} image tokens are not a whole number of images")
    if features is not None and image_sizes is None and image_grid_thw is None:
        layouts = family.layouts_from_features(model, features)
    else:
        layouts = family.image_layouts(model, image_sizes, image_grid_thw, n_images)
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

