"""The Qwen2.5-VL family: a window-attention vision tower without CLS, 2x2 merge units, 3-D M-RoPE positions.

Each LLM visual token is one merge unit (``spatial_merge_size ** 2`` patches the ``PatchMerger`` concatenates). The
tower runs on merge units permuted into attention windows (``get_vision_window_index``), with packed sequences
delimited by ``cu_seqlens`` (one segment per image frame at full-attention blocks, one per window elsewhere).

Pruning inside the tower. A stage after block ``l`` runs in a forward pre-hook of block ``l + 1`` (after the last
block: of the merger): it sees each image's remaining merge units in raster order (``embeds`` ``[1, n, m*m*C]``,
the merger's grouping) and keeps whole units, so every later block runs on fewer rows. Each later block's pre-hook
passes it the rows' own rotary embeddings and ``cu_seqlens`` recounted over the kept units (empty windows removed),
so images may keep different counts. A forward hook on the merger scatters its output back to every unit (zeros
where dropped) before the tower un-permutes the windows, so ``masked_scatter`` fits; the engine starts the prompt's
pruning from the kept units.

Stages that select patches (``Stage.patches``) see each image's remaining patches instead (``[1, n, C]``, ids
``unit * m*m + p``) and keep any of them; a window still holds the kept patches of its units. Before the merger the
kept patches are put in raster order, so the merger joins every ``m*m`` consecutive ones, and the hook on the merger
puts an image's tokens in the first units of its span; the tower history then reads as units (those holding a kept
patch), ending with the merger's entry (the span's first units).
"""

from __future__ import annotations

import torch

from prunelab.common.hf import vision_windows
from prunelab.common.vlm_family import Family, ImageSpan, Tower, register

VECTORS = ("queries", "keys", "values")


