"""The timm ViT seam: one adapter that installs any ViT token-pruning method into a timm ViT.

A method binds itself to the model (:class:`ViTPruner` returns a :class:`ViTPlan`): which blocks prune,
which attention statistics each of them needs (:class:`AttnRequest`), and how it selects. The adapter then

- swaps the attention forward of just those blocks for :func:`attention_with_stats`, which computes the
  same attention from the module's own layers and also returns the requested statistics (the full
  probabilities, the keys, or only the attention mass each key receives, through the fused kernel in
  ``prunelab.kernels.attention_received``); every other block keeps timm's fused SDPA path;
- registers a forward hook on each pruning block that asks the method for the kept indices and gathers
  the block's output.

Nothing upstream is copied or forked: the swapped forward is an instance attribute that ``remove()``
deletes, hooks are removed, and parameters are never touched, so removal restores the model bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from prunelab.common.flops import ViTDims
from prunelab.common.handle import Handle, UnsupportedModelError
from prunelab.common.reduction import Reduction, check_reduction
from prunelab.common.tokens import TokenLayout


@dataclass(frozen=True)
class AttnRequest:
    """Attention statistics a pruning block asks for.

    Attributes:
        probs: the softmax probabilities [B, H, N, N] (explicit softmax in that block only).
        keys: the keys [B, H, N, Dh] after timm's ``k_norm``.
        received: attention mass each key receives, summed over queries [B, H, N] (float32),
            through the fused kernel when ``probs`` is not also requested.
    """

    probs: bool = False
    keys: bool = False
    received: bool = False

    @property
    def any(self) -> bool:
        return self.probs or self.keys or self.received


@dataclass
class AttnStats:
    """What :func:`attention_with_stats` measured in one block; fields not requested stay ``None``."""

    probs: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    received: torch.Tensor | None = None


@dataclass
class ViTPlan:
    """A method bound to one model: which blocks prune, what each needs, and how it selects.

    Attributes:
        requests: pruning blocks (0-based; the block's output is pruned) and their statistics.
        select: ``select(block, x, stats) -> Reduction`` of the block's output ``x`` [B, N, C] (protected
            tokens kept; see :mod:`prunelab.common.reduction`).
        tokens_per_block: tokens entering each block, when the method's counts are fixed (for FLOPs).
    """

    requests: dict[int, AttnRequest]
    select: Callable[[int, torch.Tensor, AttnStats], Reduction]
    tokens_per_block: list[int] | None = None


@runtime_checkable
class ViTPruner(Protocol):
    """What a method implements to run on timm ViTs."""

    def vit_plan(self, dims: ViTDims, layout: TokenLayout) -> ViTPlan:
        """Bind the method to a model of these sizes; validates budgets so bad settings fail at apply time."""
        ...


class AttentionRecorder:
    """A :class:`ViTPruner` that keeps every token and records ``request``'s statistics at ``blocks``.

    For plots, analyses and tests: after a forward, ``stats[block]`` holds that block's :class:`AttnStats`.
    """

    def __init__(self, blocks, request: AttnRequest = AttnRequest(probs=True)):
        self.blocks, self.request = tuple(blocks), request
        self.stats: dict[int, AttnStats] = {}

    def vit_plan(self, dims: ViTDims, layout: TokenLayout) -> ViTPlan:
        def select(block: int, x: torch.Tensor, stats: AttnStats) -> Reduction:
            self.stats[block] = stats
            return Reduction.keep_all(x.shape[0], x.shape[1], x.device)

        return ViTPlan({b: self.request for b in self.blocks}, select)


@dataclass
class ViTPruneState:
    """Per-forward bookkeeping of an installed method (it lives on the handle, never on a module).

    Attributes:
        token_ids: [B, N_l] original positions of the tokens currently in the sequence.
        kept: for each pruning block of the last forward, ``(block, token_ids after pruning)``.
        stats: statistics produced by the current forward's attention, by block, until consumed.
        layout: where the protected tokens are in the current sequence.
    """

    token_ids: torch.Tensor | None = None
    layout: TokenLayout | None = None
    kept: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    stats: dict[int, AttnStats] = field(default_factory=dict)

    @property
    def tokens_per_block(self) -> list[int]:
        return [ids.shape[1] for _, ids in self.kept]


class ViTHandle(Handle):
    """A :class:`Handle` that also exposes what the last forward kept (``state.kept``), for plots and tests."""

    def __init__(self, model, method, undo, *, state: ViTPruneState, layout: TokenLayout, plan: ViTPlan):
        super().__init__(model, method, undo)
        self.state, self.layout, self.plan = state, layout, plan


def _timm_classes():
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    return VisionTransformer, Block, Attention


def is_timm_vit(model: object) -> bool:
    try:
        vit_cls, _, _ = _timm_classes()
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(model, vit_cls)


def vit_layout(model) -> TokenLayout:
    """The protected-token layout of a timm ViT, read from the model's own attributes."""
    class_positions = []
    if getattr(model, "cls_token", None) is not None:
        class_positions.append(0)
    if getattr(model, "dist_token", None) is not None:  # DeiT distilled: [CLS][DIST][patches]
        class_positions.append(len(class_positions))
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    return TokenLayout.prefix(int(model.num_prefix_tokens), tuple(class_positions), grid)


