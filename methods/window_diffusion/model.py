"""A masked diffusion LM (LLaDA / Dream style) on transformers' Llama and Qwen2 parts, unforked.

Papers: Zuo et al., "Window-Diffusion: Accelerating Diffusion Language Model Inference with Windowed Token Pruning and
Caching", arXiv 2601.20332, which accelerates LLaDA (Nie et al., arXiv 2502.09992) and Dream (Ye et al., 2025).
Compared against vhicrgit/Window-Diffusion at d8bb349 (``llada/model/modeling_llada.py``: the block math it runs
outside the model; ``dream/model/generation_utils.py``: the shifted logits); that repository has no licence, nothing
was copied.

A masked diffusion LM is a transformer whose attention is bidirectional and whose vocabulary holds a mask token: the
sampler starts from a fully masked answer and unmasks it step by step. LLaDA's blocks are Llama's (RMSNorm, RoPE,
SwiGLU, no biases), so :class:`DiffusionLM` wraps a ``LlamaForCausalLM``; Dream's are Qwen2's (q/k/v biases), so it
wraps a ``Qwen2ForCausalLM``. Bidirectionality needs no change to either: the wrapper passes a 4-D boolean attention
mask in which every query sees every real (non-padding) key, and transformers then runs no causal mask. Dream is
initialised from an autoregressive model, so its logits are shifted right by one (position i is predicted from the
hidden state at i - 1; position 0 keeps its own): ``shift_logits=True``.

Padding (batches of prompts of different lengths): ``attention_mask`` [B, N] marks real tokens; padding keys are
never attended, a padding query attends only to itself (so no row is empty and nothing is NaN), and position ids
count real tokens only, so a left-padded row computes what the same tokens alone compute.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["DiffusionLM", "bidirectional_mask", "padded_positions", "tiny_llada"]


def bidirectional_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, N] key mask (1 = real token) -> [B, 1, N, N] bool: query q sees key k if k is real, or k == q."""
    keys = attention_mask.bool()
    n = keys.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=keys.device)
    return (keys[:, None, None, :] | eye).expand(-1, 1, n, n)


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, N] position ids counting the real tokens of each row from 0 (padding gets 0)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


class DiffusionLM(nn.Module):
    """A bidirectional transformer with a mask token; ``forward(ids, attention_mask)`` -> logits [B, N, V].

    Args:
        lm: a transformers causal-LM class instance (``LlamaForCausalLM`` for LLaDA, ``Qwen2ForCausalLM`` for Dream),
            used as is; only its attention mask and position ids are chosen here.
        mask_id: the mask token's id (LLaDA-8B: 126336; Dream-7B: 151666).
        eos_id: the end-of-text id (LLaDA-8B: 126081; Dream-7B: 151643), or None.
        shift_logits: Dream's right shift of the logits by one position.
    """

    def __init__(self, lm: nn.Module, mask_id: int, eos_id: int | None = None, shift_logits: bool = False) -> None:
        super().__init__()
        vocab = lm.config.vocab_size
        for name, value in (("mask_id", mask_id), ("eos_id", eos_id)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab):
                raise ValueError(f"{name}: expected a token id in [0, {vocab}), got {value!r}")
        self.lm, self.mask_id, self.eos_id, self.shift_logits = lm, mask_id, eos_id, bool(shift_logits)

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, N, V] of every position, every query attending to every real key.

        Args:
            input_ids: [B, N] token ids (``mask_id`` where a token is still masked).
            attention_mask: [B, N] 1 for real tokens, 0 for padding; None: all real.
            position_ids: [B, N]; None: :func:`padded_positions` of ``attention_mask``.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [B, N], got {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = padded_positions(attention_mask)
        logits = self.lm(input_ids=input_ids, attention_mask=bidirectional_mask(attention_mask),
                         position_ids=position_ids, use_cache=False).logits
        if self.shift_logits:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits

    def prunelab_seam(self, method):
        """``prunelab.apply`` on a diffusion LM: Window-Diffusion wraps the sampler instead of hooking the model."""
        raise TypeError(f"method: {type(method).__name__} is not installed into a DiffusionLM; Window-Diffusion runs "
                        "as a sampler: prunelab.methods.window_diffusion.windowed_generate(model, prompts, "
                        "gen_length, method)")


def tiny_llada(vocab_size: int = 64, hidden_size: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate_size: int = 64, max_positions: int = 1024, seed: int = 0, **config) -> DiffusionLM:
    """A random LLaDA-shaped model for tests (Llama blocks, the last id is the mask token, the one before EOS)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=False, **config)
    return DiffusionLM(LlamaForCausalLM(cfg).eval(), mask_id=vocab_size - 1, eos_id=vocab_size - 2)
