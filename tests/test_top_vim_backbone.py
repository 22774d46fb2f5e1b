"""ToP-ViM's plain-PyTorch Vim backbone: the selective scan, the bidirectional mixer, the model, the hustvl loader."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from prunelab.methods.top_vim import (
    RMSNorm,
    SSMOutputs,
    VimBlock,
    VimConfig,
    VimMixer,
    VisionMamba,
    load_vim_checkpoint,
    selective_scan_ref,
    unflip,
    vim_small,
    vim_tiny,
)


def tiny(seed: int = 0, **overrides) -> VisionMamba:
    torch.manual_seed(seed)
    cfg = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_classes=5, d_state=4)
    return VisionMamba(VimConfig(**{**cfg, **overrides})).eval()


def scan_inputs(b: int, d: int, n: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(u=torch.randn(b, d, length, generator=g), delta=torch.randn(b, d, length, generator=g),
                A=-torch.rand(d, n, generator=g) * 4, B=torch.randn(b, n, length, generator=g),
                C=torch.randn(b, n, length, generator=g), D=torch.randn(d, generator=g),
                z=torch.randn(b, d, length, generator=g), delta_bias=torch.randn(d, generator=g))


def closed_form(u, delta, A, B, C, D, z, delta_bias, keep=None) -> torch.Tensor:
    """y_t = sum_{s<=t} <C_t, exp(A sum_{s<r<=t} Δ_r) Δ_s B_s u_s> + D u_t, gated; in float64 Python arithmetic."""
    b_, d_, length = u.shape
    n_ = A.shape[1]
    dl = [[[math.log1p(math.exp(float(delta[b, d, t] + delta_bias[d]))) for t in range(length)] for d in range(d_)]
          for b in range(b_)]
    y = torch.zeros(b_, d_, length, dtype=torch.float64)
    for b in range(b_):
        for d in range(d_):
            for t in range(length):
                if keep is not None and not keep[b, t]:
                    continue
                acc = 0.0
                for s in range(t + 1):
                    if keep is not None and not keep[b, s]:
                        continue  # a pruned slot feeds no input, but its Δ still decays later states
                    for n in range(n_):
                        decay = math.exp(float(A[d, n]) * sum(dl[b][d][s + 1:t + 1]))
                        acc += float(C[b, n, t]) * decay * dl[b][d][s] * float(B[b, n, s]) * float(u[b, d, s])
                acc += float(D[d]) * float(u[b, d, t])
                y[b, d, t] = acc * float(F.silu(z[b, d, t]))
    return y


# -- the selective scan ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["loop", "parallel", "stepped"])
def test_scan_on_a_hand_computed_case(impl):
    # one channel, one state, Δ = 1, A = -ln 2: the state halves every step; u = (1, 0, 0, 2)
    u = torch.tensor([[[1.0, 0.0, 0.0, 2.0]]])
    ones = torch.ones(1, 1, 4)
    y = selective_scan_ref(u, ones.clone(), torch.tensor([[-math.log(2.0)]]), ones, ones, impl=impl)
    torch.testing.assert_close(y, torch.tensor([[[1.0, 0.5, 0.25, 2.125]]]), rtol=1e-6, atol=1e-7)
    # D skips u through; the gate multiplies by silu(z) = z * sigmoid(z)
    z = torch.tensor([[[0.0, 1.0, -1.0, 2.0]]])
    y = selective_scan_ref(u, ones.clone(), torch.tensor([[-math.log(2.0)]]), ones, ones, D=torch.tensor([3.0]), z=z,
                           impl=impl)
    expected = torch.tensor([1.0 + 3, 0.5, 0.25, 2.125 + 6]) * z[0, 0] * torch.sigmoid(z[0, 0])
    torch.testing.assert_close(y[0, 0], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", ["loop", "parallel", "stepped"])
def test_scan_matches_the_closed_form_with_softplus_bias_d_and_gate(impl):
    x = scan_inputs(2, 3, 2, 5)
    y = selective_scan_ref(**x, delta_softplus=True, impl=impl)
    torch.testing.assert_close(y.double(), closed_form(**x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length", [1, 2, 7, 63, 197])
def test_parallel_scan_matches_the_loop_on_odd_lengths(length):
    x = scan_inputs(2, 5, 3, length, seed=length)
    x["A"] = x["A"] * 4  # strong decays as well as weak ones
    keep = torch.rand(2, length, generator=torch.Generator().manual_seed(1)) > 0.3
    for kw in ({}, {"keep": keep}):
        loop = selective_scan_ref(**x, delta_softplus=True, impl="loop", **kw)
        par = selective_scan_ref(**x, delta_softplus=True, impl="parallel", **kw)
        assert ((par - loop).norm() / loop.norm()).item() < 1e-5
        assert loop.abs().max() > 0.1


def test_scan_keeps_the_input_dtype_and_computes_in_float32():
    x = scan_inputs(1, 2, 2, 9)
    half = {k: v.to(torch.bfloat16) if k in ("u", "delta", "z") else v for k, v in x.items()}
    y = selective_scan_ref(**half, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    ref = selective_scan_ref(**{k: v.float() for k, v in half.items()}, delta_softplus=True)
    torch.testing.assert_close(y, ref.to(torch.bfloat16))


@pytest.mark.parametrize("impl", ["loop", "parallel", "stepped"])
def test_keep_all_true_equals_dense_exactly(impl):
    x = scan_inputs(2, 4, 3, 11)
    dense = selective_scan_ref(**x, delta_softplus=True, impl=impl)
    kept = selective_scan_ref(**x, delta_softplus=True, keep=torch.ones(2, 11, dtype=torch.bool), impl=impl)
    assert torch.equal(dense, kept)


@pytest.mark.parametrize("impl", ["loop", "parallel", "stepped"])
def test_keep_false_decays_the_state_without_input_and_outputs_zero(impl):
    x = scan_inputs(2, 2, 2, 6, seed=3)
    keep = torch.tensor([[True, False, True, False, False, True], [False, True, True, True, False, True]])
    y = selective_scan_ref(**x, delta_softplus=True, keep=keep, impl=impl)
    assert torch.equal(y[~keep[:, None, :].expand_as(y)], torch.zeros(int((~keep).sum()) * 2))
    torch.testing.assert_close(y.double(), closed_form(**x, keep=keep), rtol=1e-5, atol=1e-6)
    # "decay_only" is not physical removal: the kept tokens see the pruned slots' decay
    idx = keep[0]
    seq = {k: x[k][:1, ..., idx] for k in ("u", "delta", "B", "C", "z")}
    removed = selective_scan_ref(**seq, A=x["A"], D=x["D"], delta_bias=x["delta_bias"], delta_softplus=True, impl=impl)
    assert not torch.allclose(removed, y[:1, :, idx], atol=1e-3)


@pytest.mark.parametrize("bad, name", [({"impl": "cuda"}, "impl"), ({"keep": torch.ones(1, 9)}, "keep"),
                                       ({"keep": torch.ones(1, 8, dtype=torch.bool)}, "keep"),
                                       ({"B": torch.ones(1, 3, 9)}, "B"), ({"C": torch.ones(1, 2, 8)}, "C"),
                                       ({"D": torch.ones(3)}, "D"), ({"delta": torch.ones(1, 2, 8)}, "delta"),
                                       ({"A": torch.ones(3, 2)}, "A"), ({"z": torch.ones(1, 2, 1)}, "z"),
                                       ({"delta_bias": torch.ones(2, 1)}, "delta_bias")])
def test_scan_bad_arguments_name_the_parameter(bad, name):
    x = scan_inputs(1, 2, 2, 9) | bad
    with pytest.raises(ValueError, match=rf"^{name}:"):
        selective_scan_ref(**x)


# -- the mixer ---------------------------------------------------------------------------------------------------------
def mixer(seed: int = 0, **kw) -> VimMixer:
    torch.manual_seed(seed)
    m = VimMixer(8, d_state=4, **kw)
    with torch.no_grad():  # hustvl leaves dt_proj_b's bias at 0 after init; make the branches differ everywhere
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_mixer_output_is_out_proj_of_the_averaged_ssm_outputs():
    m = mixer()
    h = torch.randn(2, 9, 8)
    out, ssm = m(h, return_ssm=True)
    assert isinstance(ssm, SSMOutputs) and ssm.fwd.shape == ssm.bwd_flipped.shape == (2, 16, 9)
    torch.testing.assert_close(out, m.out_proj(((ssm.fwd + ssm.bwd()) / 2).transpose(1, 2)))
    assert torch.equal(m(h), out)
    torch.testing.assert_close(ssm.bwd(), ssm.bwd_flipped.flip(-1))
    assert torch.equal(unflip(ssm.bwd_flipped), ssm.bwd())
    m.if_divide_out = False
    torch.testing.assert_close(m(h), m.out_proj((ssm.fwd + ssm.bwd()).transpose(1, 2)))


def test_backward_branch_on_the_reversed_input_is_the_forward_branch_reindexed():
    m = mixer()
    with torch.no_grad():
        for name in ("conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias"):
            mod, attr = name.split(".")
            getattr(m, f"{mod}_b").get_parameter(attr).copy_(getattr(m, mod).get_parameter(attr))
        m.A_b_log.copy_(m.A_log)
        m.D_b.copy_(m.D)
    h = torch.randn(2, 11, 8)
    out, ssm = m(h, return_ssm=True)
    out_r, ssm_r = m(h.flip(1), return_ssm=True)
    # the backward branch scans the flipped sequence: in its own frame it is the forward branch on the reversed input
    torch.testing.assert_close(ssm.bwd_flipped, ssm_r.fwd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ssm.bwd(), ssm_r.fwd.flip(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_r, out.flip(1), rtol=1e-5, atol=1e-6)
    assert ssm.fwd.abs().max() > 1e-2


def test_forward_branch_is_causal_and_backward_branch_anticausal():
    m = mixer()
    h = torch.randn(1, 12, 8)
    j = 6
    h2 = h.clone()
    h2[:, j] += 1.0
    _, a = m(h, return_ssm=True)
    _, b = m(h2, return_ssm=True)
    assert torch.equal(a.fwd[..., :j], b.fwd[..., :j])  # no look-ahead through the conv or the scan
    assert (a.fwd[..., j:] - b.fwd[..., j:]).abs().amax(1).min() > 1e-6  # every later token hears it
    assert torch.equal(a.bwd()[..., j + 1:], b.bwd()[..., j + 1:])
    assert (a.bwd()[..., :j + 1] - b.bwd()[..., :j + 1]).abs().amax(1).min() > 1e-6


# -- block and model ---------------------------------------------------------------------------------------------------
def test_rms_norm_and_the_layer_order_match_a_hand_written_loop():
    model = tiny(depth=2)
    x = torch.randn(2, 3, 32, 32)
    t = model.embed(x)

    def rms(v, w):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    # Add -> Norm -> Mixer: block 0 starts the residual from the tokens, block 1 adds block 0's mixer output
    h0 = model.layers[0].mixer(rms(t, model.layers[0].norm.weight))
    h1 = model.layers[1].mixer(rms(t + h0, model.layers[1].norm.weight))
    expected = rms(t + h0 + h1, model.norm_f.weight)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_tokens(x), expected, rtol=1e-5, atol=1e-6)


def test_block_keeps_the_residual_in_float32():
    torch.manual_seed(0)
    block = VimBlock(VimMixer(8, d_state=4), RMSNorm(8)).to(torch.bfloat16)
    h = torch.randn(1, 5, 8, dtype=torch.bfloat16)
    out, res = block(h)
    assert out.dtype == torch.bfloat16 and res.dtype == torch.float32
    torch.testing.assert_close(res, h.float())
    out2, res2 = block(out, res)
    torch.testing.assert_close(res2, h.float() + out.float())


@pytest.mark.parametrize("img_size, patch, grid", [(32, 8, (4, 4)), (40, 8, (5, 5)), ((24, 40), 8, (3, 5))])
def test_cls_sits_at_m_over_2_and_the_head_reads_it(img_size, patch, grid):
    model = tiny(img_size=img_size, patch_size=patch)
    lay = model.layout
    m = grid[0] * grid[1]
    assert (lay.grid, lay.cls_index, lay.num_patches, lay.seq_len) == (grid, m // 2, m, m + 1)
    x = torch.randn(2, 3, *model.cfg.img_size)
    with torch.no_grad():
        patches = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = model.embed(x)
        cls = (model.cls_token + model.pos_embed[:, m // 2])[0]
        torch.testing.assert_close(tokens[:, lay.cls_index], cls.expand(2, -1))
        torch.testing.assert_close(tokens[:, lay.patch_slots()], patches + model.pos_embed[:, lay.patch_slots()])
        assert lay.patch_slots().tolist() == [i + (i >= m // 2) for i in range(m)]
        out = model.forward_tokens(x)
        logits = model(x)
        torch.testing.assert_close(logits, model.head(out[:, m // 2]))
        assert torch.equal(model.forward_features(x), out[:, m // 2])
        for other in (m // 2 - 1, m // 2 + 1):
            assert not torch.allclose(logits, model.head(out[:, other]), atol=1e-3)


def test_batch_of_two_equals_two_single_runs():
    model = tiny(depth=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, ssm = model.forward_tokens(x, return_ssm=True)
        for i in range(2):
            single, ssm1 = model.forward_tokens(x[i:i + 1], return_ssm=True)
            torch.testing.assert_close(tokens[i:i + 1], single, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ssm[-1].bwd_flipped[i:i + 1], ssm1[-1].bwd_flipped, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(tokens[0], tokens[1], atol=1e-3)


def test_model_ssm_outputs_per_layer_and_scan_impls_agree():
    model = tiny(depth=3, scan_impl="loop")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, ssm = model.forward_tokens(x, return_ssm=True)
        assert torch.equal(tokens, model.forward_tokens(x))
        assert len(ssm) == 3 and all(s.fwd.shape == (2, 32, 17) for s in ssm)
        # the last layer's exposed outputs are the ones its mixer computes from the stream it receives
        h, r = model.embed(x), None
        for layer in model.layers[:-1]:
            h, r = layer(h, r)
        _, _, last = model.layers[-1](h, r, return_ssm=True)
        assert torch.equal(last.fwd, ssm[-1].fwd) and torch.equal(last.bwd_flipped, ssm[-1].bwd_flipped)
        for layer in model.layers:
            layer.mixer.scan_impl = "parallel"
        torch.testing.assert_close(model.forward_tokens(x), tokens, rtol=1e-5, atol=1e-6)


def test_released_configs():
    with torch.device("meta"):
        t, s = vim_tiny(), vim_small()
    for model, dim, dt_rank, params in ((t, 192, 12, 7_148_008), (s, 384, 24, 25_796_584)):
        cfg, mix = model.cfg, model.layers[0].mixer
        assert (cfg.embed_dim, cfg.depth, cfg.d_state, cfg.rms_norm, cfg.residual_in_fp32, cfg.if_divide_out) == (
            dim, 24, 16, True, True, True)
        assert (mix.d_inner, mix.dt_rank, mix.d_conv, model.layout.grid, model.layout.cls_index) == (
            2 * dim, dt_rank, 4, (14, 14), 98)
        assert model.pos_embed.shape == (1, 197, dim) and model.head.out_features == 1000
        assert sum(p.numel() for p in model.parameters()) == params  # hustvl's README: 7M and 26M


# -- the loader --------------------------------------------------------------------------------------------------------
def hustvl_keys(depth: int, rms_norm: bool = True) -> set[str]:
    """The state-dict keys of hustvl's VisionMamba (models_mamba.py + mamba_simple.py, bimamba v2, middle CLS)."""
    norm = ["weight"] if rms_norm else ["weight", "bias"]
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "head.weight", "head.bias"}
    keys |= {f"norm_f.{p}" for p in norm}
    for i in range(depth):
        keys |= {f"layers.{i}.norm.{p}" for p in norm}
        keys |= {f"layers.{i}.mixer.{k}" for k in (
            "A_log", "D", "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
            "dt_proj.bias", "A_b_log", "D_b", "conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight",
            "dt_proj_b.weight", "dt_proj_b.bias", "out_proj.weight")}
    return keys


