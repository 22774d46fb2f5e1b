"""Analytic MACs and KV-cache bytes of a decoder-only language model, and what visual-token pruning saves.

Convention (the house one, as in :mod:`prunelab.common.flops`): one multiply-accumulate counts as one FLOP and
only matrix products are counted: the q/k/v/o projections, the attention products ``Q K^T`` and ``A V``, the MLP
and the LM head. Norms, softmax, activations, rotary embeddings (their ``inv_freq`` outer product included), bias
adds, residual adds and the embedding lookup are left out. Multiply by 2 to compare with
``torch.utils.flop_counter`` (which counts 2 FLOPs per MAC).

The attention products are counted over the full ``n x n`` score matrix at prefill, as the eager and SDPA kernels
compute it and as FlopCounterMode counts it; a causal kernel that skips the masked half (FlashAttention) does
about half of that term. Grouped-query attention shares k/v heads, so only the k/v projections and the KV cache
shrink with ``kv_heads``; the products run over all ``heads`` query heads.

Visual-token pruning before LLM layer 0 shortens the prompt every layer sees (:func:`vlm_prefill_cost`): the
linear terms fall with the kept tokens, the attention term quadratically, and the KV cache, which decode steps
read, linearly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["LLMDims", "PrefillCost", "decode_macs", "kv_cache_bytes", "layer_macs", "prefill_macs",
           "vlm_prefill_cost"]

_PLAIN_MLP = frozenset({"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2"})
"""model_types whose MLP is up -> act -> down (two matrices); the others here (Llama, Qwen2, Mistral, Qwen2.5-VL
text...) use the gated SwiGLU MLP with gate, up and down (three matrices)."""


@dataclass(frozen=True)
class LLMDims:
    """The sizes that determine a decoder's MACs and KV cache."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool = True

    @classmethod
    def from_config(cls, config, *, gated_mlp: bool | None = None) -> LLMDims:
        """From a transformers text config, or a VLM config (its ``get_text_config()`` is read).

        Args:
            config: e.g. ``LlamaConfig``, ``Qwen2Config``, ``LlavaConfig``, ``Qwen2_5_VLConfig``.
            gated_mlp: override; default: gated unless ``model_type`` is a known two-matrix MLP family.
        """
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        heads = int(config.num_attention_heads)
        kv = getattr(config, "num_key_value_heads", None)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        gated = gated_mlp if gated_mlp is not None else config.model_type not in _PLAIN_MLP
        return cls(layers=int(config.num_hidden_layers), hidden=int(config.hidden_size), heads=heads,
                   kv_heads=int(kv) if kv is not None else heads, head_dim=int(head_dim),
                   intermediate=int(config.intermediate_size), vocab=int(config.vocab_size), gated_mlp=bool(gated))


def layer_macs(dims: LLMDims, q: int, keys: int | None = None) -> int:
    """MACs of one decoder layer for ``q`` new tokens attending over ``keys`` cached + new tokens (default ``q``)."""
    keys = q if keys is None else keys
    d, h, kv, dh = dims.hidden, dims.heads, dims.kv_heads, dims.head_dim
    proj = q * d * (h + 2 * kv) * dh + q * h * dh * d  # q, k, v and o
    attn = 2 * q * keys * h * dh  # Q K^T and A V over every query head
    mlp = (3 if dims.gated_mlp else 2) * q * d * dims.intermediate
    return proj + attn + mlp


def _per_layer(dims: LLMDims, n: int | Sequence[int], name: str) -> list[int]:
    tokens = [int(n)] * dims.layers if isinstance(n, int) else [int(t) for t in n]
    if len(tokens) != dims.layers:
        raise ValueError(f"{name}: {len(tokens)} per-layer counts for a {dims.layers}-layer model")
    if any(t < 0 for t in tokens):
        raise ValueError(f"{name}: token counts must be >= 0, got {tokens}")
    return tokens


def prefill_macs(dims: LLMDims, n: int | Sequence[int], *, logits: int | None = None) -> int:
    """MACs of the prefill forward of one sequence.

    Args:
        dims: model sizes.
        n: prompt tokens, or per layer the tokens it sees (a method that drops tokens after layer K).
        logits: positions the LM head runs on; default: every position of the last layer, as ``model(**x)``.
            ``generate()`` asks for the last one only (``logits_to_keep=1``); 0 for the bare language model.
    """
    tokens = _per_layer(dims, n, "n")
    logits = tokens[-1] if logits is None else logits
    return sum(layer_macs(dims, t) for t in tokens) + logits * dims.hidden * dims.vocab


def decode_macs(dims: LLMDims, cache_len: int | Sequence[int]) -> int:
    """MACs of one decode step: one new token attending over ``cache_len`` cached tokens (per layer if a
    sequence) plus itself, and the LM head on it."""
    cache = _per_layer(dims, cache_len, "cache_len")
    return sum(layer_macs(dims, 1, c + 1) for c in cache) + dims.hidden * dims.vocab


