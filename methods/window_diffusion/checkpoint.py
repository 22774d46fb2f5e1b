"""Load LLaDA-8B and Dream-7B checkpoints from a local folder into :class:`~.model.DiffusionLM`, through transformers'
own ``from_pretrained``.

The folders are the hub's (``GSAI-ML/LLaDA-8B-Base`` / ``-Instruct``, ``Dream-org/Dream-v0-Base-7B`` /
``-Instruct-7B``): a ``config.json`` for their ``trust_remote_code`` classes and safetensors shards. No remote code
is run: the config is read as JSON and mapped to the transformers class whose blocks compute the same thing, and the
weights go through ``from_pretrained`` (shards, index, dtype; ``key_mapping`` for LLaDA's names), any missing,
unexpected or mis-shaped key an error (transformers itself only warns and leaves such weights random).

- LLaDA (OLMo-style names, ``model.transformer.blocks.{i}.q_proj`` ...) -> ``LlamaForCausalLM``: ``wte`` ->
  ``embed_tokens``, ``attn_out`` -> ``o_proj``, ``ff_proj`` (the SiLU-gated branch) -> ``gate_proj``, ``up_proj``,
  the block's ``ff_out`` -> ``down_proj``, ``attn_norm`` / ``ff_norm`` -> the two RMSNorms, ``ln_f`` -> ``norm``, the
  top-level ``ff_out`` -> ``lm_head``. Options the released models do not use (embedding scaling, logit scaling,
  non-Llama blocks, LayerNorm) are refused by name rather than computed wrongly.
- Dream (Qwen2 names already) -> ``Qwen2ForCausalLM`` with ``shift_logits=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from prunelab.methods.window_diffusion.model import DiffusionLM

__all__ = ["LLADA_KEY_MAPPING", "llada_config", "load_llada", "dream_config", "load_dream"]

LLADA_KEY_MAPPING = {
    r"^model\.transformer\.wte\.": "model.embed_tokens.",
    r"^model\.transformer\.ln_f\.": "model.norm.",
    r"^model\.transformer\.ff_out\.": "lm_head.",
    **{rf"^model\.transformer\.blocks\.(\d+)\.{p}\.": rf"model.layers.\1.self_attn.{p}."
       for p in ("q_proj", "k_proj", "v_proj")},
    r"^model\.transformer\.blocks\.(\d+)\.attn_out\.": r"model.layers.\1.self_attn.o_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.": r"model.layers.\1.mlp.gate_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.up_proj\.": r"model.layers.\1.mlp.up_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_out\.": r"model.layers.\1.mlp.down_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.": r"model.layers.\1.input_layernorm.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.": r"model.layers.\1.post_attention_layernorm.",
}
LLADA_MASK_ID = 126336  # LLaDA's generate.py default


def _read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"folder: {os.fspath(folder)!r} has no config.json")
    return json.loads(path.read_text())


def _strict(loaded, folder):
    """``from_pretrained``'s model, or an error naming the keys it would have left at random or ignored (transformers
    only warns)."""
    model, info = loaded
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        listed = "; ".join(f"{k.replace('_', ' ')} ({len(v)}): {', '.join(map(str, v[:6]))}"
                           for k, v in problems.items())
        raise ValueError(f"folder: the checkpoint in {os.fspath(folder)!r} does not fit the model: {listed}")
    return model


def llada_config(raw: dict):
    """A ``LlamaConfig`` computing what LLaDA's ``config.json`` (``model_type: "llada"``) describes."""
    from transformers import LlamaConfig

    refused = {"input_emb_norm": False, "scale_logits": False, "weight_tying": False}
    for key, expected in refused.items():
        if raw.get(key, expected) != expected:
            raise ValueError(f"{key}: LLaDA configs with {key}={raw[key]!r} are not supported (the released "
                             f"checkpoints use {expected})")
    for key, allowed in (("block_type", ("llama",)), ("layer_norm_type", ("rms",)),
                         ("activation_type", ("silu", "swiglu"))):
        if key in raw and raw[key] not in allowed:
            raise ValueError(f"{key}: expected one of {allowed} (Llama blocks), got {raw[key]!r}")
    heads = raw["n_heads"]
    return LlamaConfig(
        vocab_size=raw.get("embedding_size") or raw["vocab_size"], hidden_size=raw["d_model"],
        intermediate_size=raw["mlp_hidden_size"], num_hidden_layers=raw["n_layers"], num_attention_heads=heads,
        num_key_value_heads=raw.get("n_kv_heads") or heads, rope_theta=raw.get("rope_theta", 10000.0),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5), max_position_embeddings=raw.get("max_sequence_length", 4096),
        attention_bias=bool(raw.get("include_bias", False)), mlp_bias=bool(raw.get("include_bias", False)),
        tie_word_embeddings=False)


def load_llada(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> DiffusionLM:
    """LLaDA-8B-Base / -Instruct from ``folder`` (``config.json`` and ``model-*.safetensors``)."""
    from transformers import LlamaForCausalLM

    raw = _read_config(folder)
    lm = _strict(LlamaForCausalLM.from_pretrained(folder, config=llada_config(raw), key_mapping=LLADA_KEY_MAPPING,
                                                  dtype=dtype, output_loading_info=True), folder)
    return DiffusionLM(lm.eval(), mask_id=raw.get("mask_token_id", LLADA_MASK_ID), eos_id=raw.get("eos_token_id"))


def dream_config(raw: dict):
    """A ``Qwen2Config`` computing what Dream's ``config.json`` (``model_type: "Dream"``) describes."""
    from transformers import Qwen2Config

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rope_theta", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
            "hidden_act")
    missing = [k for k in keys[:5] if k not in raw]
    if missing:
        raise ValueError(f"config.json: a Dream config needs {missing}")
    return Qwen2Config(**{k: raw[k] for k in keys if k in raw})


def load_dream(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> DiffusionLM:
    """Dream-v0-Base-7B / -Instruct-7B from ``folder``; logits shifted right by one, as Dream's sampler reads them."""
    from transformers import Qwen2ForCausalLM

    raw = _read_config(folder)
    if "mask_token_id" not in raw:
        raise ValueError("config.json: Dream's config names its mask_token_id (151666 for Dream-7B); none found")
    lm = _strict(Qwen2ForCausalLM.from_pretrained(folder, config=dream_config(raw), dtype=dtype,
                                                  output_loading_info=True), folder)
    return DiffusionLM(lm.eval(), mask_id=raw["mask_token_id"], eos_id=raw.get("eos_token_id"), shift_logits=True)
