"""PlainMamba (zig-zag 2-D scans, no CLS) and ToP-ViM on it: the backbone against a transcription of the release's
mixer, the scan orders, the checkpoint loader, the FLOPs the release reports, and the pruning invariants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import prunelab
from prunelab.methods.baselines import RandomVim
from prunelab.methods.top_vim import ToPViM
from prunelab.methods.top_vim.checkpoint import load_plain_mamba_checkpoint
from prunelab.methods.top_vim.flops import PlainDims, plain_mamba_macs
from prunelab.methods.top_vim.plain_mamba import (
    PlainMamba,
    PlainMambaConfig,
    plain_mamba_l1,
    plain_mamba_l2,
    plain_mamba_l3,
    zigzag_orders,
)
from prunelab.methods.top_vim.plain_seam import plain_tokens_per_block
from prunelab.methods.top_vim.scan import selective_scan_ref
from prunelab.methods.top_vim.selection import plain_keep_count, select_plain


def tiny(**overrides) -> PlainMamba:
    cfg = dict(img_size=32, patch_size=8, embed_dim=16, depth=4, d_state=4, conv_size=3, num_classes=5,
               num_convs_patch_embed=1, layers_with_dwconv=(0,))
    model = PlainMamba(PlainMambaConfig(**{**cfg, **overrides}))
    with torch.no_grad():  # unit-variance projections: mmcls's 0.02 init leaves the scans' terms negligible
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, module.in_features ** -0.5)
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_zigzag_orders_small_grid():
    # 2 x 3 grid, cells 0 1 2 / 3 4 5; moves: 0 start, 1 right, 2 left, 3 up, 4 down
    orders, moves = zigzag_orders((2, 3))
    assert orders.tolist() == [[0, 1, 2, 5, 4, 3], [3, 4, 5, 2, 1, 0], [0, 3, 4, 1, 2, 5], [5, 2, 1, 4, 3, 0]]
    assert moves.tolist() == [[0, 1, 1, 4, 2, 2], [0, 1, 1, 3, 2, 2], [0, 4, 1, 3, 1, 4], [0, 3, 2, 4, 2, 3]]


@pytest.mark.parametrize("hw", [(1, 1), (3, 3), (4, 5), (5, 2)])
def test_zigzag_orders_are_neighbour_walks(hw):
    orders, _ = zigzag_orders(hw)
    h, w = hw
    for order in orders:
        assert sorted(order.tolist()) == list(range(h * w))
        r, c = order // w, order % w
        assert bool(((r.diff().abs() + c.diff().abs()) == 1).all())


def release_mixer(m, x, hw, param_order="raster"):
    """The release's PlainMamba2D.forward, transcribed loop by loop (one scan per order, float32 reference)."""
    B, L, _ = x.shape
    xz = m.in_proj(x)
    u, z = xz.chunk(2, dim=-1)
    h, w = hw
    u = F.silu(m.conv2d(u.reshape(B, h, w, -1).permute(0, 3, 1, 2))).permute(0, 2, 3, 1).reshape(B, L, -1)
    dt, Bm, Cm = torch.split(m.x_proj(u), [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = (dt @ m.dt_proj.weight.T).transpose(1, 2)
    Bm, Cm = Bm.transpose(1, 2), Cm.transpose(1, 2)
    orders, moves = zigzag_orders(hw)
    y = 0
    for o, mv in zip(orders, moves):
        inv = torch.argsort(o)
        d, b, c = (dt, Bm, Cm) if param_order == "raster" else (dt[..., o], Bm[..., o], Cm[..., o])
        b = b + m.direction_Bs[mv].T[None]
        ys = selective_scan_ref(u[:, o].transpose(1, 2), d, -torch.exp(m.A_log), b, c, m.D,
                                delta_bias=m.dt_proj.bias, delta_softplus=True, impl="loop")
        y = y + ys[..., inv]
    return m.out_proj(y.transpose(1, 2) * F.silu(z))


@pytest.mark.parametrize("param_order,hw", [("raster", (4, 4)), ("scan", (4, 4)), ("raster", (3, 5))])
def test_mixer_matches_release_transcription(param_order, hw):
    model = tiny(param_order=param_order)
    m = model.layers[1].mamba
    x = torch.randn(2, hw[0] * hw[1], 16)
    torch.testing.assert_close(m(x, hw), release_mixer(m, x, hw, param_order), rtol=1e-4, atol=1e-5)


def test_param_orders_differ():
    a = tiny(param_order="raster")
    b = tiny(param_order="scan")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 16, 16)
    ya, yb = a.layers[1].mamba(x, (4, 4)), b.layers[1].mamba(x, (4, 4))
    assert (ya - yb).abs().max() > 1e-3 * ya.abs().max()


def test_released_gflops():
    # the release's README: L1 3.0, L2 8.1, L3 14.4 GFLOPs, reproduced under the fvcore scan convention
    got = [plain_mamba_macs(PlainDims.from_model(f()), scan_convention="fvcore") / 1e9
           for f in (plain_mamba_l1, plain_mamba_l2, plain_mamba_l3)]
    assert [round(g, 1) for g in got] == [3.0, 8.1, 14.4]


def release_state_dict(model: PlainMamba) -> dict:
    """``model``'s weights under mmcls's ImageClassifier names, as the release's checkpoints hold them."""
    out = {}
    for k, v in model.state_dict().items():
        out[k.replace("head.", "head.fc.") if k.startswith("head.") else f"backbone.{k}"] = v.clone()
    return out


def test_checkpoint_loads_mmcls_names(tmp_path):
    src = tiny().eval()
    for key in src.state_dict():  # non-default BatchNorm statistics, so they must travel
        if key.endswith("running_mean"):
            src.state_dict()[key].normal_()
    path = tmp_path / "l.pth"
    torch.save({"meta": {"epoch": 300}, "state_dict": release_state_dict(src)}, path)
    dst = load_plain_mamba_checkpoint(tiny(), path).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(src(x), dst(x))


def test_checkpoint_refuses_wrong_model(tmp_path):
    path = tmp_path / "l.pth"
    torch.save({"state_dict": release_state_dict(tiny())}, path)
    with pytest.raises(ValueError, match="path: .*does not fit this PlainMamba.*shape mismatch"):
        load_plain_mamba_checkpoint(tiny(embed_dim=24), path)


def test_keep_count_and_selection():
    assert [plain_keep_count(n, 0.6) for n in (196, 118, 71)] == [118, 71, 43]
    assert plain_keep_count(7, 1.0) == 7 and plain_keep_count(3, 0.01) == 1
    red = select_plain(torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.2], [5.0, 4.0, 3.0, 2.0, 1.0]]), 0.6)
    assert red.keep.tolist() == [[1, 2, 3], [0, 1, 2]]


