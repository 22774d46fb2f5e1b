"""Tiny random decoders of every supported family, for the decoder-seam and KV-method tests."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def tiny_decoder(family: str = "llama", *, heads: int = 4, kv_heads: int = 2, layers: int = 3, head_dim: int = 16,
                 seed: int = 0):
    """A float32 causal LM with ``layers`` layers, ``heads`` query / ``kv_heads`` key-value heads, in eval mode."""
    import transformers as tf

    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}
    config_cls, model_cls = cls[family]
    config = config_cls(vocab_size=97, hidden_size=heads * head_dim, intermediate_size=96, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                        max_position_embeddings=1024, attn_implementation="sdpa")
    if family == "mistral":
        config.sliding_window = None
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def padded_batch(lengths=(40, 31), vocab: int = 97, seed: int = 1):
    """Left-padded ``input_ids`` and ``attention_mask`` for sequences of the given lengths (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.int64)
    mask = torch.zeros(len(lengths), T, dtype=torch.int64)
    for b, n in enumerate(lengths):
        ids[b, T - n :] = torch.randint(1, vocab, (n,), generator=g)
        mask[b, T - n :] = 1
    return ids, mask
