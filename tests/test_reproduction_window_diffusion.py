"""The Window-Diffusion tiny preset: its measures, and a small run through the CLI that writes every table."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from prunelab.cli import main as cli
from prunelab.reproductions.window_diffusion import tiny

EOS = 9


def test_agreement_compares_up_to_the_longer_answer_and_its_eos():
    ref = torch.tensor([[1, 2, 3, EOS, EOS, EOS], [4, 5, EOS, EOS, EOS, EOS]])
    same = tiny.agreement(ref, ref, EOS)
    assert same == (1.0, 1.0)
    other = torch.tensor([[1, 2, 7, EOS, EOS, EOS], [4, 5, 6, 6, 6, 6]])
    tokens, answers = tiny.agreement(other, ref, EOS)
    assert answers == 0.0 and tokens == (3 + 2) / (4 + 6)  # 4 positions (3 + EOS) in row 0, all 6 in row 1


def test_char_accuracy_counts_characters_in_place_and_the_end():
    assert tiny.char_accuracy(["12 14"], ["12 14"]) == 1.0
    assert tiny.char_accuracy(["12 15"], ["12 14"]) == 5 / 6
    assert tiny.char_accuracy(["12"], ["12 14"]) == 2 / 6


def test_a_small_tiny_run_writes_its_tables(tmp_path):
    cli(["reproduce", "window_diffusion", "--preset", "tiny", "--lengths", "16", "--tasks", "count", "letters", "--n",
         "2", "--rounds", "1", "--text-length", "8", "--no-progress", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "speed.json").read_text())
    rows = saved["rows"]
    assert {r["task"] for r in rows} == {"count", "letters"} and set(saved["provenance"]["testbeds"]) == {"tasks",
                                                                                                         "letters"}
    by = {r["method"]: r for r in rows if r["task"] == "count"}
    assert set(by) == {"vanilla", "vanilla + EOS stop", "vanilla, matched MACs", *tiny.WINDOWS,
                       tiny.RELEASE + " + EOS stop"}
    assert by["vanilla"]["token_agreement"] == 1.0 and by["vanilla"]["bound"] == 1.0
    assert all(r["gmacs_per_seq"] < by["vanilla"]["gmacs_per_seq"] for r in rows if r["method"].startswith("window"))
    assert by["vanilla, matched MACs"]["steps"] < 16
    text = json.loads((tmp_path / "text.json").read_text())["rows"]
    assert [(r["testbed"], r["method"]) for r in text] == [(t, m) for t in ("tasks", "letters")
                                                           for m in ("vanilla", tiny.RELEASE, "random characters")]
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_weights_name_their_test_bed(tmp_path):
    assert tiny._weights_arg("letters=some/file.safetensors") == ("letters", "some/file.safetensors")
    with pytest.raises(argparse.ArgumentTypeError, match="TESTBED=PATH"):
        tiny._weights_arg("sort=x")
    with pytest.raises(ValueError, match="weights"):
        tiny.run_tiny(tmp_path, tasks=("count",), weights={"sort": "x"})
