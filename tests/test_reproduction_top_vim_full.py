"""ToP-ViM's full preset and fine-tuning script on a fake ImageNet folder (the smoke Vim, CPU)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from prunelab.cli import main
from prunelab.methods.top_vim import load_vim_checkpoint, read_vim_state_dict
from prunelab.reproductions.top_vim import full

SMOKE = ["--model", "smoke", "--workers", "0", "--batch-size", "4", "--no-progress"]


def _fake_imagenet(root, counts=(1, 2, 3)):
    """An ImageFolder with ``counts[i]`` images in class folder i (mixed sizes, PNG and JPEG)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, n in enumerate(counts):
        (root / f"n0000000{c}").mkdir(parents=True)
        for i in range(n):
            h, w = (40, 52) if i % 2 else (60, 36)
            img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            img.save(root / f"n0000000{c}" / f"img_{i}.{'png' if i % 2 else 'JPEG'}")
    return root


def _run_full(argv, out):
    """The full preset's own parser and ``run`` (the CLI's path without the dispatch)."""
    parser = argparse.ArgumentParser()
    full.add_arguments(parser)
    return full.run(parser.parse_args(argv), out)


def _predicting(cls: int) -> torch.nn.Module:
    """A smoke Vim whose head always predicts class ``cls``."""
    model = full.build_model("smoke")
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[cls] = 10.0
    return model


def test_expected_yaml_has_the_rows_with_source_and_confidence():
    exp = full.expected()
    assert exp["vim_s"]["dense"] == {"top1": 80.5, "gflops": 5.08}
    assert exp["vim_s"]["naive"] == {"top1": 74.8, "gflops": 3.57}
    assert exp["vim_s"]["top"] == {"top1": 78.8, "gflops": 3.60}
    assert [exp["vim_t"][k]["top1"] for k in ("dense", "naive", "top")] == [76.1, 71.3, 75.1]
    assert [exp["vim_t"][k]["gflops"] for k in ("dense", "naive", "top")] == [1.45, 1.28, 1.29]
    assert exp["plainmamba_l3"]["top"] == {"top1": 81.7, "gflops_change_pct": -41.6}
    assert exp["plainmamba_l3"]["dense"] == {"top1": 82.3, "gflops": 14.4}
    assert exp["plainmamba_l3"]["naive"] == {"top1": 79.3}
    ablation = exp["alignment_ablation_vim_s"]
    assert (ablation["without_alignment"]["top1"], ablation["with_alignment"]["top1"]) == (75.4, 78.8)
    for key, entry in exp.items():
        assert entry["source"] and entry["confidence"], key
    assert "AMVim" in exp["vim_s"]["source"] and "abstract" in exp["plainmamba_l3"]["source"]


def test_the_analytic_gflops_of_vim_s_match_the_cited_ones():
    from prunelab.methods.top_vim import ToPViM, dense_macs, top_vim_macs

    model = full.build_model("vim_s")
    exp = full.expected()["vim_s"]
    assert dense_macs(model) / 1e9 == pytest.approx(exp["dense"]["gflops"], abs=0.01)
    assert top_vim_macs(model, ToPViM(alignment="none")) / 1e9 == pytest.approx(exp["naive"]["gflops"], abs=0.01)
    assert top_vim_macs(model, ToPViM()) / 1e9 == pytest.approx(exp["top"]["gflops"], abs=0.015)


