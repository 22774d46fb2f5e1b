"""Running a plan's stages: each returns one :class:`~prunelab.common.reduction.Reduction` per image, checked against
the kept-token contract and the stage's exact budget, and applied to the rows of that point of the forward.

A reduction with a ``merge`` gives its kept rows the merged values (``Reduction.gather``): inside the tower the later
encoder layers run on them, after the projector they replace the image's rows of the language model's input, after
an LLM layer they replace the hidden states the next layer reads. A stage may keep every token of an image it does
not act on (different layers for different image groups). A reactivating LLM stage (``Stage.reactivate``) also sees
the tokens earlier LLM stages dropped, and the ones it keeps come back at the next layer.
"""

from __future__ import annotations

import torch

from prunelab.common.reduction import Reduction, check_reduction
from prunelab.common.vlm_llm_layer import selector_rows
from prunelab.common.vlm_plan import ImageContext, Stage, VLMContext
from prunelab.common.vlm_prompt import rows_by_position

__all__ = ["run_llm", "run_projector", "run_stage", "run_tower"]


def run_stage(stage: Stage, ctx: VLMContext) -> list[Reduction]:
    """Ask one stage for its reductions; enforce the contract and the exact budget for each image.

    Per image: one row ``[1, K]`` into its ``N`` rows, or at a vision-encoder stage ``[tiles, K]`` (the budget
    applies to each tile)."""
    for i, img in enumerate(ctx.images):
        n = img.token_ids.shape[-1]
        img.budget = int(stage.budget(img)) if stage.budget is not None else n
        if not 1 <= img.budget <= n:
            raise ValueError(f"keep: budget {img.budget} for image {i} at stage {ctx.stage!r} must lie in "
                             f"[1, {n}] (its visual token count)")
    reds = list(stage.select(ctx))
    if len(reds) != len(ctx.images):
        raise ValueError(f"vlm_select returned {len(reds)} reductions for {len(ctx.images)} images")
    for i, (img, red) in enumerate(zip(ctx.images, reds)):
        if not isinstance(red, Reduction):
            raise TypeError(f"method: stage {stage.name or stage.where!r} must return one Reduction per image, got "
                            f"{type(red).__name__} for image {i}")
        rows = img.token_ids.shape[0] if img.token_ids.dim() == 2 else 1
        if red.keep.shape[0] != rows or red.valid is not None:
            raise ValueError(f"kept indices of image {i}: the VLM seam takes {rows} row(s) per image (one per "
                             f"tile at a vision stage) of equal length; got {tuple(red.keep.shape)}")
        check_reduction(red, img.token_ids.shape[-1], name=f"kept indices of image {i}")
        if red.keep.shape[1] != img.budget and (stage.exact or red.keep.shape[1] > img.budget):
            raise ValueError(f"kept indices of image {i}: {red.keep.shape[1]} kept, budget is {img.budget}")
    return reds


def _at(stages, where: str, layer=None):
    return [s for s in stages if s.where == where and s.layer == layer]


def run_tower(plan, family: str, history: list, layer: int, images: list[ImageContext]):
    """The plan's stages after encoder ``layer`` on ``images`` (per tile rows). Returns per image the kept rows
    ``[tiles, K]`` of the images' rows and their values ``[tiles, K, C]``; appends ``(name, kept ids)`` to
    ``history``."""
    local = [torch.arange(img.token_ids.shape[-1], device=img.token_ids.device).expand_as(img.token_ids)
             for img in images]
    values, ids = [img.embeds for img in images], [img.token_ids for img in images]
    for stage in _at(plan.stages, "vision", layer):
        views = [img.at(v, i) for img, v, i in zip(images, values, ids)]
        reds = run_stage(stage, VLMContext(family, "vision", views, len(views), layer=layer))
        values = [red.gather(v) for red, v in zip(reds, values)]
        local = [k.gather(-1, red.keep) for k, red in zip(local, reds)]
        ids = [i.gather(-1, red.keep) for i, red in zip(ids, reds)]
        history.append((stage.name or f"vision {layer}", ids))
    return list(zip(local, values))


