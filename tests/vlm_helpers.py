"""Helpers shared by the VLM tests."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_tail(model, inputs, n: int = 5) -> torch.Tensor:
    """The ``n`` greedily generated tokens of each sample (pad id 0)."""
    return model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0)[:, -n:]
