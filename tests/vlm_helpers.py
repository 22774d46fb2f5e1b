"""Helpers shared by the VLM tests."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_tail(model, inputs, n: int = 5) -> torch.Tensor:
    """The ``n`` greedily generated tokens of each sample (pad id 0)."""
    return model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0)[:, -n:]


@torch.no_grad()
def eager_attentions(model, inputs) -> tuple[torch.Tensor, ...]:
    """The language model's attention probabilities per layer ``[B, H, L, L]`` of a dense forward, computed by
    transformers' eager attention (the reference the rows computed beside SDPA are checked against)."""
    text = model.config.get_text_config()
    previous = text._attn_implementation
    text._attn_implementation_internal = "eager"
    try:
        return model(**inputs, output_attentions=True).attentions
    finally:
        text._attn_implementation_internal = previous


def tiny_sam(seed: int = 0):
    """A random transformers ``SamModel`` at 64 px (8 px patches, width 32): a mask decoder output of 32 x 32."""
    from transformers import SamConfig, SamModel
    from transformers.models.sam.configuration_sam import (
        SamMaskDecoderConfig,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    torch.manual_seed(seed)
    vision = SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8,
                             output_channels=32, global_attn_indexes=[1], window_size=4, mlp_dim=64, num_pos_feats=16)
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=64, patch_size=8, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                   iou_head_hidden_dim=32)
    return SamModel(SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                              mask_decoder_config=decoder.to_dict())).eval()
