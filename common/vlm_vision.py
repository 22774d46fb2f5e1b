"""Hook point (a): statistics from inside a VLM's vision encoder, with the tower kept on SDPA.

Raw, per-head statistics at the encoder layers a plan reads (0-based); any averaging a paper defines (HiPrune's
mean over heads) belongs to the method:

- ``hidden``: the layer's output hidden states, from a forward hook on the layer module;
- ``received``: the attention each patch receives at that layer, per head, averaged over the queries
  (``mean_i A_h[i, j]``), through ``prunelab.kernels.attention_received`` so no ``[N, N]`` softmax is
  materialised on the fused path;
- ``cls_row``: the CLS query's attention row over the patches, per head (``A_h[0, j]``; CLIP towers only);
- ``queries`` / ``keys`` / ``values``: the layer's per-head vectors as its attention function receives them
  (Qwen2.5-VL: after the vision RoPE), every token included (CLIP: the CLS first).

``received`` and ``cls_row`` use one attention function registered under the new name ``"prunelab_vlm_vision"`` in
transformers' ``AttentionInterface`` (no entry is replaced) and switched on through the vision config's own
``_attn_implementation`` (CLIPAttention and Qwen2_5_VLVisionAttention both dispatch through
``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, ...)``). Layers without a request fall
through to transformers' ``sdpa_attention_forward``, so the tower's maths is unchanged.

Layout of the results, per prompt image (the model's own order):

- LLaVA / NeXT (CLIP): ``[tiles, H, P]`` received and CLS row, ``[tiles, P, C]`` hidden, patches only: the CLS
  column / row is dropped when ``vision_feature_select_strategy="default"``, as the projector drops it; queries
  include the CLS, as in HiPrune's code. ``[tiles, H, 1 + P, d]`` queries, keys and values, the CLS first.
- Qwen2.5-VL: ``[H, N, m*m]`` received, ``[N, m*m, C]`` hidden and ``[H, N, m*m, d]`` queries, keys and values, in
  the raster order of the merged LLM tokens,
  one entry per patch of each 2x2 merge unit. The tower runs on merge units permuted into attention windows
  (``get_vision_window_index``); the stats are un-permuted with that same index. At window-attention blocks the
  means are local to a window; HiPrune uses full-attention blocks (``fullatt_block_indexes``).
"""

from __future__ import annotations

from prunelab.common.hf import register_attention, sdpa_attention, switch_attention
from prunelab.common.vlm_layout import adapter

VISION_ATTN_NAME = "prunelab_vlm_vision"


VECTORS = ("queries", "keys", "values")  # per-head vectors a plan may read, as the attention function receives them


def _vision_attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, **kwargs):
    sink = getattr(module, "_prunelab_vlm_sink", None)
    if sink is None or module.training:
        return sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    store, layers, kinds = sink
    found = dict(zip(VECTORS, (query, key, value)))
    wants = {"received", "cls_row"} & set(kinds)
    if attention_mask is not None:  # a ragged tower stage's padding keys: the statistics from the explicit softmax
        out = sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)[0]
        if wants:
            keys = attention_mask[:, :, :1].bool()  # [T, 1, 1, N]: real rows, as keys and as queries
            probs = ((query.float() @ key.float().transpose(-1, -2)) * scaling).masked_fill(~keys, float("-inf"))
            probs = probs.softmax(-1)
            rows = keys.transpose(-1, -2).float()  # [T, 1, N, 1]
            found["received"] = (probs * rows).sum(2) / rows.sum(2)
            found["cls_row"] = probs[:, :, 0]
    elif "received" in kinds:
        from prunelab.kernels.attention_received import attention_received

        out, received = attention_received(query, key, value, scale=scaling)
        found["received"] = received / query.shape[2]  # [B, H, Nk] column sums -> mean over the queries, per head
        out = out.transpose(1, 2).contiguous()
    else:
        out = sdpa_attention(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)[0]
    if "cls_row" in kinds and "cls_row" not in found:  # the CLS query (position 0) over every key, per head
        found["cls_row"] = ((query[:, :, :1].float() @ key.float().transpose(-1, -2)) * scaling).softmax(-1)[:, :, 0]
    for layer in layers:
        for kind in kinds:
            store.setdefault(kind, {}).setdefault(layer, []).append(found[kind])
    return out, None


def vision_layers(model, family) -> list:
    return adapter(family).vision_blocks(model)


def install_vision_hooks(model, family: str, layers, received: bool, hidden: bool, store: dict, *,
                         cls_row: bool = False, vectors: tuple[str, ...] = ()) -> list:
    """Install the requested statistics at ``layers``; returns undo callables. ``store`` fills per forward:
    ``store["received"][layer]`` and ``store["cls_row"][layer]`` (lists of per-call ``[B, H, Nk]`` tensors),
    ``store[v][layer]`` for ``v`` in ``vectors`` (lists of per-call ``[B, H, Nk, d]``) and ``store["hidden"][layer]``.

    A negative layer counts from the end (``layer + depth``, as Python indexing): the request carries no model, so
    methods can ask for "the last block" before they see one. Statistics stay keyed by the layer as requested, so
    ``-1`` and ``depth - 1`` may both be asked for and each finds its own entry.
    """
    family = adapter(family)
    blocks = family.vision_blocks(model)
    depth = len(blocks)
    bad = [layer for layer in layers if not -depth <= layer < depth]
    if bad:
        raise ValueError(f"vision_layers: {bad} outside the vision encoder's {depth} layers")
    undo = []
    hidden_store = store.setdefault("hidden", {})
    if hidden:
        def grab(layer, _module, _args, output):
            hidden_store[layer] = output[0] if isinstance(output, tuple) else output

        for layer in layers:
            hook = blocks[layer % depth].register_forward_hook(lambda m, a, o, _l=layer: grab(_l, m, a, o))
            undo.append(hook.remove)
    if cls_row and not family.has_cls:
        raise ValueError(f"cls_row: the vision tower of {family.name} has no CLS token")
    kinds = tuple(k for k, on in (("received", received), ("cls_row", cls_row)) if on) + tuple(vectors)
    if kinds:
        register_attention(VISION_ATTN_NAME, _vision_attention)
        config = family.vision_attention(blocks[0]).config
        restore = switch_attention([config], VISION_ATTN_NAME)
        keys: dict[int, list[int]] = {}  # resolved block -> the requested keys it reports under
        for layer in layers:
            keys.setdefault(layer % depth, []).append(layer)
        for block, names in keys.items():
            attn = family.vision_attention(blocks[block])
            attn._prunelab_vlm_sink = (store, tuple(dict.fromkeys(names)), kinds)
            undo.append(lambda a=attn: delattr(a, "_prunelab_vlm_sink"))
        undo.append(restore)
    return undo


def per_image_stats(model, family, store: dict, tiles: list[int], image_grid_thw=None, tower=None) -> list[dict]:
    """Split the store of one vision forward into per-image ``{"received": {l: ..}, "cls_row": .., "hidden": ..}``;
    rows a vision-encoder stage dropped read 0 (``tower``: its :class:`~prunelab.common.vlm_family.Tower`)."""
    return adapter(family).split_stats(model, store, tiles, image_grid_thw, tower)
