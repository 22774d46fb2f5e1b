"""The Zero-TPrune reproduction: CLI, the full preset's pipeline on a fake ImageFolder, expected.yaml."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prunelab.cli import main
from prunelab.reproductions.zero_tprune import full


def test_cli_list_names_the_method(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "zero_tprune" in out and "ZeroTPrune" in out and "prunelab.common.vit" in out


def test_cli_reproduce_help_shows_the_preset_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "zero_tprune", "--help"])
    assert exc.value.code == 0
    assert "--n-eval" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["reproduce", "zero_tprune", "--preset", "full", "--help"])
    assert "--imagenet" in capsys.readouterr().out


def test_cli_rejects_unknown_paper(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "not_a_paper"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_expected_yaml_has_sources():
    exp = full.expected()["deit_small_patch16_224"]
    assert exp["source"] and exp["dense"]["gflops"] == 4.6 and exp["zero_tprune"]["gflops"] == 3.0


def test_full_preset_pipeline_on_a_fake_imagenet(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(3):
        folder = tmp_path / "val" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{j}.png")
    out = tmp_path / "out"
    main(["reproduce", "zero_tprune", "--preset", "full", "--imagenet", str(tmp_path / "val"), "--out", str(out),
          "--model", "deit_tiny_patch16_224", "--no-pretrained", "--batch-size", "4", "--workers", "0",
          "--throughput-batch", "2", "--no-progress"])
    result = json.loads((out / "table.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "Zero-TPrune", "random drop"}
    assert rows["Zero-TPrune"]["gflops"] == rows["random drop"]["gflops"] < rows["dense"]["gflops"]
    assert all(0 <= r["top1"] <= 100 and r["throughput_img_s"] > 0 for r in rows.values())
    assert result["provenance"]["n_eval"] == 6 and "commit" in result["provenance"]


def test_full_preset_missing_data_names_the_argument(tmp_path, capsys):
    """A missing or absent --imagenet is an argparse error (status 2), before timm loads any model."""
    for given in (["--imagenet", str(tmp_path / "nope")], []):
        with pytest.raises(SystemExit) as exc:
            main(["reproduce", "zero_tprune", "--preset", "full", *given, "--model", "deit_tiny_patch16_224",
                  "--no-pretrained", "--out", str(tmp_path / "o")])
        assert exc.value.code == 2 and "--imagenet" in capsys.readouterr().err
