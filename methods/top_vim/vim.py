"""Vision Mamba (Vim) in plain PyTorch: the dense backbone ToP-ViM prunes.

Paper: Zhan et al., "Exploring Token Pruning in Vision State Space Models", NeurIPS 2024 (arXiv 2409.18962); the
backbone is Vim (Zhu et al., ICML 2024). Compared against hustvl/Vim at commit dd0358a: ``vim/models_mamba.py``
(``VisionMamba``, ``Block``, the ``*_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2`` configs) and
``mamba-1p1p1/mamba_ssm/modules/mamba_simple.py`` (``Mamba`` with ``bimamba_type="v2"``, the fast path the released
models run). Parameter names are hustvl's, so its checkpoints load by name (:mod:`.checkpoint`).

The model, in hustvl's order:

1. ``patch_embed.proj`` (Conv2d) gives M patch tokens in raster order; ``cls_token`` is inserted at index M // 2
   (the "middle CLS token"), then ``pos_embed`` [1, M + 1, C] is added.
2. Each ``VimBlock`` is "Add -> Norm -> Mixer": ``residual += hidden`` (the first block starts the residual from its
   input), ``hidden = mixer(norm(residual))``; the residual is kept in float32 (``residual_in_fp32``).
3. The last hidden states are added to the residual once more and normalised by ``norm_f``; ``head`` reads the token at
   the CLS index. hustvl returns the CLS token before ever looking at ``final_pool_type``, so the "final_pool_mean" in
   the released configs' names is dead: the head sees the middle CLS token, never a mean.

``VimMixer`` is Mamba "v2": ``in_proj`` makes ``x`` and ``z``; the forward branch runs causal depthwise conv1d + SiLU,
``x_proj`` -> (dt, B, C), ``dt_proj`` and the selective scan with ``D`` and the ``silu(z)`` gate; the backward branch
is the same with its own ``*_b`` weights on the whole ``xz`` flipped along L; the output is
``out_proj((y_fwd + flip(y_bwd)) / 2)``. On request it returns both gated scan outputs before ``out_proj``
(:class:`SSMOutputs`), which ToP-ViM's importance is computed from, and it passes a keep mask to both scans (ToP-ViM's
"decay_only" alignment); ``VisionMamba.prunelab_seam`` is ``prunelab.apply``'s entry (:mod:`.seam`).

What differs from hustvl: no fused kernels (the unfused equivalent: the add and the norm are computed in float32 and
the normalised output is cast back to the input dtype, as the fused Triton kernel does); no RoPE, double or random CLS,
no ``if_bidirectional`` layer pairing, no ``flip_img_sequences_ratio``, no ``init_layer_scale`` and no inference cache
(none is used by the released Vim-T/S configs); ``drop_path_rate`` defaults to 0 (ToP-ViM fine-tunes with 0);
initialisation follows hustvl's scheme (including its zero ``dt_proj_b.bias``, which hustvl never gives the special dt
initialisation) but not its random stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, lecun_normal_, trunc_normal_

from prunelab.common.handle import Handle
from prunelab.methods.top_vim.scan import IMPLS, selective_scan_ref


# -- the scan outputs ToP-ViM scores ---------------------------------------------------------------------------------
def unflip(y_bwd_flipped: torch.Tensor) -> torch.Tensor:
    """The backward branch's output [B, d_inner, L], computed on the flipped sequence, back in token order."""
    return y_bwd_flipped.flip(-1)


class SSMOutputs(NamedTuple):
    """A mixer's two gated scan outputs ``(y + D u) * silu(z)``, before they are averaged and projected by out_proj.

    Attributes:
        fwd: [B, d_inner, L] the forward branch, index t is token t.
        bwd_flipped: [B, d_inner, L] the backward branch as computed: index i is token L - 1 - i.
    """

    fwd: torch.Tensor
    bwd_flipped: torch.Tensor

    def bwd(self) -> torch.Tensor:
        """The backward branch in token order, [B, d_inner, L]."""
        return unflip(self.bwd_flipped)


# -- norms ------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """mamba-ssm's RMSNorm (weight only, no bias): ``x / sqrt(mean(x^2) + eps) * weight``, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()