@pytest.mark.parametrize("alignment", ["gapped", "none"])
def test_keep_all_is_dense(alignment):
    model = tiny().eval()
    x = torch.randn(3, 3, 32, 32)
    dense = model(x)
    with prunelab.apply(model, ToPViM(keep_ratio=1.0, alignment=alignment)):
        assert torch.equal(model(x), dense)
    assert torch.equal(model(x), dense)


def masked_reference(model, method, x, pruned_delta):
    """The full-grid forward: pruned cells stay on the grid, read 0 by the conv, and each scan only decays there
    with Δ from ``pruned_delta`` (0: softplus(dt_bias); -1e4: no decay); kept outputs gathered at the end."""
    hidden = model.embed(x)
    B, L, _ = hidden.shape
    alive = torch.ones(B, L, dtype=torch.bool)
    blocks = method.prune_blocks(len(model.layers))
    for block, layer in enumerate(model.layers, start=1):
        m = layer.mamba
        u, z = m.in_proj(layer.norm(hidden)).chunk(2, dim=-1)
        u = u * alive[..., None]
        u = F.silu(m.conv2d(u.transpose(1, 2).reshape(B, -1, 4, 4))).flatten(2).transpose(1, 2)
        dt, Bm, Cm = torch.split(m.x_proj(u), [m.dt_rank, m.d_state, m.d_state], dim=-1)
        dt = (dt @ m.dt_proj.weight.T).transpose(1, 2)
        y = 0
        for o, mv in zip(*zigzag_orders((4, 4))):
            keep = alive[:, o]
            d = torch.where(keep[:, None], dt, torch.full_like(dt, pruned_delta))
            ys = selective_scan_ref(u[:, o].transpose(1, 2), d, -torch.exp(m.A_log),
                                    Bm.transpose(1, 2) + m.direction_Bs[mv].T[None], Cm.transpose(1, 2), m.D,
                                    delta_bias=m.dt_proj.bias, delta_softplus=True, keep=keep, impl="loop")
            y = y + ys[..., torch.argsort(o)]
        gated = y.transpose(1, 2) * F.silu(z)
        hidden = hidden + m.out_proj(gated)
        if layer.dw is not None:
            hidden = layer.dw((hidden * alive[..., None]).transpose(1, 2).reshape(B, -1, 4, 4)).flatten(2).mT
        if block in blocks:
            score = torch.where(alive, gated.clamp(min=0).sum(-1), float("-inf"))
            k = plain_keep_count(int(alive[0].sum()), method.keep_ratio)
            top = score.topk(k, dim=1).indices
            alive = torch.zeros_like(alive).scatter(1, top, True)
    kept = torch.nonzero(alive)[:, 1].view(B, -1)
    return model.head(model.ln1(hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1]))).mean(1))


@pytest.mark.parametrize("alignment,pruned_delta", [("gapped", 0.0), ("none", -1e4)])
def test_pruned_equals_full_grid_reference(alignment, pruned_delta):
    model = tiny(depth=5, layers_with_dwconv=(0, 2)).eval()  # a dwconv layer after a pruning block
    method = ToPViM(keep_ratio=0.6, blocks=(1, 3), alignment=alignment)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = masked_reference(model, method, x, pruned_delta)
        with prunelab.apply(model, method) as handle:
            got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert [v.shape[1] for v in handle.kept.values()] == [10, 6]
    assert all(bool((v.diff(dim=1) > 0).all()) for v in handle.kept.values())


