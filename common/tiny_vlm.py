"""Tiny random LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL models and matching inputs, for offline tests.

Built from transformers configs only (no hub access): ``LlavaConfig`` (CLIP vision tower with a CLS token,
Llama text model), ``LlavaNextConfig`` (the same, plus any-resolution pinpoints so images of different sizes
get different tile grids, unpadding and ``image_newline`` tokens) and ``Qwen2_5_VLConfig`` (a window-attention
vision tower whose window covers 2x2 merge units, two full-attention blocks, 3-D M-RoPE text model).

The inputs mimic what the processors produce: the image placeholder token repeated once per visual token the
model will scatter in, ``image_sizes`` (NeXT) or ``image_grid_thw`` + ``mm_token_type_ids`` (Qwen2.5-VL), left or
right padding, and a different number of images per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IMAGE_TOKEN = 120  # LLaVA families' <image> id in the tiny vocab
QWEN_VISION_START, QWEN_VISION_END, QWEN_IMAGE_TOKEN = 121, 122, 123
VOCAB = 128
PAD = 0
FAMILIES = ("llava", "llava_next", "qwen2_5_vl")

_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD)
_CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=2, image_size=16, patch_size=4, projection_dim=32)


def tiny_vlm(family: str, seed: int = 0):
    """A tiny random model of ``family`` ("llava", "llava_next", "qwen2_5_vl") in eval mode, fp32, SDPA."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "llava":
        config = tf.LlavaConfig(vision_config=dict(_CLIP), text_config=dict(_TEXT, model_type="llama"),
                                image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, pad_token_id=PAD)
        model = tf.LlavaForConditionalGeneration(config)
    elif family == "llava_next":
        config = tf.LlavaNextConfig(vision_config=dict(_CLIP), text_config=dict(_TEXT, model_type="llama"),
                                    image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, pad_token_id=PAD,
                                    image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]])
        model = tf.LlavaNextForConditionalGeneration(config)
    elif family == "qwen2_5_vl":
        # window_size is in pixels: 8 px / patch 2 / merge 2 = windows of 2x2 merge units.
        vision = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, in_channels=3, patch_size=2,
                      temporal_patch_size=2, spatial_merge_size=2, window_size=8, out_hidden_size=64,
                      fullatt_block_indexes=[1, 3])
        text = dict(_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "mrope_section": [2, 3, 3]})
        config = tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=QWEN_IMAGE_TOKEN,
                                     video_token_id=124, vision_start_token_id=QWEN_VISION_START,
                                     vision_end_token_id=QWEN_VISION_END, pad_token_id=PAD)
        model = tf.Qwen2_5_VLForConditionalGeneration(config)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    # Random init gives near-uniform logits; a larger lm_head scale makes greedy decoding decisive, so
    # batched and per-sample generate() agree token for token instead of flipping on 1e-7 ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def photo_llava(seed: int = 0, *, image_size: int = 336, patch_size: int = 14, vision_layers: int = 4,
                text_layers: int = 2):
    """A tiny random LLaVA-1.5-shaped model with the real CLIP geometry, for drawing kept tokens on a photo.

    The vision tower is a CLIP ViT at LLaVA-1.5's input geometry (336 px, patch 14: a 24x24 grid of 576 patches
    plus CLS) with tiny widths and ``vision_layers`` blocks; ``vision_feature_layer=-2`` as in LLaVA-1.5; the text
    model is a tiny Llama with room for the 576 image tokens. The weights are random (no CLIP weights offline):
    the model gives real-shaped spans and statistics, not what a trained CLIP would attend to. Inputs use
    :data:`IMAGE_TOKEN` repeated ``(image_size // patch_size) ** 2`` times and ``pixel_values`` [B, 3, S, S].
    """
    import transformers as tf

    if image_size < patch_size or image_size % patch_size:
        raise ValueError(f"image_size: {image_size} must be a positive multiple of patch_size {patch_size}")
    if vision_layers < 2 or text_layers < 1:
        raise ValueError(f"vision_layers must be >= 2 (feature layer -2) and text_layers >= 1, got "
                         f"{vision_layers}, {text_layers}")
    torch.manual_seed(seed)
    tokens = (image_size // patch_size) ** 2
    vision = dict(_CLIP, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=vision_layers,
                  image_size=image_size, patch_size=patch_size)
    text = dict(_TEXT, model_type="llama", num_hidden_layers=text_layers, max_position_embeddings=tokens + 256)
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                            vision_feature_layer=-2, pad_token_id=PAD)
    return tf.LlavaForConditionalGeneration(config).eval()