def _norm_fp32(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
    return norm(x)


def add_norm(hidden: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module,
             residual_in_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """mamba-ssm's fused ``add + norm`` (``prenorm=True``), unfused: returns ``(norm(residual'), residual')``.

    Args:
        hidden: [B, L, C] the previous mixer's output (or the embedded tokens for the first block).
        residual: [B, L, C] the residual stream, None before the first block (it then starts from ``hidden``).
        norm: :class:`RMSNorm` or ``nn.LayerNorm``.
        residual_in_fp32: start the residual stream in float32 (it then stays float32).
    """
    residual = hidden if residual is None else residual + hidden
    if residual_in_fp32:
        residual = residual.float()
    return _norm_fp32(norm, residual).to(hidden.dtype), residual


def init_dt_proj(dt_proj: nn.Linear, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> None:
    """mamba-ssm's Δ initialisation: weight uniform in +-rank^-1/2, bias softplus^-1 of a log-uniform step in
    [dt_min, dt_max] (at least ``floor``)."""
    std = dt_proj.in_features ** -0.5
    nn.init.uniform_(dt_proj.weight, -std, std)
    d = dt_proj.out_features
    dt = torch.exp(torch.rand(d) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    with torch.no_grad():
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)


# -- the mixer -------------------------------------------------------------------------------------------------------
def gapped_conv(conv: nn.Conv1d, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A causal depthwise ``conv`` over a packed sequence: x [B, D, K] holds the tokens at original positions
    ``positions`` [B, K] (strictly increasing); the slots in between hold 0. Equals the full-length causal conv of the
    sequence with zeros in the gaps, read at the kept positions; -> [B, D, K]."""
    width = conv.kernel_size[0]
    w = conv.weight[:, 0, :]  # [D, width]: tap j multiplies x at t - (width - 1 - j)
    out = conv.bias[None, :, None].expand_as(x) if conv.bias is not None else torch.zeros_like(x)
    for i in range(min(width, x.shape[-1])):  # the packed neighbour i tokens back, if it lies within the window
        offset = positions[:, i:] - positions[:, :positions.shape[1] - i]  # [B, K - i], >= i
        tap = w[:, (width - 1 - offset).clamp(min=0)].permute(1, 0, 2)  # [B, D, K - i]
        term = torch.where((offset < width)[:, None], tap * x[..., :x.shape[-1] - i], 0.0)
        out = out + F.pad(term, (i, 0))
    return out


class VimMixer(nn.Module):
    """Vim's bidirectional Mamba mixer (mamba-ssm ``Mamba`` with ``bimamba_type="v2"``); [B, L, C] -> [B, L, C].

    Args:
        d_model: C, the model width.
        d_state: N, the SSM state size.
        d_conv: the causal depthwise conv kernel size.
        expand: ``d_inner = expand * d_model``.
        dt_rank: the rank of the dt projection; None is ``ceil(d_model / 16)``.
        if_divide_out: average the two directions instead of summing them.
        scan_impl: ``"loop"`` or ``"parallel"`` (:func:`~prunelab.methods.top_vim.scan.selective_scan_ref`).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None,
                 if_divide_out: bool = True, scan_impl: str = "parallel", dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self.if_divide_out = if_divide_out
        self.scan_impl = scan_impl
        d_inner = self.d_inner

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        for suffix in ("", "_b"):
            conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
            self.add_module(f"conv1d{suffix}", conv)
            self.add_module(f"x_proj{suffix}", nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False))
            self.add_module(f"dt_proj{suffix}", nn.Linear(self.dt_rank, d_inner, bias=True))
            # S4D-real initialisation A = -(1, ..., N) per channel, kept as log(-A) in float32
            a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)
            self.register_parameter(f"A{suffix}_log", nn.Parameter(a_log))
            self.register_parameter(f"D{suffix}", nn.Parameter(torch.ones(d_inner)))

        # mamba_simple.py's dt initialisation, forward branch only (hustvl leaves dt_proj_b at nn.Linear's default)
        init_dt_proj(self.dt_proj, dt_min, dt_max, dt_init_floor)
        self.dt_proj.bias._no_reinit = True

    def _branch(self, xz: torch.Tensor, suffix: str, keep: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """One scan direction on xz [B, 2 d_inner, L] with the weights named ``*{suffix}``; -> [B, d_inner, L].

        ``keep`` [B, L] bool (in this branch's frame) is the scan's decay-only mask, None for the dense scan.
        ``positions`` [B, L] (ascending, in this branch's frame) places a packed sequence on its original slots: the
        conv reads only the tokens present (an absent slot holds 0) and each gap decays the scan's state with the
        step ``softplus(dt_proj.bias)`` and no input (:func:`selective_scan_ref`'s ``gaps``; on CUDA without
        autograd, the Triton kernel ``prunelab.kernels.gapped_scan``).
        """
        conv, x_proj, dt_proj = (getattr(self, f"{name}{suffix}") for name in ("conv1d", "x_proj", "dt_proj"))
        length = xz.shape[-1]
        x, z = xz.chunk(2, dim=1)
        # padding d_conv - 1 on both sides; keeping the first L outputs makes the conv causal
        x = F.silu(conv(x)[..., :length] if positions is None else gapped_conv(conv, x, positions))
        dt, B, C = torch.split(x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # dt_proj's bias enters the scan as delta_bias
        A = -torch.exp(getattr(self, f"A{suffix}_log").float())
        D = getattr(self, f"D{suffix}").float()
        gaps = gap_delta = None
        if positions is not None:
            gap_delta = F.softplus(dt_proj.bias.float())
            if x.is_cuda and not torch.is_grad_enabled():
                from prunelab.kernels.gapped_scan import gapped_scan  # the Triton kernel: K steps, gaps folded in

                return gapped_scan(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), positions, gap_delta, D=D,
                                   z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True)
            gaps = torch.cat([torch.zeros_like(positions[:, :1]),  # before the first kept token: a zero state
                              positions[:, 1:] - positions[:, :-1] - 1], dim=1)
        return selective_scan_ref(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), D, z=z,
                                  delta_bias=dt_proj.bias.float(), delta_softplus=True, keep=keep,
                                  impl=self.scan_impl, gaps=gaps, gap_delta=gap_delta)

    def forward(self, hidden_states: torch.Tensor, return_ssm: bool = False, keep: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, SSMOutputs]:
        """Mix [B, L, C] -> [B, L, C]; with ``return_ssm``, also the two scan outputs (:class:`SSMOutputs`).

        ``keep`` [B, L] bool, in token order, is ToP-ViM's "decay_only" hook: both scans run over every slot, but a
        slot with ``keep == False`` only decays the state and outputs 0 (:func:`selective_scan_ref`); the backward
        branch gets the mask flipped with its sequence. ``positions`` [B, L] int64, strictly increasing, is the
        "gapped" hook: the L tokens are the survivors of a longer sequence at those original positions, and every
        missing slot decays both scans' states with step ``softplus(dt_proj.bias)``. None (the default) for both is
        the dense mixer.
        """
        if keep is not None and positions is not None:
            raise ValueError("positions: a packed sequence has no pruned slots to mask (keep must be None)")
        xz = self.in_proj(hidden_states).transpose(1, 2)
        y_fwd = self._branch(xz, "", keep, positions)
        # the backward branch flips x and the gate z together and scans the flipped sequence forward
        flipped = None if positions is None else (positions[:, -1:] - positions).flip(-1)
        y_bwd_flipped = self._branch(xz.flip(-1), "_b", None if keep is None else keep.flip(-1), flipped)
        y = y_fwd + unflip(y_bwd_flipped)
        if self.if_divide_out:
            y = y / 2
        out = self.out_proj(y.transpose(1, 2))
        return (out, SSMOutputs(y_fwd, y_bwd_flipped)) if return_ssm else out


# -- block and model -------------------------------------------------------------------------------------------------
class VimBlock(nn.Module):
    """hustvl's ``Block``: Add -> Norm -> Mixer, returning ``(hidden_states, residual)``.

    Args:
        mixer: the block's :class:`VimMixer`.
        norm: :class:`RMSNorm` or ``nn.LayerNorm`` of width C.
        residual_in_fp32: start the residual stream in float32.
        drop_path: stochastic depth on the incoming hidden states (training only).
    """

    def __init__(self, mixer: VimMixer, norm: nn.Module, residual_in_fp32: bool = True,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.mixer = mixer
        self.norm = norm
        self.residual_in_fp32 = residual_in_fp32
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None, return_ssm: bool = False,
                keep: torch.Tensor | None = None, positions: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, SSMOutputs]:
        """[B, L, C] hidden states and residual (None for the first block) -> the new pair, plus the mixer's
        :class:`SSMOutputs` when ``return_ssm``; ``keep`` and ``positions`` go to the mixer
        (:meth:`VimMixer.forward`)."""
        if residual is not None:
            hidden_states = self.drop_path(hidden_states)
        normed, residual = add_norm(hidden_states, residual, self.norm, self.residual_in_fp32)
        if return_ssm:
            out, ssm = self.mixer(normed, return_ssm=True, keep=keep, positions=positions)
            return out, residual, ssm
        return self.mixer(normed, keep=keep, positions=positions), residual


def check_config_ints(cfg, minimum: dict[str, int], optional: tuple[str, ...] = ()) -> tuple[int, int]:
    """Validate a frozen backbone config in place: ``img_size`` becomes (H, W), each field of ``minimum`` must be an
    int at least its value (those in ``optional`` may be None); returns (H, W)."""
    size = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else tuple(cfg.img_size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"img_size: expected a positive int or (H, W), got {cfg.img_size!r}")
    object.__setattr__(cfg, "img_size", size)
    for name, low in minimum.items():
        value = getattr(cfg, name)
        if value is None and name in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return size


@dataclass(frozen=True)
class VimConfig:
    """VisionMamba's hyperparameters; the defaults are hustvl's Vim-T (``vim_tiny_patch16_224_bimambav2_...``)."""

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    stride: int | None = None  # None: patch_size (the released configs; hustvl's "stride8" variants use 8)
    in_chans: int = 3
    embed_dim: int = 192
    depth: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(embed_dim / 16)
    num_classes: int = 1000  # 0: no head, forward returns the CLS feature
    rms_norm: bool = True
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    if_divide_out: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    scan_impl: str = "parallel"

    def __post_init__(self) -> None:
        size = check_config_ints(self, {"patch_size": 1, "stride": 1, "in_chans": 1, "embed_dim": 1, "depth": 1,
                                        "d_state": 1, "d_conv": 1, "expand": 1, "dt_rank": 1, "num_classes": 0},
                                 optional=("stride", "dt_rank"))
        if self.patch_size > min(size):
            raise ValueError(f"patch_size: {self.patch_size} is larger than img_size {size}")
        for name in ("rms_norm", "residual_in_fp32", "if_divide_out"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if not self.norm_epsilon > 0:
            raise ValueError(f"norm_epsilon: expected > 0, got {self.norm_epsilon!r}")
        for name in ("drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: expected a rate in [0, 1), got {getattr(self, name)!r}")
        if self.scan_impl not in IMPLS:
            raise ValueError(f"scan_impl: expected one of {IMPLS}, got {self.scan_impl!r}")


@dataclass(frozen=True)
class VimLayout:
    """Where things sit in a Vim token sequence of ``seq_len = M + 1`` tokens.

    Attributes:
        grid: (Gh, Gw) the patch grid; patches are in raster order, M = Gh * Gw.
        cls_index: M // 2, the middle CLS token's index (patches ``0 .. M//2 - 1`` before it, the rest after).
    """

    grid: tuple[int, int]
    cls_index: int

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def seq_len(self) -> int:
        return self.num_patches + 1

    def patch_slots(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[M] int64: the sequence index of each patch, in raster order (CLS's index skipped)."""
        m = torch.arange(self.num_patches, device=device)
        return m + (m >= self.cls_index).long()


class PatchEmbed(nn.Module):
    """hustvl's ``PatchEmbed``: a Conv2d, flattened to [B, M, C] in raster order (no norm)."""

    def __init__(self, cfg: VimConfig) -> None:
        super().__init__()
        stride = cfg.stride or cfg.patch_size
        self.img_size = cfg.img_size
        self.grid_size = tuple((s - cfg.patch_size) // stride + 1 for s in cfg.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[-2:]) != self.img_size or x.shape[1] != self.proj.in_channels:
            raise ValueError(f"x: expected [B, {self.proj.in_channels}, {self.img_size[0]}, {self.img_size[1]}], "
                             f"got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionMamba(nn.Module):
    """hustvl's ``VisionMamba`` for the released middle-CLS "bimambav2" configs; [B, 3, H, W] -> [B, classes].

    Args:
        cfg: the hyperparameters; :func:`vim_tiny` / :func:`vim_small` give the released ones.
    """

    def __init__(self, cfg: VimConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or VimConfig()
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()

        def norm() -> nn.Module:
            return RMSNorm(dim, cfg.norm_epsilon) if cfg.rms_norm else nn.LayerNorm(dim, eps=cfg.norm_epsilon)

        # hustvl's schedule: block i gets [0] + linspace(0, rate, depth) at i, the final add gets the full rate
        dpr = [0.0] + [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.layers = nn.ModuleList(
            VimBlock(VimMixer(dim, cfg.d_state, cfg.d_conv, cfg.expand, cfg.dt_rank, cfg.if_divide_out, cfg.scan_impl),
                     norm(), cfg.residual_in_fp32, dpr[i])
            for i in range(cfg.depth))
        self.norm_f = norm()
        self.drop_path = DropPath(cfg.drop_path_rate) if cfg.drop_path_rate > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """hustvl's initialisation scheme (``segm_init_weights``, trunc-normal tokens, then ``_init_weights``)."""
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit",
                                                                                         False):
                nn.init.zeros_(module.bias)
        for layer in self.layers:
            # GPT-2 style: out_proj scaled by 1 / sqrt(depth) so the residual sum keeps its variance
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(self.cfg.depth)

    @property
    def layout(self) -> VimLayout:
        """The patch grid and the middle CLS index of this model's token sequence."""
        return VimLayout(grid=tuple(self.patch_embed.grid_size), cls_index=self.patch_embed.num_patches // 2)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, in_chans, H, W] -> tokens [B, M + 1, C]: patches, CLS inserted at M // 2, plus pos_embed."""
        patches = self.patch_embed(x)
        mid = patches.shape[1] // 2
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        tokens = torch.cat([patches[:, :mid], cls, patches[:, mid:]], dim=1)
        return self.pos_drop(tokens + self.pos_embed)

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The last ``residual + hidden`` and ``norm_f`` (hustvl's fused ``prenorm=False`` call); -> [B, L, C]."""
        normed, _ = add_norm(self.drop_path(hidden), residual, self.norm_f, self.cfg.residual_in_fp32)
        return normed

    def forward_tokens(self, x: torch.Tensor,
                       return_ssm: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[SSMOutputs]]:
        """All tokens after ``norm_f``, [B, M + 1, C]; with ``return_ssm`` also each layer's :class:`SSMOutputs`."""
        hidden, residual, ssm = self.embed(x), None, []
        for layer in self.layers:
            if return_ssm:
                hidden, residual, out = layer(hidden, residual, return_ssm=True)
                ssm.append(out)
            else:
                hidden, residual = layer(hidden, residual)
        tokens = self.final_norm(hidden, residual)
        return (tokens, ssm) if return_ssm else tokens

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS token after ``norm_f``, [B, C] (hustvl's ``forward_features`` for a middle CLS token)."""
        return self.forward_tokens(x)[:, self.layout.cls_index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] (the CLS feature when ``num_classes == 0``)."""
        return self.head(self.forward_features(x))

    def prunelab_seam(self, method) -> Handle:
        """``prunelab.apply``'s entry: install ToP-ViM (:mod:`prunelab.methods.top_vim.seam`)."""
        from prunelab.methods.top_vim.seam import install

        return install(self, method)


def _config(embed_dim: int, overrides: dict) -> VimConfig:
    known = {f.name for f in fields(VimConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{unknown[0]}: not a VimConfig field (known: {sorted(known)})")
    return VimConfig(**{"embed_dim": embed_dim, **overrides})


def vim_tiny(**overrides) -> VisionMamba:
    """Vim-T: hustvl's ``vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``
    (width 192, depth 24, RMSNorm, middle CLS, ``if_divide_out``); keyword overrides go to :class:`VimConfig`."""
    return VisionMamba(_config(192, overrides))


def vim_small(**overrides) -> VisionMamba:
    """Vim-S: hustvl's ``vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``
    (width 384, otherwise as :func:`vim_tiny`); keyword overrides go to :class:`VimConfig`."""
    return VisionMamba(_config(384, overrides))