def test_full_preset_end_to_end_through_the_cli(tmp_path):
    data = _fake_imagenet(tmp_path / "val")
    out = tmp_path / "out"
    main(["reproduce", "top_vim", "--preset", "full", "--imagenet", str(data), "--no-pretrained", "--out", str(out),
          *SMOKE])
    result = json.loads((out / "table.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["dense", "EViT-style", "ToP-ViM"]
    assert rows["EViT-style"]["alignment"] == "none" and rows["ToP-ViM"]["alignment"] == "zero_slot"
    assert all(math.isfinite(r["gflops"]) and 0 <= r["top1"] <= 100 for r in rows.values())
    assert rows["EViT-style"]["gflops"] < rows["ToP-ViM"]["gflops"] < rows["dense"]["gflops"]
    assert rows["ToP-ViM"]["gflops_change_%"] < 0 and rows["dense"]["top1_change"] == 0
    assert rows["ToP-ViM"]["weights"] == "random, zero-shot" and rows["dense"]["paper_top1"] == "n/a"
    assert result["provenance"]["n_images"] == 6 and result["provenance"]["blocks"] == [1, 2, 3]
    assert "ToP-ViM" in (out / "table.md").read_text()


def test_checkpoints_load_into_their_rows(tmp_path):
    data = _fake_imagenet(tmp_path / "val")  # classes of 1, 2 and 3 images
    dense, tuned = tmp_path / "dense.pth", tmp_path / "tuned.pth"
    torch.save({"model": _predicting(2).state_dict()}, dense)  # right on 3 of 6 images
    torch.save({"model": _predicting(0).state_dict()}, tuned)  # right on 1 of 6
    result = _run_full(["--imagenet", str(data), "--checkpoint", str(dense), "--finetuned", str(tuned),
                        "--alignment", "decay_only", *SMOKE], tmp_path / "out")
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["dense"]["top1"] == pytest.approx(50.0) and rows["dense"]["weights"] == "dense"
    assert rows["EViT-style"]["top1"] == pytest.approx(50.0) and rows["EViT-style"]["weights"] == "dense, zero-shot"
    assert rows["ToP-ViM"]["top1"] == pytest.approx(100 / 6)
    assert rows["ToP-ViM"]["weights"] == "fine-tuned (--finetuned)"
    assert rows["ToP-ViM"]["alignment"] == "decay_only" and rows["ToP-ViM"]["top1_se"] > 0


def test_full_preset_argument_errors_name_the_option(tmp_path):
    data = _fake_imagenet(tmp_path / "val", counts=(1, 1))
    with pytest.raises(SystemExit, match="--checkpoint"):
        main(["reproduce", "top_vim", "--preset", "full", "--imagenet", str(data), "--out", str(tmp_path)])
    state = _predicting(0).state_dict()
    del state["norm_f.weight"]
    torch.save({"model": state}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="--checkpoint.*norm_f.weight"):
        _run_full(["--imagenet", str(data), "--checkpoint", str(tmp_path / "broken.pth"), *SMOKE], tmp_path)
    with pytest.raises(SystemExit, match="--blocks"):
        _run_full(["--imagenet", str(data), "--no-pretrained", "--blocks", "2", "4", *SMOKE], tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="--imagenet"):
        _run_full(["--imagenet", str(tmp_path / "empty"), "--no-pretrained", *SMOKE], tmp_path)


def test_the_lr_schedule_is_timm_cosine_stepped_after_each_epoch():
    from timm.scheduler import CosineLRScheduler

    from prunelab.reproductions.top_vim.finetune import lr_at

    args = argparse.Namespace(warmup_lr=1e-5, min_lr=1e-5, warmup_epochs=5, epochs=30)
    base = 5e-6 * 64 * 4 / 512  # Vim-S: the scripts' lr scaled by 4 GPUs x 64 images
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = CosineLRScheduler(opt, t_initial=30, lr_min=1e-5, warmup_lr_init=1e-5, warmup_t=5, cycle_limit=1)
    assert lr_at(0, base, args) == pytest.approx(opt.param_groups[0]["lr"])  # the warm-up lr before any step
    for epoch in range(1, 30):
        sched.step(epoch - 1)  # main.py: lr_scheduler.step(epoch) after training epoch
        assert lr_at(epoch, base, args) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
    lrs = [lr_at(e, base, args) for e in range(30)]  # the base lr lies below min-lr: down, then back up to 1e-5
    assert lrs[0] == lrs[1] == 1e-5 and min(lrs) == lrs[6] < 4e-6 and lrs[-1] == pytest.approx(1e-5, rel=0.01)


def test_finetune_runs_an_epoch_and_writes_a_loadable_checkpoint(tmp_path):
    from prunelab.reproductions.top_vim import finetune

    data = _fake_imagenet(tmp_path / "train")
    start = tmp_path / "dense.pth"
    torch.save({"model": full.build_model("smoke").state_dict()}, start)
    out = finetune.main(["--imagenet-train", str(data), "--checkpoint", str(start), "--out",
                         str(tmp_path / "ft" / "tuned.pth"), "--model", "smoke", "--epochs", "1", "--limit", "4",
                         "--batch-size", "2", "--workers", "0", "--no-progress"])
    model = load_vim_checkpoint(full.build_model("smoke"), out)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, read_vim_state_dict(start)[k])]
    assert changed  # the weights were trained
    saved = torch.load(out, weights_only=True)
    assert len(saved["train_loss"]) == 1 and math.isfinite(saved["train_loss"][0])
    assert saved["args"]["alignment"] == "zero_slot" and saved["args"]["keep_ratio"] == 0.8
    with pytest.raises(SystemExit):
        finetune.main(["--imagenet-train", str(data), "--out", str(tmp_path / "x.pth"), "--model", "smoke"])