def _image_tokens(family: str, model, size: tuple[int, int]) -> int:
    """Visual tokens one image of ``size`` (H, W) becomes; read from the model's own config and helpers."""
    if family == "llava":
        v = model.config.vision_config
        return (v.image_size // v.patch_size) ** 2
    if family == "llava_next":
        # The NeXT processor's own count: base tile + unpadded tiles + one newline per row.
        from prunelab.common.hf import llava_next_unpadded

        v = model.config.vision_config
        side = v.image_size // v.patch_size
        _, rows, cols = llava_next_unpadded(size, model.config.image_grid_pinpoints, v.image_size, side)
        return side * side + rows * (cols + 1)
    m = model.config.vision_config.spatial_merge_size
    return (size[0] // m) * (size[1] // m)


def tiny_inputs(model, family: str, images_per_sample: Sequence[int], *, padding_side: str = "left",
                text_lens: Sequence[int] | None = None, seed: int = 0) -> dict:
    """Inputs for ``model``: sample ``b`` has ``images_per_sample[b]`` images between random text.

    Image sizes vary from image to image (NeXT: different tile grids; Qwen: different patch grids), so spans
    have different lengths. ``text_lens`` sets the text before, between and after images per sample.
    """
    g = torch.Generator().manual_seed(seed)
    B = len(images_per_sample)
    text_lens = list(text_lens) if text_lens is not None else [3 + 2 * b for b in range(B)]
    llava_sizes = [(16, 16), (20, 36), (40, 24)]  # NeXT: 1x2, 2x1... tile grids after anyres selection
    qwen_grids = [(8, 4), (4, 4), (4, 8)]  # patch grids (h, w); 8x4 spans two attention windows
    rows, sizes, grids = [], [], []
    image_id = QWEN_IMAGE_TOKEN if family == "qwen2_5_vl" else IMAGE_TOKEN
    k = 0
    for b, n_img in enumerate(images_per_sample):
        ids = torch.randint(1, 100, (text_lens[b],), generator=g).tolist()
        for _ in range(n_img):
            if family == "qwen2_5_vl":
                h, w = qwen_grids[k % len(qwen_grids)]
                grids.append((1, h, w))
                ids += [QWEN_VISION_START] + [image_id] * _image_tokens(family, model, (h, w)) + [QWEN_VISION_END]
            else:
                size = llava_sizes[k % len(llava_sizes)] if family == "llava_next" else (16, 16)
                sizes.append(size)
                ids += [image_id] * _image_tokens(family, model, size)
            ids += torch.randint(1, 100, (2 + b,), generator=g).tolist()
            k += 1
        rows.append(ids)
    L = max(len(r) for r in rows)
    input_ids = torch.full((B, L), PAD, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(L - len(r), L) if padding_side == "left" else slice(0, len(r))
        input_ids[b, sl] = torch.tensor(r)
        attention_mask[b, sl] = 1
    out = dict(input_ids=input_ids, attention_mask=attention_mask)
    n_images = sum(images_per_sample)
    if n_images == 0:
        return out
    if family == "qwen2_5_vl":
        thw = torch.tensor(grids)
        v = model.config.vision_config
        dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        out["pixel_values"] = torch.randn(int(thw.prod(-1).sum()), dim, generator=g)
        out["image_grid_thw"] = thw
        out["mm_token_type_ids"] = (input_ids == image_id).long()
    elif family == "llava_next":
        from prunelab.common.hf import llava_next_tiles

        v = model.config.vision_config
        tiles = [llava_next_tiles(s, model.config.image_grid_pinpoints, v.image_size) for s in sizes]
        pv = torch.zeros(n_images, max(tiles), 3, v.image_size, v.image_size)
        for i, t in enumerate(tiles):
            pv[i, :t] = torch.randn(t, 3, v.image_size, v.image_size, generator=g)
        out["pixel_values"] = pv
        out["image_sizes"] = torch.tensor(sizes)
    else:
        v = model.config.vision_config
        out["pixel_values"] = torch.randn(n_images, 3, v.image_size, v.image_size, generator=g)
    return out


def sample_inputs(inputs: dict, b: int, images_per_sample: Sequence[int]) -> dict:
    """The inputs of sample ``b`` alone, padding stripped: what a batch-1 run of the same prompt gets."""
    valid = inputs["attention_mask"][b].bool()
    out = {k: inputs[k][b:b + 1, valid] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
    first, n = sum(images_per_sample[:b]), images_per_sample[b]
    if "image_grid_thw" in inputs:
        thw = inputs["image_grid_thw"]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), thw.prod(-1).cumsum(0)])
        out["pixel_values"] = inputs["pixel_values"][offsets[first]:offsets[first + n]]
        out["image_grid_thw"] = thw[first:first + n]
    elif "pixel_values" in inputs:
        out["pixel_values"] = inputs["pixel_values"][first:first + n]
        if "image_sizes" in inputs:
            out["image_sizes"] = inputs["image_sizes"][first:first + n]
    return out
