"""LISA checkpoints from a local folder (``methods/lvlm_csp/lisa_checkpoint.py``): a tiny model's tensors written
here under LISA's and segment_anything's names load strictly and give the same masks."""

from __future__ import annotations

import pytest
import torch
from lisa_helpers import SEG, segmenter, write_lisa

from prunelab.common.tiny_vlm import tiny_inputs
from prunelab.methods.lvlm_csp.lisa_checkpoint import load_lisa, sam_key

IMAGES = [1, 1]


@pytest.mark.parametrize("linear,tower_inside", [(False, False), (True, True)])
@torch.no_grad()
def test_lisa_checkpoint_loads_to_the_same_masks(tmp_path, linear, tower_inside):
    model = segmenter(linear)
    lisa_dir, clip_dir = write_lisa(tmp_path, model, linear=linear, tower_inside=tower_inside)
    loaded = load_lisa(lisa_dir, vision_tower=clip_dir, sam_config=model.sam.config, seg_token_id=SEG)
    vocab = model.vlm.config.text_config.vocab_size
    assert loaded.seg_token_id == SEG and loaded.image_token_id == vocab  # the appended <image> placeholder
    x = tiny_inputs(model.vlm, "llava", IMAGES, padding_side="left")
    x["input_ids"][:, -1] = SEG
    sam_pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    want = model(**x, sam_pixel_values=sam_pixels)
    x["input_ids"][x["input_ids"] == model.vlm.config.image_token_id] = loaded.image_token_id
    got = loaded.model(**x, sam_pixel_values=sam_pixels)
    for a, b in zip(got.masks, want.masks):
        assert b.abs().max() > 0.1  # masks of a SAM at its default init, not ~0
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.logits[..., :vocab], want.logits, atol=1e-4, rtol=1e-4)


def test_lisa_checkpoint_errors(tmp_path):
    model = segmenter(False)
    lisa_dir, clip_dir = write_lisa(tmp_path, model, linear=False, tower_inside=False)
    with pytest.raises(ValueError, match="vision_tower"):  # no tower tensors and no CLIP folder
        load_lisa(lisa_dir, sam_config=model.sam.config, seg_token_id=SEG)
    with pytest.raises(FileNotFoundError, match="folder"):
        load_lisa(clip_dir.parent, vision_tower=clip_dir, sam_config=model.sam.config, seg_token_id=SEG)


def test_sam_key_on_segment_anything_names():
    assert sam_key("image_encoder.blocks.3.norm2.bias") == "vision_encoder.layers.3.layer_norm2.bias"
    assert sam_key("image_encoder.neck.3.weight") == "vision_encoder.neck.layer_norm2.weight"
    assert sam_key("prompt_encoder.mask_downscaling.6.weight") == "prompt_encoder.mask_embed.conv3.weight"
    assert sam_key("mask_decoder.output_hypernetworks_mlps.2.layers.1.bias") == \
        "mask_decoder.output_hypernetworks_mlps.2.layers.0.bias"
    assert sam_key("mask_decoder.iou_prediction_head.layers.2.weight") == \
        "mask_decoder.iou_prediction_head.proj_out.weight"
    assert sam_key("mask_decoder.transformer.layers.1.norm4.weight") == \
        "mask_decoder.transformer.layers.1.layer_norm4.weight"