def _check_supported(model) -> None:
    _, block_cls, attn_cls = _timm_classes()
    for i, blk in enumerate(model.blocks):
        if type(blk) is not block_cls or type(blk.attn) is not attn_cls:
            raise UnsupportedModelError(
                f"model: block {i} is {type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}; "
                "the timm ViT adapter supports timm's Block with its standard Attention"
            )
    if getattr(model.patch_embed, "dynamic_img_size", False) or getattr(model, "dynamic_img_size", False):
        raise UnsupportedModelError("model: dynamic_img_size ViTs are not supported (the token count must be fixed)")


def attention_with_stats(attn, request: AttnRequest, sink: dict, block: int, x: torch.Tensor,
                         attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """timm ``Attention`` computed from the module's own layers, also storing ``request``'s statistics.

    Installed as ``functools.partial(attention_with_stats, attn, request, sink, block)`` on the modules
    of pruning blocks only. Same maths as timm's non-fused path.
    """
    if attn_mask is not None or is_causal:
        raise NotImplementedError("prunelab's ViT adapter does not support attention masks or causal ViTs")
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    stats = AttnStats(keys=k if request.keys else None)
    if request.probs:
        probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = attn.attn_drop(probs) @ v
        stats.probs = probs
        if request.received:
            stats.received = probs.float().sum(dim=-2)
    elif request.received:
        from prunelab.kernels.attention_received import attention_received

        out, stats.received = attention_received(q, k, v, scale=attn.scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    sink[block] = stats
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def install_vit(model, method) -> Handle:
    """Install ``method`` (a :class:`ViTPruner`) into a timm ViT; see ``prunelab.apply``."""
    if not isinstance(method, ViTPruner):
        raise TypeError(f"method: {type(method).__name__} has no timm ViT adapter (it needs vit_plan)")
    _check_supported(model)
    layout = vit_layout(model)
    dims = ViTDims.from_timm(model)
    depth = dims.depth
    plan = method.vit_plan(dims, layout)
    bad = [b for b in plan.requests if not 0 <= b < depth]
    if bad:
        raise ValueError(f"method: pruning blocks {bad} are outside the model's {depth} blocks")

    state = ViTPruneState()
    undo = []
    def reset(module, args):
        x = args[0]
        state.token_ids = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        state.layout = layout
        state.kept.clear()
        state.stats.clear()

    undo.append(model.blocks[0].register_forward_pre_hook(reset).remove)

    def prune(block, module, args, output):
        stats = state.stats.pop(block, AttnStats())
        red = plan.select(block, output, stats)
        if not isinstance(red, Reduction):
            raise TypeError(f"method: {type(method).__name__}'s select must return a Reduction, got "
                            f"{type(red).__name__}")
        check_reduction(red, output.shape[1], layout=state.layout, name=f"kept indices at block {block}")
        if red.valid is not None:
            raise ValueError(f"kept indices at block {block}: a ViT batch must keep one count per sample")
        state.token_ids = red.gather(state.token_ids)
        state.layout = red.layout_after(state.layout)
        state.kept.append((block, state.token_ids))
        return red.gather(output)

    for block, request in sorted(plan.requests.items()):
        blk = model.blocks[block]
        if request.any:
            if "forward" in vars(blk.attn):
                raise RuntimeError(f"model: block {block}'s attention forward is already overridden")
            blk.attn.forward = functools.partial(attention_with_stats, blk.attn, request, state.stats, block)
            undo.append(functools.partial(delattr, blk.attn, "forward"))
        undo.append(blk.register_forward_hook(functools.partial(prune, block)).remove)

    def remove():
        for fn in reversed(undo):
            fn()

    return ViTHandle(model, method, remove, state=state, layout=layout, plan=plan)
