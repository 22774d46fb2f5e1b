"""The decoder seam: KV-cache methods on unmodified transformers decoders (Llama, Qwen2, Qwen3, Mistral).

One attention function, registered once under the new name ``"prunelab"`` in transformers' attention and mask
interfaces (no existing entry is replaced), is switched on per model through that model's own
``config._attn_implementation``; other models in the process keep theirs. The function runs transformers' own
SDPA path unless the layer's :class:`AttentionCall` handler returns an output, so a method sees the post-RoPE
query, the whole cache of its layer and the padding mask, and decides per layer and per step.

``install_decoder`` also puts a :class:`~prunelab.common.kv_cache.PrunelabCache` in place of an empty default
cache (a forward pre-hook on the model), so the cache appends in place and can keep derived key layouts. A cache
the caller passes in that is not empty is left alone; handlers then see ``call.layer is None``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from prunelab.common.handle import Handle, UnsupportedModelError
from prunelab.common.hf import DynamicCache, register_attention, sdpa_attention, switch_attention
from prunelab.common.kv_cache import GrowingLayer, PrunelabCache

__all__ = ["ATTN_NAME", "AttentionCall", "DecoderHandle", "DecoderSpec", "decoder_spec", "install_decoder",
           "is_hf_decoder", "prunelab_attention", "require_eval"]

ATTN_NAME = "prunelab"
SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class DecoderSpec:
    """The shapes a KV-cache method needs to know about a decoder, read from its config."""

    model_type: str
    num_layers: int
    num_heads: int  # query heads Hq
    num_kv_heads: int  # key/value heads Hkv (grouped-query attention when smaller than Hq)
    head_dim: int
    rope_theta: float

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


def _text_config(model):
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return None
    return config.get_text_config(decoder=True)


def is_hf_decoder(model: Any) -> bool:
    """A transformers model (anything with a config); :func:`decoder_spec` then says whether it is supported."""
    return isinstance(model, nn.Module) and _text_config(model) is not None


def decoder_spec(model: Any) -> DecoderSpec:
    """The :class:`DecoderSpec` of a supported transformers decoder; clear errors for anything else."""
    config = _text_config(model)
    model_type = getattr(config, "model_type", None)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None)) if isinstance(rope, dict) else None
    if theta is None:
        raise UnsupportedModelError(f"model: {type(model).__name__} (model_type={model_type!r}) has no rotary "
                                    "position embedding (RoPE); the decoder methods here need a RoPE decoder")
    if model_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(f"model: {type(model).__name__} (model_type={model_type!r}) is not a supported "
                                    f"decoder; supported model types: {', '.join(SUPPORTED_TYPES)}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return DecoderSpec(
        model_type=model_type,
        num_layers=int(config.num_hidden_layers),
        num_heads=int(config.num_attention_heads),
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
        head_dim=int(head_dim),
        rope_theta=float(theta),
    )


@dataclass
class AttentionCall:
    """One call of attention in one layer, as a method's handler sees it.

    ``query`` is ``[B, Hq, q_len, d]`` after RoPE; ``keys`` / ``values`` ``[B, Hkv, T, d]`` are the whole cache
    of the layer including the current step; ``valid`` ``[B, T]`` marks non-padding cache positions (``None``: all
    valid). ``layer`` is the :class:`GrowingLayer` when the cache is prunelab's, else ``None``.
    """

    layer_idx: int
    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor | None
    scaling: float
    layer: GrowingLayer | None

    @property
    def is_decode(self) -> bool:
        return self.query.shape[2] == 1


class DecoderMethod(Protocol):
    def decoder_handler(self, spec: DecoderSpec) -> Callable[[AttentionCall], torch.Tensor | None]:
        """A handler for every layer; it returns ``[B, Hq, q_len, d]`` or ``None`` for the dense path."""


@dataclass
class _DecoderState:
    handler: Callable[[AttentionCall], torch.Tensor | None]
    cache: Any = None  # the cache of the forward in flight, recorded by the pre-hook


def _valid_from_mask(attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """Padding mask ``[B, T]`` of the last query row of transformers' 4-D SDPA mask (bool or additive)."""
    if attention_mask is None:
        return None
    row = attention_mask[:, 0, -1, :T]
    return row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2