@pytest.mark.parametrize("rms_norm", [True, False])
def test_state_dict_uses_hustvl_names(rms_norm):
    assert set(tiny(depth=3, rms_norm=rms_norm).state_dict()) == hustvl_keys(3, rms_norm)


@pytest.mark.parametrize("wrapped", [True, False])
def test_loader_round_trip(tmp_path, wrapped):
    src, dst = tiny(seed=0), tiny(seed=1)
    path = tmp_path / "vim.pth"
    state = {k: v.clone() for k, v in src.state_dict().items()}
    # as hustvl's main.py saves it: the model under "model", next to the argparse namespace and training state
    torch.save({"model": state, "epoch": 299, "args": argparse.Namespace(model="vim_tiny", lr=5e-4)} if wrapped
               else state, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(src(x), dst(x), atol=1e-3)
        assert load_vim_checkpoint(dst, path) is dst
        assert torch.equal(src(x), dst(x))


def test_loader_names_missing_unexpected_and_misshaped_keys(tmp_path):
    model = tiny(depth=2)
    path = tmp_path / "vim.pth"
    state = model.state_dict()
    del state["layers.1.mixer.A_b_log"]
    state["layers.2.mixer.D"] = torch.ones(32)
    state["pos_embed"] = torch.zeros(1, 9, 16)
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=r"^path:") as err:
        load_vim_checkpoint(tiny(depth=2), path)
    msg = str(err.value)
    assert "missing (1): layers.1.mixer.A_b_log" in msg and "unexpected (1): layers.2.mixer.D" in msg
    assert "pos_embed (1, 9, 16) vs model (1, 17, 16)" in msg
    torch.save({"optimizer": {"lr": 1.0}}, path)
    with pytest.raises(ValueError, match=r"^path:.*neither a state dict"):
        load_vim_checkpoint(model, path)


