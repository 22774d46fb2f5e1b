"""Hook point (c): drop visual tokens after language-model layer K, at prefill, on an unmodified transformers VLM.

``LlamaModel`` / ``Qwen2_5_VLTextModel.forward`` compute one causal mask and one pair of rotary tables for all
layers and pass them to each decoder layer as keyword arguments. After a drop at layer K the later layers see
fewer rows, and later their cache is shorter than that of layers 0..K, so:

- a forward hook on ``layers[K]`` asks the method (stage "llm") and compacts the hidden states;
- forward pre-hooks on ``layers[K+1:]`` give those layers a mask built for their own rows (kept-and-valid
  columns, causal), and at prefill the rotary tables and ``position_ids`` gathered to the kept rows. Kept tokens
  keep the positions they had in layers 0..K, whose cache already holds them.

The decode mask of layers 0..K is the language model's own (rewritten by ``vlm.py``); only K+1.. need this.
"""

from __future__ import annotations

import torch

from prunelab.common.tokens import gather_tokens


def _mask(valid: torch.Tensor, q: int) -> torch.Tensor:
    """Bool [B, 1, q, T]: key j visible to query i when valid and not in the future (queries are the last q)."""
    T = valid.shape[1]
    causal = torch.arange(T, device=valid.device)[None] <= torch.arange(T - q, T, device=valid.device)[:, None]
    return (valid[:, None, None, :] & causal[None, None]).contiguous()


def install_layer_hooks(model, family, method, K, state, select, compact, gather_seq) -> list:
    from prunelab.common.vlm import ImageContext, VLMContext

    layers = model.model.language_model.layers

    def after_k(_module, _args, output):
        prompt = state.prompt
        hidden = output[0] if isinstance(output, tuple) else output
        if prompt is None or prompt.layer_index is not None or hidden.shape[1] != prompt.valid.shape[1]:
            return None  # a decode step: layers after K already hold the pruned prompt in their cache
        B, Lc = prompt.valid.shape
        row_of = torch.full((B, prompt.orig_len), -1, dtype=torch.long, device=hidden.device)
        rows = torch.arange(Lc, device=hidden.device).expand(B, Lc)
        row_of[prompt.valid.nonzero(as_tuple=True)[0], prompt.index[prompt.valid]] = rows[prompt.valid]
        images = []
        for s, kept in zip(prompt.spans, state.kept):
            r = row_of[s.sample, s.positions[kept]]
            images.append(ImageContext(s, hidden[s.sample, r], kept))
        keeps = select(method, VLMContext(family, "llm", images, B, layer=K))
        keep_mask = prompt.valid.clone()
        for img, keep in zip(images, keeps):
            drop = torch.ones(img.token_ids.numel(), dtype=torch.bool, device=hidden.device)
            drop[keep] = False
            keep_mask[img.span.sample, row_of[img.span.sample, img.span.positions[img.token_ids[drop]]]] = False
        state.kept = [img.token_ids[keep] for img, keep in zip(images, keeps)]
        index, valid = compact(keep_mask)
        prompt.layer_index, prompt.layer_valid = index, valid & prompt.valid.gather(1, index)
        state.positions = torch.where(prompt.layer_valid, state.positions.gather(1, index), -1)
        hidden = gather_tokens(hidden, index)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def later(layer_idx, _module, args, kwargs):
        prompt = state.prompt
        if prompt is None or prompt.layer_index is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        q = hidden.shape[1]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length(layer_idx) if cache is not None else 0
        if past == 0:  # prefill: gather the shared per-row tensors to the kept rows
            index = prompt.layer_index
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (gather_seq(cos, index, 1), gather_seq(sin, index, 1))
            if isinstance(kwargs.get("position_ids"), torch.Tensor):
                kwargs["position_ids"] = gather_seq(kwargs["position_ids"], index, 1)
            kwargs["attention_mask"] = _mask(prompt.layer_valid, q)
        else:
            ones = torch.ones(hidden.shape[0], past + q - prompt.layer_valid.shape[1], dtype=torch.bool,
                              device=hidden.device)
            kwargs["attention_mask"] = _mask(torch.cat([prompt.layer_valid, ones], dim=1), q)
        return args, kwargs

    undo = [layers[K].register_forward_hook(after_k).remove]
    for i in range(K + 1, len(layers)):
        hook = layers[i].register_forward_pre_hook(lambda m, a, k, _i=i: later(_i, m, a, k), with_kwargs=True)
        undo.append(hook.remove)
    return undo
