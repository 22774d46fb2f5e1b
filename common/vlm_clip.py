"""The CLIP-tower families: LLaVA-1.5 (one 336 px image, a CLS token and 24x24 patches) and LLaVA-NeXT (a base
tile plus crop tiles, unpadded and closed by ``image_newline`` tokens).

Pruning inside the tower. A stage after encoder layer ``l`` runs in a forward pre-hook of layer ``l + 1`` on its
input ``[tiles, 1 + n, C]``: the CLS row is kept, each tile keeps the ``K`` patches the stage chose (the tiles of
one image keep the same count; images may differ), and the later layers run on ``[tiles, 1 + K_max, C]``: a
shorter image's tiles are padded with copies of their last row, masked out as keys (a boolean attention mask
passed to each later layer) and never read back. A forward hook on the tower scatters every later hidden state it
returns back to ``1 + n`` rows (zeros where a patch was dropped), so ``get_image_features``, the projector and
``masked_scatter`` run unchanged; the engine then starts the prompt's pruning from the tokens the tower kept, so the
zero rows never reach the language model.
"""

from __future__ import annotations

import torch

from prunelab.common.hf import llava_next_tiles, llava_next_unpadded
from prunelab.common.vlm_family import Family, ImageSpan, crop_grid, register

VECTORS = ("queries", "keys", "values")
STATS = ("received", "cls_row", "hidden", *VECTORS)


def scatter_rows(x: torch.Tensor, rows: torch.Tensor, full: int, dim: int) -> torch.Tensor:
    """``x`` whose ``dim`` holds ``rows`` ([tiles, K] indices into ``full``; ``full`` marks a padding row, which is
    dropped) of a zero tensor of length ``full``."""
    x = x.movedim(dim, -1)
    out = x.new_zeros(*x.shape[:-1], full + 1)
    index = rows.view(rows.shape[0], *[1] * (x.dim() - 2), rows.shape[1]).expand_as(x)
    return out.scatter(-1, index, x)[..., :full].movedim(-1, dim)


class Llava(Family):
    name, model_class = "llava", "LlavaForConditionalGeneration"
    same_count = True

    def tower(self, model):
        return model.model.vision_tower

    def vision_blocks(self, model) -> list:
        tower = self.tower(model)
        return list(getattr(tower, "vision_model", tower).encoder.layers)  # CLIPVisionModel flattens its encoder

    def vision_attention(self, block):
        return block.self_attn

    def side(self, model) -> int:
        v = model.config.vision_config
        return v.image_size // v.patch_size

    def image_layouts(self, model, image_sizes=None, image_grid_thw=None, n_images=None) -> list:
        side = self.side(model)
        n = side * side + (1 if model.config.vision_feature_select_strategy == "full" else 0)
        return [(n, (side, side), None, n, None)] * int(n_images or 0)

    def split_stats(self, model, store, tiles, grid_thw=None, tower=None, layers=None) -> list:
        drop = 1 if model.config.vision_feature_select_strategy == "default" else 0
        depth = len(self.vision_blocks(model))
        out = [{kind: {} for kind in STATS} for _ in tiles]
        for kind in STATS:
            for layer, value in store.get(kind, {}).items():
                if layers is not None and layer not in layers:
                    continue
                value = value if kind == "hidden" else torch.cat(value)  # [tiles, 1+n, C] / [tiles, H, 1+n(, d)]
                dim = 1 if kind == "hidden" else 2
                rows = None if tower is None else tower.held_at(layer % depth)
                if rows is not None:
                    value = scatter_rows(value, rows, tower.full, dim)
                if kind not in VECTORS:  # patch statistics: the CLS goes where the projector drops it
                    value = value.narrow(dim, drop, value.shape[dim] - drop)
                for i, part in enumerate(value.split(tiles)):
                    out[i][kind][layer] = part
        return out

    def on_tower_call(self, state, args, kwargs) -> None:
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        state.tiles = [1] * int(pixels.shape[0])

    def install_tower_stages(self, model, layers, state, run, reads: dict | None = None, patches: bool = False) -> list:
        from prunelab.common.vlm_plan import ImageContext

        blocks = self.vision_blocks(model)
        bad = [layer for layer in layers if not 0 <= layer < len(blocks) - 1]
        if bad:
            raise ValueError(f"layer: vision stages after encoder layers {bad}; must lie in [0, {len(blocks) - 2}] "
                             "(a later encoder layer must exist)")

        def prune(layer, hidden):
            tower, (T, n1, _) = state.tower, hidden.shape
            if tower.ids is None:
                tower.full, tower.ids = n1, torch.arange(n1 - 1, device=hidden.device).expand(T, -1)
                tower.extra["counts"] = [n1 - 1] * len(state.tiles)
            if sum(state.tiles) != T:
                raise RuntimeError(f"the vision tower ran {T} tiles, expected {sum(state.tiles)}")
            read = (reads or {}).get(layer)  # only the encoder layers this stage's methods read
            stats = (self.split_stats(model, state.stats, state.tiles, tower=tower, layers=read)
                     if any(state.stats.values()) else [{} for _ in state.tiles])
            images, start = [], 0
            for t, n, stat in zip(state.tiles, tower.extra["counts"], stats):
                images.append(ImageContext(None, hidden[start:start + t, 1:1 + n], tower.ids[start:start + t, :n],
                                           **stat))
                start += t
            kept = run(layer, images)  # per image: (rows kept [t, K_i], their values [t, K_i, C])
            K = max(k.shape[-1] for k, _ in kept)  # images may keep different counts: pad with the last row
            keep = torch.cat([torch.cat([k, k[:, -1:].expand(-1, K - k.shape[-1])], 1) for k, _ in kept])
            values = torch.cat([torch.cat([v, v[:, -1:].expand(-1, K - v.shape[1], -1)], 1) for _, v in kept])
            tower.extra["counts"] = [k.shape[-1] for k, _ in kept]
            per_tile = torch.tensor([k.shape[-1] for k, _ in kept for _ in range(k.shape[0])], device=hidden.device)
            valid = torch.arange(K, device=hidden.device)[None] < per_tile[:, None]
            tower.ids = tower.ids.gather(1, keep)
            rows = torch.where(valid, tower.ids + 1, tower.full)  # padding rows point past the end
            tower.held.append((layer, torch.cat([torch.zeros_like(keep[:, :1]), rows], 1)))
            tower.extra["mask"] = None if bool(valid.all()) else torch.cat([valid[:, :1], valid], 1)[:, None, None]
            out = torch.cat([hidden[:, :1], values.to(hidden.dtype)], 1)
            tower.extra[layer] = out  # layer l's output as the stage left it (merged rows included)
            return out

        def pre(block, _module, args):
            tower, hidden = state.tower, args[0]
            if block - 1 in layers:
                hidden = prune(block - 1, hidden)
            if tower is None or tower.ids is None:
                return None
            mask = tower.extra.get("mask")  # ragged images: padding keys masked out
            return (hidden, mask if mask is not None else args[1], *args[2:])

        def restore(_module, _args, output):
            tower = state.tower
            if tower is None or not tower.held:
                return output
            if output.hidden_states is not None:  # entry h is layer h - 1's output (entry 0: the embeddings)
                output.hidden_states = tuple(
                    x if x is None or tower.held_at(h) is None
                    else scatter_rows(tower.extra.get(h - 1, x), tower.held_at(h), tower.full, 1)
                    for h, x in enumerate(output.hidden_states))
            output.last_hidden_state = scatter_rows(output.last_hidden_state, tower.held[-1][1], tower.full, 1)
            return output

        undo = [blocks[b].register_forward_pre_hook(lambda m, a, _b=b: pre(_b, m, a)).remove
                for b in range(min(layers) + 1, len(blocks))]
        undo.append(self.tower(model).register_forward_hook(restore).remove)
        return undo

    def span_ids(self, model, span: ImageSpan, ids: torch.Tensor) -> torch.Tensor:
        if model.config.vision_feature_select_strategy == "full":  # the CLS is the span's first token
            return torch.cat([ids.new_zeros(1), ids[0] + 1])
        return ids[0]