def prunelab_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The one attention function of prunelab's language-model seams (registered as :data:`ATTN_NAME`).

    Everything that reads or replaces a language model's attention goes through it, so they compose on one
    model: an observer (``module._prunelab_observe``, e.g. the VLM engine's attention rows of chosen queries)
    sees the layer's query and key at prefill (a look-ahead call, ``module._prunelab_probe``, ends there: the VLM
    engine's stages that read the next layer's projections), then a KV method's handler
    (``module._prunelab_decoder``) may return the output; otherwise transformers' own SDPA runs.
    """
    observe = getattr(module, "_prunelab_observe", None)
    if observe is not None and query.shape[2] > 1 and not module.training:
        observe(module, query, key, value, module.scaling if scaling is None else scaling)
        if getattr(module, "_prunelab_probe", False):  # a look-ahead call for the projections only: no output
            return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None
    state: _DecoderState | None = getattr(module, "_prunelab_decoder", None)
    if state is not None and not module.training:
        cache = state.cache
        layer = None
        if isinstance(cache, PrunelabCache) and module.layer_idx < len(cache.layers):
            candidate = cache.layers[module.layer_idx]
            layer = candidate if candidate.keys is key else None
        call = AttentionCall(module.layer_idx, query, key, value, _valid_from_mask(attention_mask, key.shape[2]),
                             module.scaling if scaling is None else scaling, layer)
        out = state.handler(call)
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
    return sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def require_eval(model) -> None:
    """Decoder and VLM methods prune at inference; a model in training mode would silently run dense."""
    if model.training:
        raise ValueError(f"model: {type(model).__name__} is in training mode (transformers models built from a "
                         "config start in it); prunelab's decoder and VLM methods run at inference: call model.eval()")


class DecoderHandle(Handle):
    """A :class:`Handle` that also exposes the decoder's :class:`DecoderSpec` and the method's handler."""

    def __init__(self, model, method, undo, *, spec: DecoderSpec, handler):
        super().__init__(model, method, undo)
        self.spec, self.handler = spec, handler


def _attention_modules(model, spec: DecoderSpec) -> list[nn.Module]:
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj") and hasattr(m, "k_proj")]
    if len(found) != spec.num_layers:
        raise UnsupportedModelError(f"model: found {len(found)} attention modules, expected {spec.num_layers}")
    return found


def install_decoder(model, method: DecoderMethod) -> DecoderHandle:
    """Switch ``model`` to the prunelab attention function with ``method``'s handler; undone by the handle."""
    spec = decoder_spec(model)
    if not hasattr(method, "decoder_handler"):
        raise TypeError(f"method: {type(method).__name__} has no decoder adapter (it needs decoder_handler)")
    check_model = getattr(method, "check_model", None)
    if check_model is not None:  # e.g. FASA compares its calibration with the model's weights
        check_model(model)
    register_attention(ATTN_NAME, prunelab_attention)
    state = _DecoderState(handler=method.decoder_handler(spec))
    modules = _attention_modules(model, spec)
    configs = list({id(c): c for c in (model.config, _text_config(model))}.values())
    restore_configs = switch_attention(configs, ATTN_NAME)
    for m in modules:
        m._prunelab_decoder = state

    def pre_hook(_module, args, kwargs):
        require_eval(model)
        cache = kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        use_cache = model.config.use_cache if use_cache is None else use_cache
        empty_default = cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0)
        if use_cache and empty_default:  # training mode was refused above
            cache = PrunelabCache(spec.num_layers)
            kwargs["past_key_values"] = cache
        state.cache = cache
        return args, kwargs

    hook = model.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def undo() -> None:
        hook.remove()
        for m in modules:
            del m._prunelab_decoder
        restore_configs()

    return DecoderHandle(model, method, undo, spec=spec, handler=state.handler)