class Qwen25VL(Family):
    name, model_class = "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"
    has_cls, mrope = False, True

    def tower(self, model):
        return model.model.visual

    def vision_blocks(self, model) -> list:
        return list(model.model.visual.blocks)

    def vision_attention(self, block):
        return block.attn

    def image_layouts(self, model, image_sizes=None, image_grid_thw=None, n_images=None) -> list:
        if image_grid_thw is None:
            raise ValueError("image_grid_thw: Qwen2.5-VL needs the image grids to locate image spans")
        m = model.config.vision_config.spatial_merge_size
        return [(t * h * w // (m * m), (t * h // m, w // m), None, t * h * w // (m * m), None)
                for t, h, w in image_grid_thw.tolist()]

    def grid_from_spans(self, model, spans: list[ImageSpan]) -> torch.Tensor:
        """``image_grid_thw`` of t = 1 images (the generate() path), from the spans' merged grids."""
        m = model.config.vision_config.spatial_merge_size
        return torch.tensor([[1, s.grid[0] * m, s.grid[1] * m] for s in spans])

    def windows(self, model, grid_thw) -> tuple[torch.Tensor, torch.Tensor]:
        v = model.config.vision_config
        return vision_windows(grid_thw, v.spatial_merge_size, v.window_size, v.patch_size)

    def split_stats(self, model, store, tiles, grid_thw=None, tower: Tower | None = None, layers=None) -> list:
        m2 = model.config.vision_config.spatial_merge_size ** 2
        depth = len(self.vision_blocks(model))
        window_index = tower.extra.get("window_index") if tower is not None else None
        if window_index is None:  # no tower stage has computed it in this forward
            window_index = self.windows(model, grid_thw)[0]
        restore = torch.argsort(window_index)  # the same un-permutation the tower applies after its merger
        counts = (grid_thw.prod(-1) // m2).tolist()
        out = [{kind: {} for kind in ("received", "cls_row", "hidden", *VECTORS)} for _ in tiles]
        for kind in ("received", "hidden", *VECTORS):
            for layer, value in store.get(kind, {}).items():
                if layers is not None and layer not in layers:
                    continue
                if kind != "hidden":  # chunks [1, H, n_chunk(, d)] in window order -> [H, rows(, d)]
                    value = torch.cat([c[0] for c in value], dim=1)
                head = kind != "hidden"  # a leading head dimension
                units = None if tower is None else tower.held_at(layer % depth)
                if units is not None:  # rows of the kept units (or patches) only: back to every row, 0 where dropped
                    rows = units if tower.extra.get("patches") else (
                        units[:, None] * m2 + torch.arange(m2, device=units.device)).flatten()
                    full = value.new_zeros(*value.shape[:int(head)], tower.full * m2, *value.shape[int(head) + 1:])
                    full[(slice(None),) * int(head) + (rows,)] = value
                    value = full
                if head:  # -> [H, N, m*m(, d)] in raster order
                    parts = value.view(value.shape[0], -1, m2, *value.shape[2:])[:, restore].split(counts, dim=1)
                else:
                    parts = value.view(-1, m2, value.shape[-1])[restore].split(counts)
                for i, part in enumerate(parts):
                    out[i][kind][layer] = part
        return out

    def on_tower_call(self, state, args, kwargs) -> None:
        state.grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        state.tiles = [1] * int(state.grid_thw.shape[0])

    def install_tower_stages(self, model, layers, state, run, reads: dict | None = None, patches: bool = False) -> list:
        from prunelab.common.vlm_plan import ImageContext

        blocks, v = self.vision_blocks(model), model.config.vision_config
        m2, full_blocks = v.spatial_merge_size ** 2, set(v.fullatt_block_indexes)
        step = m2 if patches else 1  # rows a token id stands for: patches, or merge units of m2 patches
        bad = [layer for layer in layers if not 0 <= layer < len(blocks)]
        if bad:  # a stage after the last block runs before the merger
            raise ValueError(f"layer: vision stages after encoder layers {bad}; must lie in [0, {len(blocks) - 1}]")

        def begin(hidden, kwargs):  # the first stage of this tower forward
            tower, grid = state.tower, state.grid_thw
            window_index, cu_window = self.windows(model, grid)
            tower.full = int(window_index.numel())
            frames = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0]).cumsum(0) // m2
            tower.extra.update(window_index=window_index.to(hidden.device), pe=kwargs.get("position_embeddings"),
                               cu={True: torch.cat([frames.new_zeros(1), frames]).to(hidden.device),
                                   False: (cu_window // m2).long().to(hidden.device)}, patches=patches)
            tower.held.append((-1, torch.arange(tower.full * step, device=hidden.device)))

        def raster_ids(held):  # the held rows' token ids: raster units, or raster patches unit * m2 + p
            return state.tower.extra["window_index"][held // step] * step + held % step

        def prune(layer, hidden, kwargs):
            tower, grid = state.tower, state.grid_thw
            if not tower.held:
                begin(hidden, kwargs)
            held = tower.held[-1][1]
            raster = raster_ids(held)
            ends = (grid.prod(-1) // m2).cumsum(0).to(hidden.device) * step
            image_of = torch.searchsorted(ends, raster, right=True)
            order = torch.argsort(raster)
            grouped = hidden.view(held.numel(), -1)  # [rows, step' * C] in window order: units of m*m, or patches
            read = (reads or {}).get(layer)  # only the encoder layers this stage's methods read
            stats = (self.split_stats(model, state.stats, state.tiles, grid, tower, read)
                     if any(state.stats.values()) else [{} for _ in state.tiles])
            images, picked = [], []
            for i, stat in enumerate(stats):
                sel = order[image_of[order] == i]
                start = 0 if i == 0 else int(ends[i - 1])
                images.append(ImageContext(None, grouped[sel][None], (raster[sel] - start)[None], **stat))
                picked.append(sel)
            kept = torch.zeros(held.numel(), dtype=torch.bool, device=hidden.device)
            grouped = grouped.clone()
            for sel, (k, values) in zip(picked, run(layer, images)):  # kept rows, their (merged) values
                kept[sel[k[0]]] = True
                grouped[sel[k[0]]] = values[0].to(grouped.dtype)
            tower.held.append((layer, held[kept]))
            return grouped[kept].view(-1, hidden.shape[-1])

        def pre(block, _module, args, kwargs):
            tower = state.tower
            hidden = args[0]
            if block - 1 in layers:
                hidden = prune(block - 1, hidden, kwargs)
            if tower is None or not tower.held:
                return None
            held = tower.held[-1][1]
            rows = held if patches else (held[:, None] * m2 + torch.arange(m2, device=held.device)).flatten()
            cu = tower.extra["cu"][block in full_blocks]
            counts = torch.bincount(torch.searchsorted(cu[1:], held // step, right=True), minlength=cu.numel() - 1)
            counts = counts[counts > 0] * (m2 // step)
            kwargs.update(cu_seqlens=torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32),
                          max_seqlen=None, position_embeddings=tuple(p[rows] for p in tower.extra["pe"]))
            return (hidden, *args[1:]), kwargs

        def before_merger(_module, args):
            hidden = prune(len(blocks) - 1, args[0], {}) if len(blocks) - 1 in layers else args[0]
            tower = state.tower
            if not patches or tower is None or not tower.held or tower.held[-1][1].numel() == tower.full * m2:
                return (hidden, *args[1:])
            # patches: the merger joins every m2 consecutive kept patches of an image, in raster order
            raster = raster_ids(tower.held[-1][1])
            units = (state.grid_thw.prod(-1) // m2).to(raster.device)
            per_image = torch.bincount(torch.searchsorted(units.cumsum(0) * m2, raster, right=True),
                                       minlength=units.numel())
            if bool((per_image % m2).any()):
                raise ValueError(f"patches: each image keeps a multiple of {m2} patches when the tower is done (the "
                                 f"merger joins {m2} at a time); kept {per_image.tolist()}")
            tower.extra["merged"] = (per_image // m2).tolist()
            return (hidden[torch.argsort(raster)], *args[1:])

        def restore(_module, _args, output):
            tower = state.tower
            if tower is None or not tower.held:
                return output
            full = output.new_zeros(tower.full, output.shape[-1])
            merged = tower.extra.pop("merged", None)
            if patches:  # what each stage kept, as the units holding a kept patch
                tower.history[:] = [(name, [torch.unique(i // m2)[None] for i in ids]) for name, ids in tower.history]
            if merged is None:  # tokens in window order, each where its unit sits
                full[tower.held[-1][1] if not patches else torch.arange(tower.full, device=output.device)] = output
                return full
            # an image's tokens fill the first slots of its span: raster units start, start + 1, ... (the tower
            # un-permutes the windows next, so each goes to that unit's window position)
            units = (state.grid_thw.prod(-1) // m2).tolist()
            starts = [sum(units[:i]) for i in range(len(units))]
            window_of = torch.argsort(tower.extra["window_index"])
            full[torch.cat([window_of[s:s + k] for s, k in zip(starts, merged)])] = output
            tower.history.append(("merger", [torch.arange(k, device=output.device)[None] for k in merged]))
            return full

        first = min(layers)
        undo = [blocks[b].register_forward_pre_hook(lambda m, a, k, _b=b: pre(_b, m, a, k), with_kwargs=True).remove
                for b in range(first + 1, len(blocks))]
        if len(blocks) - 1 in layers or patches:
            undo.append(model.model.visual.merger.register_forward_pre_hook(before_merger).remove)
        undo.append(model.model.visual.merger.register_forward_hook(restore).remove)
        return undo

    def span_ids(self, model, span: ImageSpan, ids: torch.Tensor) -> torch.Tensor:
        return ids[0]  # the span's tokens are the merge units in raster order


QWEN2_5_VL = register(Qwen25VL())
