"""Hook point (a): statistics from inside a VLM's vision encoder, with the tower kept on SDPA.

Two statistics, at the encoder layers a method asks for (0-based):

- ``hidden``: the layer's output hidden states, from a forward hook on the layer module;
- ``received``: the mean attention each patch receives at that layer (HiPrune's ``g^l_j = mean_h mean_i
  A_h[i, j]``, as in the official ``encode_images``), through ``prunelab.kernels.attention_received`` so no ``[N, N]``
  softmax is materialised on the fused path.

``received`` uses one attention function registered under the new name ``"prunelab_vlm_vision"`` in
transformers' ``AttentionInterface`` (no entry is replaced) and switched on through the vision config's own
``_attn_implementation`` (CLIPAttention and Qwen2_5_VLVisionAttention both dispatch through
``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, ...)``). Layers without a request fall
through to transformers' ``sdpa_attention_forward``, so the tower's maths is unchanged.

Layout of the results, per prompt image (the model's own order):

- LLaVA / NeXT (CLIP): ``[tiles, P]`` received and ``[tiles, P, C]`` hidden, patches only: the CLS column /
  row is dropped when ``vision_feature_select_strategy="default"``, as the projector drops it; queries include
  the CLS, as in HiPrune's code.
- Qwen2.5-VL: ``[N]`` received and ``[N, m*m, C]`` hidden in the raster order of the merged LLM tokens. The tower
  runs on merge units permuted into attention windows (``get_vision_window_index``); the stats are averaged over
  each 2x2 merge unit and un-permuted with that same index. At window-attention blocks the sums are local to a
  window; HiPrune uses full-attention blocks (``fullatt_block_indexes``).
"""

from __future__ import annotations

import torch

from prunelab.common.hf import register_attention, sdpa_attention, switch_attention, vision_window_index

VISION_ATTN_NAME = "prunelab_vlm_vision"


def _vision_attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, **kwargs):
    sink = getattr(module, "_prunelab_vlm_sink", None)
    if sink is None or attention_mask is not None or module.training:
        return sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    from prunelab.kernels.attention_received import attention_received

    store, layers = sink
    out, received = attention_received(query, key, value, scale=scaling)
    # [B, H, Nk] column sums over queries -> mean over queries and heads (HiPrune's g^l).
    g = received.mean(dim=1) / query.shape[2]
    for layer in layers:
        store.setdefault(layer, []).append(g)
    return out.transpose(1, 2).contiguous(), None


def vision_layers(model, family: str) -> list:
    if family == "qwen2_5_vl":
        return list(model.model.visual.blocks)
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)  # CLIPVisionModel flattens its encoder in transformers 5
    return list(tower.encoder.layers)


def install_vision_hooks(model, family: str, layers, received: bool, hidden: bool, store: dict) -> list:
    """Install the requested statistics at ``layers``; returns undo callables. ``store`` fills per forward:
    ``store["received"][layer]`` (list of per-call tensors) and ``store["hidden"][layer]``.

    A negative layer counts from the end (``layer + depth``, as Python indexing): the request carries no model, so
    methods can ask for "the last block" before they see one. Statistics stay keyed by the layer as requested, so
    ``-1`` and ``depth - 1`` may both be asked for and each finds its own entry.
    """
    blocks = vision_layers(model, family)
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
    if received:
        register_attention(VISION_ATTN_NAME, _vision_attention)
        config = blocks[0].attn.config if family == "qwen2_5_vl" else blocks[0].self_attn.config
        restore = switch_attention([config], VISION_ATTN_NAME)
        sink = store.setdefault("received", {})
        keys: dict[int, list[int]] = {}  # resolved block -> the requested keys it reports under
        for layer in layers:
            keys.setdefault(layer % depth, []).append(layer)
        for block, names in keys.items():
            attn = blocks[block].attn if family == "qwen2_5_vl" else blocks[block].self_attn
            attn._prunelab_vlm_sink = (sink, tuple(dict.fromkeys(names)))
            undo.append(lambda a=attn: delattr(a, "_prunelab_vlm_sink"))
        undo.append(restore)
    return undo


def per_image_stats(model, family: str, store: dict, tiles: list[int], image_grid_thw=None) -> list[dict]:
    """Split the store of one vision forward into per-image ``{"received": {l: ..}, "hidden": {l: ..}}``."""
    n = len(tiles)
    out = [{"received": {}, "hidden": {}} for _ in range(n)]
    if family == "qwen2_5_vl":
        v = model.config.vision_config
        m2 = v.spatial_merge_size ** 2
        window_index = vision_window_index(image_grid_thw, v.spatial_merge_size, v.window_size, v.patch_size)
        restore = torch.argsort(window_index)  # the same un-permutation the tower applies after its merger
        counts = (image_grid_thw.prod(-1) // m2).tolist()
        for kind in ("received", "hidden"):
            for layer, value in store.get(kind, {}).items():
                if kind == "received":  # chunks [1, n_chunk] in window order -> mean over each merge unit
                    value = torch.cat([c.flatten() for c in value]).view(-1, m2).mean(-1)[restore]
                else:
                    value = value.view(-1, m2, value.shape[-1])[restore]
                for i, part in enumerate(value.split(counts)):
                    out[i][kind][layer] = part
        return out
    drop = 1 if model.config.vision_feature_select_strategy == "default" else 0
    for kind in ("received", "hidden"):
        for layer, value in store.get(kind, {}).items():
            value = torch.cat(value) if kind == "received" else value  # [tiles_total, 1 + P(, C)]
            for i, part in enumerate(value[:, drop:].split(tiles)):
                out[i][kind][layer] = part
    return out
