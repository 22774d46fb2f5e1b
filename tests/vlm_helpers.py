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