class LlavaNext(Llava):
    name, model_class = "llava_next", "LlavaNextForConditionalGeneration"
    same_count, tiles_from_sizes = False, True

    def image_layouts(self, model, image_sizes=None, image_grid_thw=None, n_images=None) -> list:
        from prunelab.common.handle import UnsupportedModelError

        if image_sizes is None:
            raise ValueError("image_sizes: LLaVA-NeXT needs the image sizes to locate image spans")
        if model.config.vision_feature_select_strategy != "default":
            raise UnsupportedModelError("model: LLaVA-NeXT with vision_feature_select_strategy='full' is not "
                                        "supported")
        v, side, out = model.config.vision_config, self.side(model), []
        for size in image_sizes.tolist():
            tiles, rows, cols = llava_next_unpadded(size, model.config.image_grid_pinpoints, v.image_size, side)
            base = side * side
            newline = torch.zeros(base + rows * (cols + 1), dtype=torch.bool)
            newline[base + cols::cols + 1] = True  # pack_image_features appends image_newline after each row
            out.append((int(newline.numel()), (side, side), newline, base, tiles))
        return out

    def layouts_from_features(self, model, features) -> list:
        """NeXT newlines are the rows equal to the ``image_newline`` parameter (``pack_image_features``
        concatenates copies of it, so equality is exact)."""
        side, out = self.side(model), []
        for f in features:
            newline = (f == model.model.image_newline.to(f)).all(-1)
            out.append((int(f.shape[0]), (side, side), newline, side * side, None))
        return out

    def crops(self, model, image_sizes=None, n_images=0) -> list[int]:
        if image_sizes is None:
            return [1] * n_images
        return [llava_next_tiles(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
                for size in image_sizes.tolist()]

    def on_tower_call(self, state, args, kwargs) -> None:
        pass  # tiles per image come from image_sizes, recorded when get_image_features is called

    def span_ids(self, model, span: ImageSpan, ids: torch.Tensor) -> torch.Tensor:
        """Base-tile patch ``j`` is span token ``j``; crop patches go through the unpadded grid
        (:func:`~prunelab.common.vlm_family.crop_grid`); every ``image_newline`` token stays."""
        parts = [ids[0], span.newline.to(ids.device).nonzero().flatten()]
        if ids.shape[0] > 1:
            grid = crop_grid(span, ids.shape[0] - 1)
            kept = torch.zeros(ids.shape[0] - 1, grid.side ** 2, dtype=torch.bool, device=ids.device)
            kept.scatter_(1, ids[1:], True)
            parts.append(grid.index(ids.device)[grid.stitch(kept)])
        return torch.cat(parts).sort().values


LLAVA, LLAVA_NEXT = register(Llava()), register(LlavaNext())