@pytest.mark.parametrize("kw, name", [({"embed_dim": 0}, "embed_dim"), ({"depth": 1.5}, "depth"),
                                      ({"img_size": 32, "patch_size": 64}, "patch_size"),
                                      ({"img_size": (32,)}, "img_size"),
                                      ({"scan_impl": "cuda"}, "scan_impl"), ({"rms_norm": 1}, "rms_norm"),
                                      ({"drop_path_rate": 1.0}, "drop_path_rate"), ({"num_classes": -1}, "num_classes"),
                                      ({"dt_rank": 0}, "dt_rank"), ({"norm_epsilon": 0.0}, "norm_epsilon"),
                                      ({"channels": 3}, "channels")])
def test_bad_config_names_the_parameter(kw, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        vim_tiny(**kw)


def test_wrong_image_shape_names_x():
    with pytest.raises(ValueError, match=r"^x:"):
        tiny()(torch.randn(1, 3, 32, 24))


@pytest.mark.parametrize("length", [1, 7, 63])
@pytest.mark.parametrize("pruned", [False, True])
def test_stepped_scan_values_and_gradients_match_autograd_through_the_loop(length, pruned):
    x = scan_inputs(2, 5, 4, length, seed=length)
    keep = (torch.rand(2, length, generator=torch.Generator().manual_seed(3)) > 0.3) if pruned else None
    weight = torch.randn(2, 5, length, generator=torch.Generator().manual_seed(4))

    def run(impl):
        leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
        y = selective_scan_ref(**leaves, delta_softplus=True, keep=keep, impl=impl)
        (y * weight).sum().backward()
        return y, {k: v.grad for k, v in leaves.items()}

    y_loop, g_loop = run("loop")
    y_step, g_step = run("stepped")
    torch.testing.assert_close(y_step, y_loop, atol=1e-5, rtol=1e-5)
    for k in x:  # float32 sums in another order: relative to each gradient's scale
        scale = g_loop[k].abs().max().clamp(min=1e-6)
        assert (g_step[k] - g_loop[k]).abs().max() / scale < 1e-5, k
