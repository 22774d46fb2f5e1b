"""Every place prunelab touches transformers below its public API, in one module.

The seams run unmodified transformers models, but a few things they need are private or semi-private:
the attention-function registry's mapping, a config's ``_attn_implementation_internal``, the SDPA attention and
mask functions, LLaVA-NeXT's tile geometry helpers, Qwen2.5-VL's vision window index, the cache layer classes and
the name and revision a config records of its weights (``_name_or_path``, ``_commit_hash``).
They were checked against :data:`CHECKED_VERSION`; ``tests/test_hf_touchpoints.py`` fails loudly when the
installed version differs, and exercises each touch point so that a behaviour change shows where it breaks.

Methods never import from here, except :func:`model_source` (what a model's weights are, to key files computed
on them); the seams in ``prunelab.common`` do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["CHECKED_VERSION", "DynamicCache", "DynamicLayer", "llava_next_tiles", "llava_next_unpadded",
           "model_source", "register_attention", "sdpa_attention", "set_model_source", "switch_attention",
           "vision_window_index", "vision_windows"]

CHECKED_VERSION = "5.23.0"  # the transformers release these touch points were read against


def sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' own SDPA attention (``integrations.sdpa_attention.sdpa_attention_forward``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_attention(name: str, fn: Callable) -> None:
    """Register ``fn`` under the new ``name`` in the attention and mask interfaces (mask: SDPA's), once.

    Registering a new name is the interfaces' documented extension point; no existing entry is replaced.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    current = AttentionInterface._global_mapping.get(name)
    if current is fn:
        return
    if current is not None:
        raise RuntimeError(f"attention function {name!r} is already registered by someone else")
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


_USERS = "_prunelab_attention_users"  # on a switched config: [installed handles using it, its previous function]


def switch_attention(configs: Sequence, name: str) -> Callable[[], None]:
    """Set each config's attention function to ``name``; the returned undo restores it.

    Models built from one config object share it, so the switch is counted on the config itself: removing a
    method from one model leaves another model's method working, and the last removal restores the function the
    config had. (The count sits in the config's attributes while a method is installed, and is deleted after.)
    """
    for c in configs:
        record = vars(c).get(_USERS)
        if record is None or c._attn_implementation != name:  # none, or stale (e.g. a copied config)
            record = vars(c)[_USERS] = [0, c._attn_implementation]
        record[0] += 1
        c._attn_implementation_internal = name

    def undo() -> None:
        for c in configs:
            record = vars(c)[_USERS]
            record[0] -= 1
            if record[0] == 0:
                c._attn_implementation_internal = record[1]
                del vars(c)[_USERS]

    return undo


def model_source(model) -> tuple[str, str]:
    """``(name, revision)`` of a transformers model's weights, from its config; ``""`` for what is unknown.

    The name is the config's ``_name_or_path`` (the hub id or folder ``from_pretrained`` was given; ``""`` for a model
    built from a config). The revision is the config's ``_commit_hash``: transformers 5 no longer fills it in, so it
    is ``""`` unless a loader recorded one with :func:`set_model_source`.
    """
    config = getattr(model, "config", None)
    return (str(getattr(config, "_name_or_path", "") or ""), str(getattr(config, "_commit_hash", "") or ""))


def set_model_source(model, name: str, revision: str) -> None:
    """Record ``name`` and ``revision`` of the weights in ``model``'s config, where :func:`model_source` reads them."""
    model.config._name_or_path = str(name)
    model.config._commit_hash = str(revision)


def llava_next_unpadded(size: Sequence[int], pinpoints, image_size: int, side: int) -> tuple[tuple[int, int], int, int]:
    """((tile rows, tile cols), unpadded rows, unpadded cols) of a LLaVA-NeXT image of ``size`` (H, W), in patches."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    size = [int(s) for s in size]
    rows, cols = get_anyres_image_grid_shape(size, pinpoints, image_size)
    # unpad_image only reads the shape, so a 1-channel dummy gives the same crop as the real features.
    unpadded = unpad_image(torch.zeros(1, rows * side, cols * side), torch.tensor(size))
    return (rows, cols), unpadded.shape[1], unpadded.shape[2]


def llava_next_tiles(size: Sequence[int], pinpoints, image_size: int) -> int:
    """How many vision-encoder images (base + crops) LLaVA-NeXT encodes an image of ``size`` (H, W) as."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return image_size_to_num_patches([int(s) for s in size], pinpoints, image_size)


def vision_window_index(grid_thw: torch.Tensor, merge: int, window: int, patch: int) -> torch.Tensor:
    """Qwen2.5-VL's permutation of merge units into attention windows (``vision_utils.get_vision_window_index``)."""
    return vision_windows(grid_thw, merge, window, patch)[0]


def vision_windows(grid_thw: torch.Tensor, merge: int, window: int, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's window permutation of merge units and its window boundaries (cumulative, in patch rows)."""
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(grid_thw, merge, window, patch)