def _itemsize(dtype: torch.dtype | int) -> int:
    return dtype if isinstance(dtype, int) else torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes(dims: LLMDims, tokens: int | Sequence[int], dtype: torch.dtype | int = torch.bfloat16) -> int:
    """Bytes of the keys and values cached for ``tokens`` tokens (per layer if a sequence) of one sequence.

    Args:
        dtype: cache dtype, or bytes per element.
    """
    per_layer = _per_layer(dims, tokens, "tokens")
    return 2 * dims.kv_heads * dims.head_dim * _itemsize(dtype) * sum(per_layer)


@dataclass(frozen=True)
class PrefillCost:
    """Dense against pruned prefill of a VLM batch, per sample and summed over the batch.

    Sequences are counted unpadded, one at a time (what batch-1 runs cost); a padded batch computes
    ``B x`` the cost of its longest row instead.
    """

    dense_tokens: tuple[int, ...]
    pruned_tokens: tuple[int, ...]
    dense_macs: int
    pruned_macs: int
    dense_kv_bytes: int
    pruned_kv_bytes: int

    @property
    def macs_ratio(self) -> float:
        """Pruned over dense prefill MACs."""
        return self.pruned_macs / self.dense_macs

    @property
    def kv_ratio(self) -> float:
        """Pruned over dense KV-cache bytes after prefill."""
        return self.pruned_kv_bytes / self.dense_kv_bytes


def vlm_prefill_cost(model, inputs: dict, kept, *, logits: int = 1,
                     dtype: torch.dtype | int | None = None) -> PrefillCost:
    """Language-model prefill MACs and KV-cache bytes of ``inputs`` on a VLM, dense and with visual tokens pruned.

    Args:
        model: a transformers VLM the seam supports (:mod:`prunelab.common.vlm`).
        inputs: the processor's outputs (``input_ids``, ``attention_mask``, ``image_sizes`` / ``image_grid_thw``).
        kept: visual tokens kept per image, in the batch's image order (pruning before LLM layer 0); or a VLM
            handle after a forward: the tokens entering the language model, and after each of its plan's LLM
            stages the tokens the later layers run on (``pruned_tokens`` are those of layer 0).
        logits: positions per sample the LM head runs on (1: ``generate()``).
        dtype: KV-cache dtype; default: the language model's parameter dtype.
    """
    from prunelab.common.vlm_layout import find_image_spans, require_family

    family = require_family(model)
    state = getattr(kept, "state", kept)
    after: list[tuple[int, list[int]]] = []  # (LLM layer K, kept per image after it)
    if hasattr(state, "kept"):
        plan = getattr(kept, "plan", None)
        llm = [s for s in plan.stages if s.where == "llm"] if plan is not None else []
        if any(s.reactivate for s in llm):
            raise ValueError("kept: tokens that come back are not counted here; pass per-layer counts to "
                             "prefill_macs")
        if llm:  # the visual tokens entering the language model, then what each LLM stage kept
            after = [(s.layer, [int(k.numel()) for k in ids]) for s, (_, ids) in zip(llm, state.history[-len(llm):])]
        kept = [int(k.numel()) for k in (state.entry if llm else state.kept)]
    kept = [int(k) for k in kept]
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    spans = find_image_spans(model, family, ids, mask, inputs.get("image_sizes"), inputs.get("image_grid_thw"))
    if len(kept) != len(spans):
        raise ValueError(f"kept: {len(kept)} counts for the {len(spans)} images of the batch")
    for i, (s, k) in enumerate(zip(spans, kept)):
        if not 0 <= k <= s.num_tokens:
            raise ValueError(f"kept: {k} tokens for image {i}, which has {s.num_tokens}")
    dense = (mask.sum(-1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])).tolist()

    def tokens(counts):
        out = list(dense)
        for s, k in zip(spans, counts):
            out[s.sample] -= s.num_tokens - k
        return out

    pruned = tokens(kept)
    n_layers = model.config.get_text_config().num_hidden_layers
    per_layer = [[n] * n_layers for n in pruned]  # tokens each layer of each sample runs on
    for layer, counts in after:
        for b, n in enumerate(tokens(counts)):
            per_layer[b][layer + 1:] = [n] * (n_layers - layer - 1)
    dims = LLMDims.from_config(model.config)
    lm = model.model.language_model
    dtype = next(lm.parameters()).dtype if dtype is None else dtype
    return PrefillCost(
        dense_tokens=tuple(int(n) for n in dense), pruned_tokens=tuple(int(n) for n in pruned),
        dense_macs=sum(prefill_macs(dims, int(n), logits=logits) for n in dense),
        pruned_macs=sum(prefill_macs(dims, n, logits=logits) for n in per_layer),
        dense_kv_bytes=sum(kv_cache_bytes(dims, int(n), dtype) for n in dense),
        pruned_kv_bytes=sum(kv_cache_bytes(dims, n, dtype) for n in per_layer))
