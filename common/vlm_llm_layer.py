"""LLM stages: drop visual tokens after language-model layers K1 < K2 < ..., at prefill, on an unmodified VLM.

``LlamaModel`` / ``Qwen2_5_VLTextModel.forward`` compute one causal mask and one pair of rotary tables for all
layers and pass them to each decoder layer as keyword arguments. After a drop at layer K the later layers see
fewer rows, and later their cache is shorter than that of the earlier layers, so:

- a forward hook on ``layers[K]`` runs the plan's stages at K (each on what the previous one kept) and compacts
  the hidden states (``K = -1``: a forward pre-hook on ``layers[0]``, on the language model's input rows); the
  kept rows are recorded as :class:`LayerRows`, composed into rows of the post-projector prompt, so every later
  layer reads one index map;
- forward pre-hooks on the layers after the first K give each layer a mask built for its own rows (kept-and-valid
  columns, causal), and at prefill the rotary tables and ``position_ids`` gathered to its rows. Kept tokens keep
  the positions they had before, whose cache already holds them; after a ``Stage.renumber`` stage the kept rows
  take the positions 0, 1, ... of their rank instead (the rotary rows of the prompt's first rows), and decoding
  continues from the lowered next position.

Attention rows of chosen queries (``Needs.rows``) are computed beside SDPA: prunelab's one language-model attention
function (``decoder.prunelab_attention``, also the KV-cache methods' seam, so both compose on one model), switched
on through the text config while a stage needs rows, hands the query and key of the layers that ask to an observer
that keeps them for ``softmax(q_sel k^T)`` of the selected queries, and returns transformers' own SDPA output.
A stage that reads the next layer (``Needs.next_layer``) gets them from a look-ahead call of layer K + 1's attention
module on layer K's output (its input norm first): the same function records the projections and returns at once,
so no attention is computed and no cache is written.
"""

from __future__ import annotations

import torch

from prunelab.common.decoder import ATTN_NAME, prunelab_attention
from prunelab.common.hf import register_attention, switch_attention
from prunelab.common.vlm_prompt import LayerRows, compact, gather_seq


def _mask(valid: torch.Tensor, q: int) -> torch.Tensor:
    """Bool [B, 1, q, T]: key j visible to query i when valid and not in the future (queries are the last q)."""
    T = valid.shape[1]
    causal = torch.arange(T, device=valid.device)[None] <= torch.arange(T - q, T, device=valid.device)[:, None]
    return (valid[:, None, None, :] & causal[None, None]).contiguous()