def test_alignment_changes_the_output():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    outs = {}
    for alignment in ("gapped", "none"):
        with torch.no_grad(), prunelab.apply(model, ToPViM(keep_ratio=0.5, blocks=(1,), alignment=alignment)):
            outs[alignment] = model(x)
    assert not torch.allclose(outs["gapped"], outs["none"])


def test_pruned_tokens_do_not_leak():
    # a token pruned after block 1 must not change anything later: alter its block-1 output, keep the same kept set
    model = tiny().eval()
    method = ToPViM(keep_ratio=0.5, blocks=(1,), alignment="gapped")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), prunelab.apply(model, method) as handle:
        base = model(x)
        kept = handle.kept[1][0]
        layer0 = model.layers[0]
        pruned = sorted(set(range(16)) - set(kept.tolist()))
        original = layer0.forward

        def poisoned(h, *args, **kwargs):
            out = original(h, *args, **kwargs)
            out[0][:, pruned] += 100.0
            return out

        layer0.forward = poisoned
        try:
            again = model(x)
        finally:
            del layer0.forward
    assert torch.equal(handle.kept[1][0], kept)
    torch.testing.assert_close(again, base, rtol=1e-5, atol=1e-6)


def test_batch_of_two_equals_single_runs():
    model = tiny().eval()
    method = ToPViM(keep_ratio=0.6, blocks=(1, 2), alignment="gapped")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), prunelab.apply(model, method) as handle:
        both = model(x)
        kept = handle.kept[2].clone()
        singles = [model(x[i:i + 1]) for i in range(2)]
        assert not torch.equal(kept[0], kept[1])  # different images keep different cells
    torch.testing.assert_close(both, torch.cat(singles), rtol=1e-5, atol=1e-6)


def test_training_mode_gradients_and_macs():
    model = tiny().train()
    method = ToPViM(keep_ratio=0.5, blocks=(2,), alignment="gapped")
    with prunelab.apply(model, method) as handle:
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        assert handle.state.tokens_per_block == [16, 16, 8, 8]
        assert handle.state.macs(model) == plain_mamba_macs(PlainDims.from_model(model), [16, 16, 8, 8])
    assert model.layers[3].mamba.in_proj.weight.grad is not None
    assert plain_tokens_per_block(method, 16, 4) == [16, 16, 8, 8]


def test_random_baseline_runs_on_plain_mamba():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), prunelab.apply(model, RandomVim(keep_ratio=0.5, blocks=(1,), alignment="gapped")) as h:
        model(x)
        first = h.kept[1].clone()
        model(x)
    assert torch.equal(first, h.kept[1])


@pytest.mark.parametrize("kwargs,match", [
    (dict(alignment="zero_slot"), "alignment: PlainMamba supports"),
    (dict(alignment="decay_only"), "alignment: PlainMamba supports"),
    (dict(alignment="gapped", importance_source="forward"), "importance_source: PlainMamba"),
    (dict(alignment="gapped", selection="balanced"), "selection: PlainMamba has no CLS"),
    (dict(alignment="gapped", blocks=(4,)), "blocks: 4 is not below"),
])
def test_bad_settings_are_refused(kwargs, match):
    model = tiny()
    with pytest.raises(ValueError, match=match):
        prunelab.apply(model, ToPViM(**kwargs))
    assert "forward" not in vars(model)


@pytest.mark.parametrize("kwargs,match", [
    (dict(param_order="zigzag"), "param_order"), (dict(patch_size=7), "patch_size"),
    (dict(conv_size=4), "conv_size"), (dict(layers_with_dwconv=(30,)), "layers_with_dwconv"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PlainMambaConfig(**kwargs)


def test_wrong_image_size_is_refused():
    with pytest.raises(ValueError, match=r"x: expected \[B, 3, 32, 32\]"):
        tiny()(torch.randn(1, 3, 28, 28))


@pytest.mark.parametrize("alignment", ["gapped", "none"])
def test_kernel_wiring_equals_the_scan_path(alignment, monkeypatch):
    # the CUDA branch's call of kernels.gapped_scan, run on CPU (its "auto" impl is the torch reference there)
    from prunelab.methods.top_vim import plain_mamba

    model = tiny().eval()
    method = ToPViM(keep_ratio=0.6, blocks=(1, 2), alignment=alignment)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), prunelab.apply(model, method):
        expected = model(x)
        monkeypatch.setattr(plain_mamba, "use_kernel", lambda u: True)
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_gpu_plain_mamba_matches_the_cpu_path():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = plain_mamba_l1(scan_impl="stepped").eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    method = ToPViM(keep_ratio=0.6, alignment="gapped")
    with torch.no_grad(), prunelab.apply(model, method) as handle:
        cpu = model(x)
        kept = {b: k.clone() for b, k in handle.kept.items()}
        gpu = model.cuda()(x.cuda())
        assert all(torch.equal(kept[b], handle.kept[b].cpu()) for b in kept)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-3, rtol=2e-3)
