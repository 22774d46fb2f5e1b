"""PlainMamba in plain PyTorch: the non-hierarchical vision Mamba with zig-zag 2-D scans and no CLS token, the second
backbone ToP-ViM prunes (its headline: PlainMamba-L3 at 81.7 % with 41.6 % fewer FLOPs).

Papers: Zhan et al., "Exploring Token Pruning in Vision State Space Models", NeurIPS 2024 (arXiv 2409.18962); the
backbone is PlainMamba (Yang et al., BMVC 2024, arXiv 2403.17695). Compared against ChenhongyiYang/PlainMamba at commit
0975a1d (Apache-2.0): ``mmcls/plain_mamba_dev/models/plain_mamba/plain_mamba.py`` (``PlainMamba``, the L1/L2/L3
``arch_zoo``), ``plain_mamba_layer.py`` (``PlainMamba2D``, ``PlainMambaLayer``), ``modules/patch_embed.py``
(``ConvPatchEmbed``) and ``necks/custom_avg_pooling.py``; the classifier is mmcls's ``ImageClassifier`` with a
``LinearClsHead``. Module names follow the release, so its checkpoints load
(:func:`.checkpoint.load_plain_mamba_checkpoint` maps mmcls's ``backbone.`` / ``head.fc.`` prefixes).

The model:

1. ``patch_embed``: a 7x7 stride-2 stem conv (64 channels, BatchNorm, ReLU), ``num_convs`` 3x3 convs (64 channels,
   BatchNorm, ReLU), then ``projection``, a (p/2)x(p/2) stride-p/2 conv to C channels (bottom-right zero padding to a
   multiple, mmcv's "corner" mode): a grid of H x W = (img/p)^2 tokens in raster order, plus ``pos_embed``.
2. Each :class:`PlainMambaLayer` is pre-norm with a plain residual, ``x + mamba(norm(x))`` (LayerNorm, eps 1e-5);
   L1's first layer adds a 3x3 depthwise conv + BatchNorm + GELU on the grid after it.
3. ``ln1`` (LayerNorm, eps 1e-6) and the mean of all tokens feed the linear ``head``.

:class:`PlainMamba2D` (the mixer): ``in_proj`` (with bias) makes x and z; x goes through a depthwise 7x7 conv over the
grid and SiLU; ``x_proj`` and ``dt_proj`` give (Δ, B, C) per token; four selective scans walk the grid in the four
zig-zag orders of :func:`zigzag_orders`, each adding to B a learned vector for the direction of the move that arrived
at the step (``direction_Bs``: start, right, left, up, down); their outputs, put back in raster order, are summed, gated
by silu(z) and projected by ``out_proj``. That gated sum is what ToP-ViM scores (:class:`PlainSSMOutput`).

**A property of the release that we keep** (``param_order="raster"``, the default): the scans read Δ, B and C in raster
order while u follows the zig-zag order, so step t of every scan takes the parameters of grid cell t, not of the
token it scans. The released checkpoints were trained that way; ``param_order="scan"`` gives each step its own token's
parameters, as the PlainMamba paper's equations read.

Pruned sequences (ToP-ViM): ``positions`` [B, K] (ascending raster cells) says which grid cells the K tokens hold.
The conv reads 0 at the empty cells; each scan walks the kept tokens in its zig-zag order, reading Δ, B, C where the
full-grid scan would (its own step's cell under ``param_order="raster"``: the conv output there, its leakage from
kept neighbours if the cell is empty), and over every run of empty cells its state decays by
exp(g softplus(dt_bias) A) (``gap_delta``; g empty cells) or, with ``gap_delta=None``, not at all. On CUDA without
autograd the four pruned scans are one launch of the Triton kernel ``prunelab.kernels.gapped_scan``. See
:mod:`.plain_seam`.

What differs from the release: no fused CUDA scan (:func:`.scan.selective_scan_ref`), no ``init_layer_scale``, no
position-embedding resizing for other input sizes (a size mismatch is an error), no ``out_indices`` (detection and
segmentation features) and initialisation that follows the module's own scheme, not mmcls's ``init_cfg``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

from prunelab.common.handle import Handle
from prunelab.methods.top_vim.scan import IMPLS, selective_scan_ref
from prunelab.methods.top_vim.vim import check_config_ints, init_dt_proj

PARAM_ORDERS = ("raster", "scan")
DIRECTIONS = ("start", "right", "left", "up", "down")  # the index into direction_Bs

__all__ = ["PARAM_ORDERS", "zigzag_orders", "PlainSSMOutput", "PlainMamba2D", "PlainMambaLayer", "PlainMambaConfig",
           "PlainMamba", "plain_mamba_l1", "plain_mamba_l2", "plain_mamba_l3"]


# -- the four zig-zag scan orders --------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _zigzag(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [[r * w + (c if r % 2 == 0 else w - 1 - c) for c in range(w)] for r in range(h)]
    cols = [[(r if c % 2 == 0 else h - 1 - r) * w + c for r in range(h)] for c in range(w)]
    row_snake = torch.tensor([i for row in rows for i in row])
    col_snake = torch.tensor([i for col in cols for i in col])
    orders = torch.stack([row_snake, row_snake.flip(0), col_snake, col_snake.flip(0)])  # [4, L]
    r, c = orders // w, orders % w
    dr, dc = r[:, 1:] - r[:, :-1], c[:, 1:] - c[:, :-1]
    moves = torch.zeros_like(orders)  # 0: the first step ("start")
    moves[:, 1:] = torch.where(dc == 1, 1, torch.where(dc == -1, 2, torch.where(dr == -1, 3, 4)))
    return orders, moves


def zigzag_orders(hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """PlainMamba's four scan orders over an H x W grid and the direction of each step.

    Returns:
        orders: [4, H W] int64, the raster cell visited at each step: rows as a snake from the top-left corner
            (left to right first), its reverse, columns as a snake from the top-left corner (top to bottom first),
            its reverse. Consecutive cells are always grid neighbours.
        moves: [4, H W] int64, the move that arrived at each step, as an index into :data:`DIRECTIONS`
            (0 "start" at step 0; 1 right, 2 left, 3 up, 4 down).
    """
    h, w = hw
    if h < 1 or w < 1:
        raise ValueError(f"hw: expected a positive grid, got {hw}")
    orders, moves = _zigzag(int(h), int(w))
    return orders.clone(), moves.clone()


def use_kernel(u: torch.Tensor) -> bool:
    """Whether a pruned mixer scans with ``prunelab.kernels.gapped_scan`` (CUDA, no autograd)."""
    return u.is_cuda and not torch.is_grad_enabled()


# -- the mixer ---------------------------------------------------------------------------------------------------------
class PlainSSMOutput(NamedTuple):
    """The mixer's gated scan output before ``out_proj``: ``y`` [B, d_inner, K], the four directions summed in token
    order and multiplied by silu(z) (what ToP-ViM's importance reduces over channels)."""

    y: torch.Tensor


def scan_layout(orders: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where K kept tokens fall in each scan.

    Args:
        orders: [4, L] from :func:`zigzag_orders`.
        positions: [B, K] ascending raster cells of the kept tokens.

    Returns:
        steps: [4, B, K] the scan steps holding kept tokens, ascending (step t visits cell ``orders[o, t]``).
        perm: [4, B, K] which token (index into the K) each of those steps scans.
    """
    inverse = torch.argsort(orders, dim=1)  # [4, L]: the step of each cell
    rank = inverse[:, positions]  # [4, B, K]: the step of each kept token
    steps, perm = rank.sort(dim=-1)
    return steps, perm


class PlainMamba2D(nn.Module):
    """PlainMamba's 2-D selective-scan mixer (the release's ``PlainMamba2D``); [B, K, C] tokens on an H x W grid.

    Args:
        d_model: C, the model width.
        d_state: N, the SSM state size.
        expand: ``d_inner = expand * d_model``.
        conv_size: the depthwise conv's (odd) kernel size.
        dt_rank: the rank of the Δ projection; None is ``ceil(d_model / 16)``.
        bias: ``in_proj`` and ``out_proj`` biases (True in every released arch).
        param_order: ``"raster"`` (the release) or ``"scan"`` (module docstring).
        scan_impl: :func:`~prunelab.methods.top_vim.scan.selective_scan_ref`'s ``impl``.
    """

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2, conv_size: int = 7,
                 dt_rank: int | None = None, bias: bool = True, conv_bias: bool = True, param_order: str = "raster",
                 scan_impl: str = "parallel", dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4) -> None:
        super().__init__()
        if conv_size % 2 != 1:
            raise ValueError(f"conv_size: expected an odd kernel size, got {conv_size}")
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self.param_order, self.scan_impl = param_order, scan_impl
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv2d = nn.Conv2d(d_inner, d_inner, conv_size, padding=conv_size // 2, groups=d_inner, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.direction_Bs = nn.Parameter(torch.zeros(len(DIRECTIONS), d_state))
        trunc_normal_(self.direction_Bs, std=0.02)
        init_dt_proj(self.dt_proj, dt_min, dt_max, dt_init_floor)

    def forward(self, hidden: torch.Tensor, hw: tuple[int, int], positions: torch.Tensor | None = None,
                gap_delta: str | None = "bias", return_ssm: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, PlainSSMOutput]:
        """Mix [B, K, C] -> [B, K, C].

        Args:
            hidden: the tokens; K = H W without ``positions``.
            hw: the grid (H, W).
            positions: [B, K] ascending raster cells of the tokens; None: every cell (the dense mixer).
            gap_delta: over empty cells each scan's state decays with step ``softplus(dt_bias)`` (``"bias"``) or
                not at all (None).
            return_ssm: also return the gated scan output (:class:`PlainSSMOutput`).
        """
        B, K, _ = hidden.shape
        h, w = hw
        length, E = h * w, self.d_inner
        dev = hidden.device
        if positions is None:
            if K != length:
                raise ValueError(f"hidden: {K} tokens do not fill the {h}x{w} grid (pass positions)")
            positions = torch.arange(length, device=dev).expand(B, length)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # [B, K, E] each
        grid = x if K == length else x.new_zeros(B, length, E).scatter(1, positions[..., None].expand(B, K, E), x)
        conv = F.silu(self.conv2d(grid.transpose(1, 2).reshape(B, E, h, w))).flatten(2)  # [B, E, L], raster
        dt, Bm, Cm = torch.split(self.x_proj(conv.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], -1)
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # [B, E, L]; dt_proj's bias is the delta_bias
        u_tokens = conv.gather(2, positions[:, None].expand(B, E, K))  # [B, E, K]

        orders, moves = (t.to(dev) for t in zigzag_orders(hw))
        steps, perm = scan_layout(orders, positions)  # [4, B, K]
        # the grid cell whose Δ, B, C each kept step reads: the step's own index (the release) or its token's cell
        cells = steps if self.param_order == "raster" else torch.stack([positions.gather(1, p) for p in perm])
        flat = lambda t: t.flatten(0, 1)  # noqa: E731  [4, B, ...] -> [4 B, ...]
        cells_e = flat(cells)[:, None]  # [4B, 1, K]
        u = flat(torch.stack([u_tokens.gather(2, p[:, None].expand(B, E, K)) for p in perm]))  # scan order
        delta_s = delta.repeat(4, 1, 1).gather(2, cells_e.expand(4 * B, E, K))
        B_s = Bm.transpose(1, 2).repeat(4, 1, 1).gather(2, cells_e.expand(4 * B, self.d_state, K))
        C_s = Cm.transpose(1, 2).repeat(4, 1, 1).gather(2, cells_e.expand(4 * B, self.d_state, K))
        step_moves = moves.gather(1, steps.flatten(1)).view(4, B, K)  # the move arriving at each kept step
        B_s = B_s + self.direction_Bs[flat(step_moves)].transpose(1, 2).to(B_s.dtype)
        gaps = gd = None
        if K != length and gap_delta == "bias":
            first = flat(steps)[:, :1]  # the state is 0 before the first kept step: its gap changes nothing
            gaps = torch.cat([torch.zeros_like(first), flat(steps).diff(dim=1) - 1], dim=1)
            gd = F.softplus(self.dt_proj.bias.float())
        elif gap_delta not in ("bias", None):
            raise ValueError(f"gap_delta: expected 'bias' or None, got {gap_delta!r}")
        A = -torch.exp(self.A_log.float())
        if K != length and use_kernel(u):  # the Triton kernel: K steps, gaps folded in
            from prunelab.kernels.gapped_scan import gapped_scan

            gd = torch.zeros_like(self.D, dtype=torch.float32) if gd is None else gd  # "none": no decay over gaps
            ys = gapped_scan(u, delta_s, A, B_s, C_s, flat(steps), gd, D=self.D.float(),
                             delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        else:
            ys = selective_scan_ref(u, delta_s, A, B_s, C_s, self.D.float(), delta_bias=self.dt_proj.bias.float(),
                                    delta_softplus=True, impl=self.scan_impl, gaps=gaps, gap_delta=gd)  # [4B, E, K]
        back = torch.argsort(flat(perm), dim=1)[:, None].expand(4 * B, E, K)  # scan order -> token order
        y = ys.gather(2, back).view(4, B, E, K).sum(0).to(z.dtype) * F.silu(z).transpose(1, 2)
        out = self.out_proj(y.transpose(1, 2))
        return (out, PlainSSMOutput(y)) if return_ssm else out


# -- layer and model ---------------------------------------------------------------------------------------------------
def on_grid(module: nn.Module, x: torch.Tensor, hw: tuple[int, int], positions: torch.Tensor | None) -> torch.Tensor:
    """Apply a 2-D ``module`` to tokens [B, K, C] on an H x W grid (empty cells hold 0); -> [B, K, C]."""
    B, K, C = x.shape
    h, w = hw
    grid = x if positions is None else x.new_zeros(B, h * w, C).scatter(1, positions[..., None].expand(B, K, C), x)
    out = module(grid.transpose(1, 2).reshape(B, C, h, w)).flatten(2).transpose(1, 2)
    return out if positions is None else out.gather(1, positions[..., None].expand(B, K, C))


class PlainMambaLayer(nn.Module):
    """The release's ``PlainMambaLayer``: ``x + drop_path(mamba(norm(x)))``, then (L1's first layer) a 3x3
    depthwise conv, BatchNorm and GELU over the grid."""

    def __init__(self, dim: int, mamba: PlainMamba2D, with_dwconv: bool = False, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = mamba
        self.dw = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False), nn.BatchNorm2d(dim),
                                nn.GELU()) if with_dwconv else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: tuple[int, int], positions: torch.Tensor | None = None,
                gap_delta: str | None = "bias", return_ssm: bool = False):
        """[B, K, C] -> [B, K, C] (and the mixer's :class:`PlainSSMOutput` when ``return_ssm``)."""
        mixed = self.mamba(self.norm(x), hw, positions, gap_delta, return_ssm)
        mixed, ssm = mixed if return_ssm else (mixed, None)
        x = x + self.drop_path(mixed)
        if self.dw is not None:
            x = on_grid(self.dw, x, hw, positions)
        return (x, ssm) if return_ssm else x


@dataclass(frozen=True)
class PlainMambaConfig:
    """PlainMamba's hyperparameters; the defaults are the release's L1 (``arch_zoo["L1"]``)."""

    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 24
    num_convs_patch_embed: int = 1
    layers_with_dwconv: tuple[int, ...] = (0,)
    d_state: int = 16
    expand: int = 2
    conv_size: int = 7
    dt_rank: int | None = None  # None: ceil(embed_dim / 16)
    num_classes: int = 1000  # 0: no head, forward returns the pooled feature
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    param_order: str = "raster"
    scan_impl: str = "parallel"

    def __post_init__(self) -> None:
        size = check_config_ints(self, {"in_chans": 1, "patch_size": 2, "embed_dim": 1, "depth": 1,
                                        "num_convs_patch_embed": 0, "d_state": 1, "expand": 1, "conv_size": 1,
                                        "dt_rank": 1, "num_classes": 0}, optional=("dt_rank",))
        if self.patch_size % 2 or self.patch_size > min(size):
            raise ValueError(f"patch_size: expected an even size up to img_size {size}, got {self.patch_size}")
        if self.conv_size % 2 != 1:
            raise ValueError(f"conv_size: expected an odd kernel size, got {self.conv_size}")
        layers = tuple(self.layers_with_dwconv)
        if any(not isinstance(i, int) or not 0 <= i < self.depth for i in layers):
            raise ValueError(f"layers_with_dwconv: expected 0-based layer indices below depth {self.depth}, "
                             f"got {self.layers_with_dwconv!r}")
        object.__setattr__(self, "layers_with_dwconv", layers)
        for name in ("drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: expected a rate in [0, 1), got {getattr(self, name)!r}")
        if self.param_order not in PARAM_ORDERS:
            raise ValueError(f"param_order: expected one of {PARAM_ORDERS}, got {self.param_order!r}")
        if self.scan_impl not in IMPLS:
            raise ValueError(f"scan_impl: expected one of {IMPLS}, got {self.scan_impl!r}")


class ConvPatchEmbed(nn.Module):
    """The release's ``ConvPatchEmbed``: stem, 3x3 convs, projection; images -> ([B, H W, C], (H, W))."""

    def __init__(self, cfg: PlainMambaConfig) -> None:
        super().__init__()
        self.img_size, half = cfg.img_size, cfg.patch_size // 2
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_chans, 64, 7, stride=2, padding=3, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU(True))
        convs = []
        for _ in range(cfg.num_convs_patch_embed):
            convs += [nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(True)]
        self.convs = nn.Sequential(*convs) if convs else None
        self.projection = nn.Conv2d(64, cfg.embed_dim, half, stride=half)
        stem_out = tuple((s + 2 * 3 - 7) // 2 + 1 for s in cfg.img_size)
        self.grid_size = tuple(math.ceil(s / half) for s in stem_out)  # "corner" padding to a multiple of p/2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[-2:]) != self.img_size or x.shape[1] != self.stem[0].in_channels:
            raise ValueError(f"x: expected [B, {self.stem[0].in_channels}, {self.img_size[0]}, {self.img_size[1]}], "
                             f"got {tuple(x.shape)}")
        x = self.stem(x)
        if self.convs is not None:
            x = self.convs(x)
        k = self.projection.kernel_size[0]
        x = F.pad(x, (0, -x.shape[-1] % k, 0, -x.shape[-2] % k))
        return self.projection(x).flatten(2).transpose(1, 2)


class PlainMamba(nn.Module):
    """The release's ``PlainMamba`` backbone with mean pooling and a linear head; [B, 3, H, W] -> [B, classes].

    Args:
        cfg: the hyperparameters; :func:`plain_mamba_l1` / ``_l2`` / ``_l3`` give the released ones.
    """

    def __init__(self, cfg: PlainMambaConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or PlainMambaConfig()
        dim = cfg.embed_dim
        self.patch_embed = ConvPatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.drop_after_pos = nn.Dropout(cfg.drop_rate)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # np.linspace(0, rate)
        self.layers = nn.ModuleList(
            PlainMambaLayer(dim, PlainMamba2D(dim, cfg.d_state, cfg.expand, cfg.conv_size, cfg.dt_rank,
                                              param_order=cfg.param_order, scan_impl=cfg.scan_impl),
                            i in cfg.layers_with_dwconv, dpr[i])
            for i in range(cfg.depth))
        self.ln1 = nn.LayerNorm(dim, eps=1e-6)  # mmcv's build_norm_layer(LN, postfix=1) names it "ln1"
        self.head = nn.Linear(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        dt_projs = {id(layer.mamba.dt_proj) for layer in self.layers}  # keep Mamba's dt initialisation
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module) not in dt_projs:
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, in_chans, H, W] -> tokens [B, H W, C] in raster order, plus ``pos_embed``."""
        return self.drop_after_pos(self.patch_embed(x) + self.pos_embed)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``ln1`` then the mean over the tokens (the release's ``CustomAveragePooling``); [B, K, C] -> [B, C]."""
        return self.ln1(tokens).mean(1)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the last layer, before ``ln1``; [B, H W, C]."""
        tokens = self.embed(x)
        for layer in self.layers:
            tokens = layer(tokens, self.grid)
        return tokens

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature [B, C]."""
        return self.pool(self.forward_tokens(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] (the pooled feature when ``num_classes == 0``)."""
        return self.head(self.forward_features(x))

    def prunelab_seam(self, method) -> Handle:
        """``prunelab.apply``'s entry: install ToP-ViM (:mod:`prunelab.methods.top_vim.plain_seam`)."""
        from prunelab.methods.top_vim.plain_seam import install

        return install(self, method)


ARCHS = {  # the release's arch_zoo
    "L1": dict(embed_dim=192, depth=24, num_convs_patch_embed=1, layers_with_dwconv=(0,)),
    "L2": dict(embed_dim=384, depth=24, num_convs_patch_embed=2, layers_with_dwconv=()),
    "L3": dict(embed_dim=448, depth=36, num_convs_patch_embed=2, layers_with_dwconv=()),
}


def _build(arch: str, overrides: dict) -> PlainMamba:
    known = {f.name for f in fields(PlainMambaConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{unknown[0]}: not a PlainMambaConfig field (known: {sorted(known)})")
    return PlainMamba(PlainMambaConfig(**{**ARCHS[arch], **overrides}))


def plain_mamba_l1(**overrides) -> PlainMamba:
    """PlainMamba-L1 (width 192, depth 24, one stem conv, the depthwise conv after layer 0)."""
    return _build("L1", overrides)


def plain_mamba_l2(**overrides) -> PlainMamba:
    """PlainMamba-L2 (width 384, depth 24, two stem convs)."""
    return _build("L2", overrides)


def plain_mamba_l3(**overrides) -> PlainMamba:
    """PlainMamba-L3 (width 448, depth 36, two stem convs)."""
    return _build("L3", overrides)