def query_rows(query: torch.Tensor, key: torch.Tensor, scaling: float, valid: torch.Tensor,
               select: list[torch.Tensor], causal: bool = True) -> list[torch.Tensor]:
    """Per sample, the attention probabilities ``[H, S_b, T]`` of the queries at rows ``select[b]`` (over the valid
    keys; with ``causal`` the earlier ones only), for ``query`` [B, H, T, d] and ``key`` [B, Hkv, T, d] of one layer
    at prefill."""
    H, Hkv = query.shape[1], key.shape[1]
    k = key.repeat_interleave(H // Hkv, dim=1) if H != Hkv else key
    out = []
    cols = torch.arange(key.shape[2], device=key.device)
    for b, rows in enumerate(select):
        logits = torch.einsum("hsd,htd->hst", query[b][:, rows].float(), k[b].float()) * scaling
        visible = valid[b][None, None] & ((cols[None, None] <= rows[None, :, None]) | (not causal))
        out.append(logits.masked_fill(~visible, float("-inf")).softmax(-1))
    return out


def selector_rows(selectors, attn, where: torch.Tensor, valid: torch.Tensor, input_ids: torch.Tensor,
                  image_token_id: int, causal: bool = True) -> dict:
    """``{selector: (per sample the selected rows [S_b], per sample [H, S_b, L_k])}``: attention rows of the selected
    queries at one layer.

    ``attn`` is what the layer recorded at prefill (query, key, value, scaling, valid); ``where`` [B, L_k] the
    prompt position of each of its rows; ``input_ids`` [B, L] the prompt; ``causal``: the rows' mask.
    """
    if attn is None:
        raise RuntimeError("rows: no attention was recorded at this layer (the engine's rows function did not run)")
    query, key, _, scaling, _ = attn
    ids = input_ids.gather(1, where.clamp(min=0))  # token id of each row
    image = ids == image_token_id
    first_image = torch.where(image & valid, where, where.new_full((), 1 << 40)).amin(-1, keepdim=True)
    out = {}
    for q in selectors:
        if q == "last":  # rows are right-aligned: the prompt's last token is the last row of every sample
            select = [torch.tensor([valid.shape[1] - 1], device=valid.device)] * valid.shape[0]
        elif q == "image":
            select = [(valid[b] & image[b]).nonzero().flatten() for b in range(valid.shape[0])]
        elif q == "text_mean":
            select = [(valid[b] & ~image[b] & (where[b] > first_image[b])).nonzero().flatten()
                      for b in range(valid.shape[0])]
        else:  # a marked token id
            select = [(valid[b] & (ids[b] == q)).nonzero().flatten() for b in range(valid.shape[0])]
        if any(s.numel() == 0 for s in select):
            raise ValueError(f"rows: no query of selector {q!r} in some prompt of the batch")
        p = query_rows(query, key, scaling, valid, select, causal)
        out[q] = (select, [x.mean(1, keepdim=True) for x in p] if q == "text_mean" else p)
    return out


def _with_returning(prompt, keep: torch.Tensor, base: torch.Tensor, hidden: torch.Tensor, back: list):
    """Rows of the compacted prompt after a stage that brings tokens back: the kept rows (``keep`` [B, L_k] over
    rows ``base``) and the returning ones (``back``: per sample prompt positions and values), in prompt order.
    Returns their index into the compacted prompt [B, L''], validity and hidden states."""
    B, C = hidden.shape[0], hidden.shape[-1]
    full = torch.zeros(B, prompt.valid.shape[1], dtype=torch.bool, device=hidden.device)
    buf = hidden.new_zeros(B, prompt.valid.shape[1], C)
    b, k = keep.nonzero(as_tuple=True)
    full[b, base[b, k]] = True
    buf[b, base[b, k]] = hidden[b, k]
    for i, item in enumerate(back):
        if item is not None:
            rows = prompt.row_of[i, item[0]]
            full[i, rows] = True
            buf[i, rows] = item[1].to(buf.dtype)
    index, valid = compact(full)
    return index, valid, buf.gather(1, index[..., None].expand(-1, -1, C))


class PrefixReady(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by the first stage layer's hook while a prefix is cached (``vlm_prefix``): the forward stops there,
    with that layer's output ``hidden`` [1, P', C]."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("prefix cached")
        self.hidden = hidden


def install_llm_stages(model, plan, state, run_stages) -> list:
    """Hooks for every LLM stage of ``plan``; ``run_stages(K, hidden, index, valid) -> (keep_mask, hidden, back)``
    asks the methods (``hidden`` with any merged rows written in, ``back`` the tokens that come back).

    Returns undo callables. ``state.prompt`` (the engine's prompt bookkeeping) gains ``llm_rows``: one
    :class:`LayerRows` per stage layer, in order. ``state.rows[K]`` holds what layer K's attention recorded for
    the stages that read it, ``state.rows[("next", K)]`` what layer K + 1's projections gave on layer K's output
    (``Needs.next_layer``), ``state.rows[("previous", K)]`` what layer K - 1's attention recorded (``Needs.previous``).
    """
    layers = model.model.language_model.layers
    ks = plan.llm_layers  # validated against the depth by the engine before any hook is installed
    reading = [s for s in plan.stages if s.where == "llm" and (s.needs.rows or s.needs.llm_kv)]
    own = {s.layer for s in reading if not s.needs.next_layer}
    previous = {s.layer for s in reading if s.needs.previous}  # layers whose stages also read layer K - 1's rows
    observed = sorted(own | {k - 1 for k in previous})
    probed = {s.layer for s in reading if s.needs.next_layer}
    renumbered = {s.layer for s in plan.stages if s.where == "llm" and s.renumber}

    def rows_for(layer_idx: int) -> LayerRows | None:
        """The rows held by ``layer_idx``: those of the last stage before it."""
        held = [r for r in state.prompt.llm_rows if r.after < layer_idx] if state.prompt is not None else []
        return held[-1] if held else None

    def probe(K: int, hidden: torch.Tensor, kwargs: dict, valid: torch.Tensor) -> tuple:
        """Layer K + 1's post-RoPE query, key and value on layer K's output ``hidden`` (its input norm, q/k/v
        projections and rotary embeddings at the rows' positions), without its attention, output or cache."""
        nxt = layers[K + 1]
        attn, got = nxt.self_attn, []
        saved = {k: vars(attn)[k] for k in ("_prunelab_observe", "_prunelab_probe") if k in vars(attn)}
        attn._prunelab_observe = lambda _m, q, k, v, scaling: got.append((q.detach(), k.detach(), v.detach(),
                                                                          scaling, valid))
        attn._prunelab_probe = True
        try:
            attn(hidden_states=nxt.input_layernorm(hidden), attention_mask=kwargs.get("attention_mask"),
                 position_ids=kwargs.get("position_ids"), past_key_values=None,
                 position_embeddings=kwargs["position_embeddings"])
        finally:
            for k in ("_prunelab_observe", "_prunelab_probe"):
                vars(attn).pop(k, None)
            vars(attn).update(saved)
        if not got:
            raise RuntimeError(f"next_layer: LLM layer {K + 1}'s attention did not run through prunelab's attention "
                               "function")
        return got[0]

    def before_0(_module, args, kwargs):
        """The stages of ``layer=-1`` on layer 0's input rows (the language model's input embeddings)."""
        hidden = args[0] if args else kwargs["hidden_states"]
        out = after_k(-1, None, args, kwargs, hidden)
        if out is None:
            return None
        return ((out, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": out})

    def after_k(K, _module, _args, kwargs, output):
        prompt = state.prompt
        hidden = output[0] if isinstance(output, tuple) else output
        if state.building == K:
            raise PrefixReady(hidden.detach())
        if prompt is None or any(r.after == K for r in prompt.llm_rows):
            return None  # a decode step: the layers after K already hold the pruned prompt in their cache
        current = rows_for(K + 1)
        index = current.index if current is not None else None
        valid = current.valid if current is not None else prompt.valid
        if prompt.prefix_hidden is not None:  # a cached prefix: its rows join the query's here, in front
            prefix, prompt.prefix_hidden = prompt.prefix_hidden, None
            hidden = torch.cat([prefix.to(hidden.dtype), hidden], dim=1)
        if hidden.shape[1] != valid.shape[1]:
            return None
        if K in probed:
            state.rows[("next", K)] = probe(K, hidden, kwargs, valid)
        keep_mask, hidden, back = run_stages(K, hidden, index, valid)
        base = index if index is not None else torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
        if any(item is not None for item in back):  # tokens come back: rebuild the rows from the whole prompt
            local, local_valid, hidden = _with_returning(prompt, keep_mask & valid, base, hidden, back)
            prompt.llm_rows.append(LayerRows(K, local, local_valid))
            state.positions = torch.where(local_valid, prompt.index.gather(1, local), -1)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        local, local_valid = compact(keep_mask)
        kept = local_valid & valid.gather(1, local)
        if K in renumbered:  # rank r among the kept rows takes the position of the prompt's r-th row
            pos = torch.where(kept, (~prompt.valid).sum(-1, keepdim=True) + kept.long().cumsum(-1) - 1, 0)
            prompt.next_pos = prompt.next_pos - (valid.sum(-1) - kept.sum(-1))[None]
        else:
            pos = None if current is None or current.pos is None else current.pos.gather(1, local)
        prompt.llm_rows.append(LayerRows(K, base.gather(1, local), kept, pos))
        state.positions = torch.where(kept, state.positions.gather(1, local), -1)
        hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device)[:, None], local]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def later(layer_idx, _module, args, kwargs):
        rows = rows_for(layer_idx) if state.prompt is not None else None
        if rows is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        q = hidden.shape[1]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length(layer_idx) if cache is not None else 0
        if past == 0:  # prefill: gather the shared per-row tensors to this layer's rows
            prompt = state.prompt  # with a cached prefix the forward's tables cover the query's rows only
            cos, sin = kwargs["position_embeddings"] if prompt.rotary is None else prompt.rotary
            kwargs["position_embeddings"] = (gather_seq(cos, rows.rotary, 1), gather_seq(sin, rows.rotary, 1))
            if isinstance(kwargs.get("position_ids"), torch.Tensor):  # the layer's 2-D (text) ids, where it has any
                ids = kwargs["position_ids"] if prompt.rotary is None else prompt.position_ids
                kwargs["position_ids"] = gather_seq(ids if ids.dim() == 2 else ids[0], rows.rotary, 1)
            kwargs["attention_mask"] = _mask(rows.valid, q)
        else:
            ones = torch.ones(hidden.shape[0], past + q - rows.valid.shape[1], dtype=torch.bool, device=hidden.device)
            kwargs["attention_mask"] = _mask(torch.cat([rows.valid, ones], dim=1), q)
        return args, kwargs

    undo = []
    for K in ks:
        if K < 0:  # before layer 0: registered ahead of layer 0's own mask and rotary pre-hook below
            undo.append(layers[0].register_forward_pre_hook(before_0, with_kwargs=True).remove)
            continue
        hook = layers[K].register_forward_hook(lambda m, a, k, o, _k=K: after_k(_k, m, a, k, o), with_kwargs=True)
        undo.append(hook.remove)
    for i in range(ks[0] + 1 if ks else len(layers), len(layers)):
        hook = layers[i].register_forward_pre_hook(lambda m, a, k, _i=i: later(_i, m, a, k), with_kwargs=True)
        undo.append(hook.remove)
    if reading:
        register_attention(ATTN_NAME, prunelab_attention)
        undo.append(switch_attention([model.model.language_model.config], ATTN_NAME))
    for K in observed:
        attn = layers[K].self_attn

        def sink(module, query, key, value, scaling, _k=K):
            rows = rows_for(_k) if state.prompt is not None else None
            valid = rows.valid if rows is not None else state.prompt.valid
            query = query.detach()
            if query.shape[2] < key.shape[2] == valid.shape[1]:  # a cached prefix's rows have keys, no queries
                query = torch.cat([query.new_zeros(*query.shape[:2], key.shape[2] - query.shape[2],
                                                   query.shape[3]), query], dim=2)
            got = (query, key.detach(), value.detach(), scaling, valid)
            if _k in own:
                state.rows[_k] = got
            if _k + 1 in previous:
                state.rows[("previous", _k + 1)] = got

        attn._prunelab_observe = sink
        undo.append(lambda a=attn: delattr(a, "_prunelab_observe"))
    return undo
