"""What a VLM method asks of the stage engine (``prunelab.common.vlm``): a plan of stages.

A :class:`VLMPlan` lists :class:`Stage` s. Each stage sits at one point of the forward:

- ``"vision"`` with ``layer=l``: after vision-encoder layer ``l`` (0-based), on each image's remaining patches per
  tile (Qwen2.5-VL: merge units); the later encoder layers run on the kept ones only (see the family adapters);
- ``"projector"``: after the projector, on the projected visual tokens (the LLM's layer-0 input);
- ``"llm"`` with ``layer=K``: after language-model layer ``K`` (0-based), on the image tokens still in the prompt;
  ``layer=-1``: before layer 0, on the language model's input rows. Unlike a projector stage's, the tokens it drops
  stay in the prompt, so a later reactivating stage can bring them back (LVLM_CSP's clustering, then scattering).

and names what it reads (:class:`Needs`): vision-encoder statistics at given encoder layers (hidden states, the
attention each patch receives, the CLS query's attention row; raw, per head), and at an LLM stage the attention
rows of chosen queries at that layer, computed beside SDPA. The engine calls ``stage.select(ctx)`` with a
:class:`VLMContext` and applies one :class:`~prunelab.common.reduction.Reduction` per image (per tile inside the
tower), merges included (``vlm_run.py``); ``stage.budget(image)`` (optional) is the exact count the engine
enforces. The context also carries every row of the prompt at that point (``hidden``, text included) and the
prompt. Stages run in forward order; two
methods' plans compose (:meth:`VLMPlan.then`): at the same point, the first method's stage runs first and the
second sees what it kept.

How a method object becomes a plan (``vlm_plan()``, the first seam's ``vlm_select``, two methods composed) is in
``vlm_methods.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from prunelab.common.validate import check_bool, check_choice, check_int, check_ints
from prunelab.common.vlm_layout import ImageSpan

__all__ = ["QUERIES", "ImageContext", "Needs", "Stage", "VLMContext", "VLMPlan"]

WHERE = ("vision", "projector", "llm")
QUERIES = ("last", "text_mean", "image", "image_mean")
"""Query selectors of LLM attention rows: ``last``, the prompt's last token (the last instruction token at
prefill); ``text_mean``, the mean of the rows of every text token after the sample's first image; ``image``, the
rows of the image's own queries over its tokens (``[H, n, n]``); ``image_mean``, those rows averaged over heads and
queries (``[n]``), computed by ``prunelab.kernels.image_query_received`` without the ``[n, L]`` block. A marked token
is selected by its id: an ``int`` (e.g. LISA's ``[SEG]``) selects every position holding it."""


@dataclass
class ImageContext:
    """One image as a method sees it at one stage.

    Attributes:
        span: where the image is (:class:`~prunelab.common.vlm_layout.ImageSpan`), incl. grids and NeXT newlines;
            ``None`` at a vision-encoder stage (the tower runs before the prompt is read).
        embeds: [N, C] the image's visual tokens at this stage (the projected embeddings after the projector, the
            hidden states of its remaining tokens after LLM layer K). At a vision-encoder stage, per tile:
            ``[tiles, n, C]`` patch hidden states without the CLS (CLIP towers; NeXT: the base tile first, then
            the crops), ``[1, n, m*m*C]`` merge units in raster order (Qwen2.5-VL).
        token_ids: [N] which of the span's original tokens these rows are (arange at the first stage); at a
            vision-encoder stage ``[tiles, n]``, patch indices within each tile (Qwen2.5-VL: merge units).
        budget: tokens the stage must keep (from its ``budget``; validated to lie in [1, N]), per tile inside the
            tower.
        received / cls_row / hidden / queries / keys / values: vision statistics by encoder layer, raw and per head
            (layouts in ``vlm_vision``), of all the image's tokens (index them with ``token_ids``); rows a
            vision-encoder stage dropped before that layer read 0.
        rows: at an LLM stage, ``{selector: [H, S, N]}`` attention rows of the selected queries over these rows.
        previous_rows: with ``Needs.previous``, the same selectors' rows at layer ``K - 1`` over the same rows.
        kv: at an LLM stage with ``Needs.llm_kv``, the layer's keys (after RoPE) and values of these rows, per
            key/value head: ``([Hkv, N, d], [Hkv, N, d])``.
        held: at a reactivating stage (``Stage.reactivate``), bool [N]: True for the rows the layer still holds.
            The rows not held are tokens an earlier LLM stage dropped; ``embeds`` gives them their language-model
            input embeddings, and a stage may write other values into those rows before it returns: a token it
            keeps re-enters the next layer with them.
    """

    span: ImageSpan | None
    embeds: torch.Tensor
    token_ids: torch.Tensor
    budget: int = 0
    received: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    cls_row: dict[int, torch.Tensor] = field(default_factory=dict)
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    rows: dict = field(default_factory=dict)
    previous_rows: dict = field(default_factory=dict)
    kv: tuple[torch.Tensor, torch.Tensor] | None = None
    held: torch.Tensor | None = None

    def at(self, embeds: torch.Tensor, token_ids: torch.Tensor) -> ImageContext:
        """This image at a later stage: its remaining rows ``embeds`` and their ``token_ids``, same statistics."""
        return ImageContext(self.span, embeds, token_ids, received=self.received, hidden=self.hidden,
                            cls_row=self.cls_row, queries=self.queries, keys=self.keys, values=self.values)


@dataclass
class VLMContext:
    """All images of one forward at one stage: ``stage`` is "vision" (after encoder ``layer``; ``batch_size`` is then
    the number of images and the prompt fields are None), "projector" or "llm" (after LLM ``layer``).

    Attributes:
        input_ids: [B, L] the prompt (for methods that read the text).
        hidden: [B, L_k, C] every row of the prompt at this point (the language model's input embeddings after the
            projector, the hidden states after LLM layer K): text rows included.
        positions: [B, L_k] the prompt position of each row of ``hidden`` (-1: padding).
        kv: at an LLM stage with ``Needs.llm_kv``, the layer's keys (after RoPE) and values of every row of
            ``hidden``: ``([B, Hkv, L_k, d], [B, Hkv, L_k, d])``.
    """

    family: str
    stage: str
    images: list[ImageContext]
    batch_size: int
    layer: int | None = None
    input_ids: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    kv: tuple[torch.Tensor, torch.Tensor] | None = None



@dataclass(frozen=True)
class Needs:
    """Statistics a stage reads.

    Attributes:
        vision_layers: vision-encoder layers (0-based; negative counts from the end) whose statistics it reads.
        received: per layer, each patch's attention received, per head and averaged over the queries
            (``[tiles, H, P]`` for CLIP towers, ``[H, N, m*m]`` per merge unit for Qwen2.5-VL).
        cls_row: per layer, the CLS query's attention row over the patches, per head (CLIP towers only).
        hidden: per layer, the encoder's hidden states of the image's patches.
        queries / keys / values: per layer, the encoder attention's per-head vectors of every token (value norms,
            key similarities, a global query).
        rows: at an LLM stage, attention rows of these query selectors (see :data:`QUERIES`) at its layer, per
            head, restricted to each image's token columns (``[H, S, N]``, S queries per selector).
        llm_kv: at an LLM stage, its layer's keys and values of the image's rows (:attr:`ImageContext.kv`).
        causal: the mask of the attention rows: the decoder's causal mask (default), or False for every valid key
            (an ablation; the layer itself still runs causally).
        next_layer: the rows, keys and values of an LLM stage after layer ``K`` come from layer ``K + 1``'s
            attention projections applied to layer ``K``'s output (its input norm, q/k/v projections and RoPE at
            the rows' positions), i.e. from the layer the drop precedes, computed beside the forward; default:
            layer ``K``'s own attention.
    """

    vision_layers: tuple[int, ...] = ()
    received: bool = False
    cls_row: bool = False
    hidden: bool = False
    rows: tuple[str | int, ...] = ()
    queries: bool = False
    keys: bool = False
    values: bool = False
    llm_kv: bool = False
    causal: bool = True
    next_layer: bool = False
    previous: bool = False

    def __post_init__(self):
        object.__setattr__(self, "vision_layers", check_ints(self.vision_layers, "vision_layers"))
        for name in ("causal", "next_layer", "previous"):
            check_bool(getattr(self, name), name)
        for q in self.rows:
            if not isinstance(q, int) or isinstance(q, bool):
                check_choice(q, "rows", QUERIES)

    @property
    def vectors(self) -> tuple[str, ...]:
        """The encoder attention's per-head vectors asked for."""
        return tuple(v for v in ("queries", "keys", "values") if getattr(self, v))

    def merged(self, other: Needs) -> Needs:
        flags = {f: getattr(self, f) or getattr(other, f)
                 for f in ("received", "cls_row", "hidden", "queries", "keys", "values", "llm_kv")}
        return Needs(tuple(sorted(set(self.vision_layers) | set(other.vision_layers))),
                     rows=tuple(dict.fromkeys((*self.rows, *other.rows))), causal=self.causal and other.causal,
                     next_layer=self.next_layer or other.next_layer, previous=self.previous or other.previous,
                     **flags)


@dataclass(frozen=True)
class Stage:
    """One pruning point of a plan (see the module docstring).

    ``exact``: the count ``budget`` gives is enforced exactly; ``False`` lets the stage keep any count in [1, budget]
    (data-dependent counts, e.g. FlowCut's entropy rule).

    ``reactivate`` (LLM stages only): the stage chooses among every token of the image that entered the language
    model, also those an earlier LLM stage dropped (:attr:`ImageContext.held`); the ones it keeps come back at
    the next layer, whose cache then holds them (the layers in between never saw them).

    ``renumber`` (LLM stages only): the rows after the stage take contiguous positions over the rows kept (each row
    the rotary embedding of its rank), and decoding continues right after the last one, so every later position
    moves down by the tokens dropped so far; default: kept rows keep their positions. Needs 1-D rotary positions
    (LLaVA-1.5, LLaVA-NeXT), not Qwen2.5-VL's M-RoPE ids.

    ``patches`` (vision stages only; every vision stage of a plan agrees): on Qwen2.5-VL the stage sees the tower's
    patches (ids ``unit * m * m + p`` in raster order), not its merge units, and keeps any of them. The merger then
    joins every ``m * m`` consecutive kept patches (raster order) into one token, however far apart they lie, and an
    image's tokens fill the first slots of its span, with those slots' M-RoPE ids (the official FlowCut Qwen code
    does both). An image must keep a multiple of ``m * m`` patches when the tower is done. CLIP towers' tokens are
    patches already: no effect there.
    """

    where: str
    select: Callable[[Any], Sequence[Any]]
    layer: int | None = None
    needs: Needs = field(default_factory=Needs)
    budget: Callable[[Any], int] | None = None
    name: str = ""
    reactivate: bool = False
    exact: bool = True
    renumber: bool = False
    patches: bool = False

    def __post_init__(self):
        check_choice(self.where, "where", WHERE)
        check_bool(self.patches, "patches")
        if self.patches and self.where != "vision":
            raise ValueError(f"patches: a 'vision' stage selects patches, not a {self.where!r} stage")
        if self.renumber and self.where != "llm":
            raise ValueError(f"renumber: positions are renumbered after an 'llm' stage, not a {self.where!r} stage")
        if self.reactivate and (self.where != "llm" or self.needs.rows or self.needs.llm_kv):
            raise ValueError("reactivate: tokens come back at an 'llm' stage that reads no attention rows (the "
                             "dropped tokens have no keys at that layer)")
        if self.where in ("vision", "llm"):
            object.__setattr__(self, "layer", check_int(self.layer, "layer", low=-1 if self.where == "llm" else 0))
            if self.layer == -1 and (self.needs.rows or self.needs.llm_kv or self.needs.next_layer or self.reactivate
                                     or self.renumber):
                raise ValueError("layer: a stage before LLM layer 0 (layer=-1) reads no attention of the language "
                                 "model, brings nothing back and keeps positions")
        elif self.layer is not None:
            raise ValueError(f"layer: a {self.where!r} stage takes no layer, got {self.layer}")
        if (self.needs.rows or self.needs.llm_kv) and self.where != "llm":
            raise ValueError("rows: attention rows, keys and values of the LLM are read at an 'llm' stage")
        if self.needs.previous and (not self.needs.rows or self.needs.next_layer or self.where != "llm"
                                    or self.layer < 1):
            raise ValueError("previous: the rows of layer K - 1 are read at an 'llm' stage after a layer K >= 1 that "
                             "reads rows of its own layer (not next_layer)")

    @property
    def order(self) -> tuple[int, int]:
        return WHERE.index(self.where), -1 if self.layer is None else self.layer


@dataclass(frozen=True)
class VLMPlan:
    """The stages of one or more methods, in forward order."""

    stages: tuple[Stage, ...]

    def __post_init__(self):
        if not self.stages:
            raise ValueError("stages: a plan needs at least one stage")
        object.__setattr__(self, "stages", tuple(sorted(self.stages, key=lambda s: s.order)))  # stable
        for s in self.stages:
            if s.reactivate and sum(t.order == s.order for t in self.stages) > 1:
                raise ValueError(f"reactivate: a reactivating stage is the only stage after LLM layer {s.layer}")
        for s in self.stages:
            if s.needs.previous and any(t.where == "llm" and t.layer == s.layer - 1 for t in self.stages):
                raise ValueError(f"previous: the stage after LLM layer {s.layer} reads layer {s.layer - 1}'s rows over "
                                 f"its own rows, so no stage may run after layer {s.layer - 1}")
        if len({s.patches for s in self.stages if s.where == "vision"}) > 1:
            raise ValueError("patches: the vision stages of a plan all select patches or all select the tower's tokens")
        if any(s.renumber for s in self.stages) and any(s.reactivate for s in self.stages):
            raise ValueError("renumber: positions are not renumbered in a plan whose dropped tokens come back "
                             "(reactivate): a returning token has no place in the renumbered order")

    def then(self, other: VLMPlan) -> VLMPlan:
        """Both plans; at the same point this plan's stage runs first."""
        return VLMPlan(self.stages + other.stages)

    @property
    def needs(self) -> Needs:
        out = Needs()
        for s in self.stages:
            out = out.merged(s.needs)
        return out

    @property
    def patches(self) -> bool:
        """The plan's vision stages select patches (``Stage.patches``)."""
        return any(s.patches for s in self.stages)

    @property
    def llm_layers(self) -> tuple[int, ...]:
        return self.layers("llm")

    def layers(self, where: str) -> tuple[int, ...]:
        """The layers with a stage at ``where`` ("vision" or "llm"), ascending."""
        return tuple(sorted({s.layer for s in self.stages if s.where == where}))