def test_plain_mamba_l3_gflops_and_default_schedule():
    from prunelab.methods.top_vim import ToPViM

    model = full.build_model("plainmamba_l3")
    exp = full.expected()["plainmamba_l3"]
    dense = full.gflops(model, None)
    assert dense == pytest.approx(exp["dense"]["gflops"], abs=0.01)
    top = ToPViM(keep_ratio=full.PLAIN_KEEP_RATIO, alignment="gapped")
    assert top.prune_blocks(36) == (8, 15, 23)
    change = 100 * (full.gflops(model, top) / dense - 1)
    assert change == pytest.approx(exp["top"]["gflops_change_pct"], abs=1.0)  # -42.2 against the abstract's -41.6


PLAIN_SMOKE = ["--model", "plainmamba_smoke", *SMOKE[2:]]


def _mmcls_checkpoint(model, path):
    """``model`` saved as the PlainMamba release saves it (mmcv, mmcls ImageClassifier names)."""
    state = {(k.replace("head.", "head.fc.") if k.startswith("head.") else f"backbone.{k}"): v
             for k, v in model.state_dict().items()}
    torch.save({"meta": {}, "state_dict": state}, path)


def test_full_preset_plain_mamba_end_to_end(tmp_path):
    data = _fake_imagenet(tmp_path / "val")
    model = full.build_model("plainmamba_smoke")
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[2] = 10.0  # right on 3 of 6 images
    _mmcls_checkpoint(model, tmp_path / "l.pth")
    out = tmp_path / "out"
    main(["reproduce", "top_vim", "--preset", "full", "--imagenet", str(data), "--checkpoint", str(tmp_path / "l.pth"),
          "--out", str(out), *PLAIN_SMOKE])
    result = json.loads((out / "table.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["dense", "ToP-ViM without alignment", "ToP-ViM"]
    assert rows["ToP-ViM"]["alignment"] == "gapped" and rows["ToP-ViM without alignment"]["alignment"] == "none"
    assert all(r["top1"] == pytest.approx(50.0) for r in rows.values())
    assert rows["ToP-ViM"]["gflops"] == rows["ToP-ViM without alignment"]["gflops"] < rows["dense"]["gflops"]
    assert result["provenance"]["keep_ratio"] == full.PLAIN_KEEP_RATIO
    with pytest.raises(SystemExit, match="--alignment: PlainMamba supports"):
        _run_full(["--imagenet", str(data), "--no-pretrained", "--alignment", "zero_slot", *PLAIN_SMOKE], tmp_path)
    with pytest.raises(ValueError, match="--checkpoint.*does not fit this PlainMamba"):
        torch.save({"model": full.build_model("smoke").state_dict()}, tmp_path / "vim.pth")
        _run_full(["--imagenet", str(data), "--checkpoint", str(tmp_path / "vim.pth"), *PLAIN_SMOKE], tmp_path)


def test_finetune_plain_mamba_writes_a_loadable_checkpoint(tmp_path):
    from prunelab.methods.top_vim.checkpoint import load_plain_mamba_checkpoint, read_plain_mamba_state_dict
    from prunelab.reproductions.top_vim import finetune

    data = _fake_imagenet(tmp_path / "train")
    start = tmp_path / "l.pth"
    _mmcls_checkpoint(full.build_model("plainmamba_smoke"), start)
    out = finetune.main(["--imagenet-train", str(data), "--checkpoint", str(start), "--out",
                         str(tmp_path / "tuned.pth"), "--model", "plainmamba_smoke", "--epochs", "1", "--limit", "4",
                         "--batch-size", "2", "--workers", "0", "--no-progress"])
    model = load_plain_mamba_checkpoint(full.build_model("plainmamba_smoke"), out)
    before = read_plain_mamba_state_dict(start)
    assert [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    saved = torch.load(out, weights_only=True)
    assert saved["args"]["alignment"] == "gapped" and saved["args"]["keep_ratio"] == full.PLAIN_KEEP_RATIO


def test_randaugment_posterize_keeps_zero_bits():
    from PIL import Image
    from timm.data import create_transform

    from prunelab.reproductions.top_vim.finetune import zero_bit_posterize

    transform = zero_bit_posterize(create_transform(input_size=32, is_training=True,
                                                    auto_augment="rand-m9-mstd0.5-inc1"))
    ops = [op for t in transform.transforms if hasattr(t, "ops") for op in t.ops if op.name.startswith("Posterize")]
    assert ops
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert ops[0].aug_fn(img, 0).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert ops[0].aug_fn(img, 4).getpixel((0, 0)) == (192, 96, 48)