def run_projector(plan, family: str, state, keeps: list[torch.Tensor], embeds: torch.Tensor,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """The plan's projector stages on the language model's input ``embeds`` [B, L, C]; ``keeps`` are the span
    tokens each image holds, ``valid`` [B, L] the prompt's non-padding slots. Returns the embeddings (merged rows
    written into a copy); sets ``state.kept``."""
    B = embeds.shape[0]
    positions = torch.arange(embeds.shape[1], device=embeds.device).expand(B, -1)
    if valid is not None:
        positions = torch.where(valid, positions, -1)
    for stage in _at(plan.stages, "projector"):
        images = [img.at(img.embeds[keep], keep) for img, keep in zip(state.images, keeps)]
        ctx = VLMContext(family, "projector", images, B, input_ids=state.input_ids, hidden=embeds, positions=positions)
        reds = run_stage(stage, ctx)
        for img, view, red in zip(state.images, images, reds):
            if red.merge is not None:
                merged = red.gather(view.embeds[None])[0]
                kept = view.token_ids[red.keep[0]]
                img.embeds[kept] = merged
                embeds = embeds.clone() if embeds is ctx.hidden else embeds  # the caller's tensor stays as it was
                embeds[img.span.sample, img.span.positions[kept]] = merged.to(embeds.dtype)
        keeps = [keep[red.keep[0]] for keep, red in zip(keeps, reds)]
        state.history.append((stage.name or "projector", keeps))
    state.kept = keeps
    return embeds


def _reactivating_view(img, kept, entry, prompt, out, row_of, b):
    """The image at a reactivating stage: every token that entered the language model (``entry``), held rows with
    their hidden states, the others with their input embeddings."""
    held = torch.isin(entry, kept)
    embeds = prompt.embeds[b, prompt.row_of[b, img.span.positions[entry]]].clone()
    embeds[held] = out[b, row_of[b, img.span.positions[entry[held]]]].to(embeds.dtype)
    view = img.at(embeds, entry)
    view.held = held
    return view


def run_llm(plan, family: str, state, K: int, hidden: torch.Tensor, index, valid: torch.Tensor, recorded: dict,
            image_token_id: int):
    """The plan's stages after LLM layer ``K`` on ``hidden`` [B, L_k] (rows ``index`` of the compacted prompt, or all
    of it); ``recorded[next_layer]``: the (query, key, value, scaling, valid) of layer K's attention (False) or of
    layer K + 1's projections on layer K's output (True), and ``recorded["previous"]`` of layer K - 1's attention,
    for the stages that read them.
    Returns the rows to keep [B, L_k], the hidden states (merged rows written into a copy) and the tokens that come
    back: per sample ``(prompt positions [R], values [R, C])`` or None."""
    prompt = state.prompt
    B = valid.shape[0]
    where = prompt.index if index is None else prompt.index.gather(1, index)  # prompt position of each row
    row_of = rows_by_position(where, valid, prompt.orig_len)
    keep_mask, keeps, out, back = valid.clone(), state.kept, hidden, [None] * B
    for stage in _at(plan.stages, "llm", K):
        attn, causal = recorded.get(stage.needs.next_layer), stage.needs.causal
        selectors = tuple(q for q in stage.needs.rows if q != "image_mean")
        probs = (selector_rows(selectors, attn, where, valid, state.input_ids, image_token_id, causal=causal)
                 if selectors else {})
        before = (selector_rows(selectors, recorded["previous"], where, valid, state.input_ids, image_token_id,
                                causal=causal) if stage.needs.previous else {})
        images = []
        for i, (img, kept) in enumerate(zip(state.images, keeps)):
            b = img.span.sample
            if stage.reactivate:
                images.append(_reactivating_view(img, kept, state.entry[i], prompt, out, row_of, b))
                continue
            r = row_of[b, img.span.positions[kept]]
            view = img.at(out[b, r], kept)
            view.rows, view.previous_rows = _image_rows(probs, b, r), _image_rows(before, b, r)
            if "image_mean" in stage.needs.rows:
                view.rows["image_mean"] = _image_mean(attn, b, r, causal)
            if stage.needs.llm_kv:
                view.kv = (attn[1][b][:, r], attn[2][b][:, r])
            images.append(view)
        ctx = VLMContext(family, "llm", images, B, layer=K, input_ids=state.input_ids, hidden=out,
                         positions=torch.where(valid, where, -1), kv=attn[1:3] if stage.needs.llm_kv else None)
        reds = run_stage(stage, ctx)
        for view, red in zip(images, reds):
            b, span = view.span.sample, view.span.positions
            held = view.held if view.held is not None else torch.ones_like(view.token_ids, dtype=torch.bool)
            kept = torch.zeros_like(held)
            kept[red.keep[0]] = True
            keep_mask[b, row_of[b, span[view.token_ids[held & ~kept]]]] = False
            values = red.gather(view.embeds[None])[0] if red.merge is not None or view.held is not None else None
            stays = held[red.keep[0]]  # kept slots the layer already holds
            if red.merge is not None:
                out = out.clone() if out is hidden else out
                out[b, row_of[b, span[view.token_ids[red.keep[0]][stays]]]] = values[stays].to(out.dtype)
            if view.held is not None and bool((~stays).any()):
                back[b] = _cat(back[b], span[view.token_ids[red.keep[0]][~stays]], values[~stays])
        keeps = [view.token_ids[red.keep[0]] for view, red in zip(images, reds)]
        state.history.append((stage.name or f"llm {K}", keeps))
    state.kept = keeps
    return keep_mask, out, back


def _image_rows(probs: dict, b: int, r: torch.Tensor) -> dict:
    """``{selector: [H, S, N]}``: the selected queries' rows of sample ``b`` over its rows ``r`` (one image's
    tokens); for ``"image"``, the image's own queries only."""
    rows = {q: p[b][:, torch.searchsorted(at[b], r)] if q == "image" else p[b] for q, (at, p) in probs.items()}
    return {q: p[:, :, r] for q, p in rows.items()}


def _image_mean(attn, b: int, rows: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """[n] the attention the image's tokens (``rows`` of sample ``b``, contiguous) receive from its own queries,
    averaged over heads and queries, each query's softmax over every key it sees (``causal``: the earlier ones)."""
    from prunelab.kernels.image_query_received import image_query_received

    query, key, _, scaling, valid = attn
    start, end = int(rows[0]), int(rows[-1]) + 1
    if end - start != rows.numel():
        raise RuntimeError("rows: an image's tokens are not contiguous at this layer")
    at = torch.tensor([start], device=query.device)
    return image_query_received(query[b:b + 1], key[b:b + 1], valid[b:b + 1], at, at + rows.numel(),
                                scale=scaling, causal=causal)[0]


def _cat(prev, positions, values):
    return (positions, values) if prev is None else (torch.cat([prev[0], positions]), torch.cat([prev[1], values]))
