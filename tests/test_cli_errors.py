"""Bad command-line values end in an argparse error (exit status 2) naming the option, before any model loads."""

from __future__ import annotations

import argparse

import pytest

from prunelab.cli import BUDGET, POSITIVE, RATIO, looks_like_path, main, model_arg


def _fails(argv: list[str], option: str, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert option in err, err
    return err


def test_zero_tprune_full_without_imagenet_names_it(capsys):
    err = _fails(["reproduce", "zero_tprune", "--preset", "full"], "--imagenet", capsys)
    assert "required" in err


@pytest.fixture
def folder(tmp_path):
    return str(tmp_path)


CASES = {
    "zero_tprune tiny": (["reproduce", "zero_tprune"], [
        ("--n-eval", "0"), ("--n-eval", "10001"), ("--n-eval", "many"), ("--batch-size", "-1"),
        ("--throughput-batch", "0"), ("--fractions", "1.5"), ("--fractions", "nan"), ("--data", "/nonexistent"),
        ("--rounds", "0"), ("--weights", "/nonexistent.safetensors")]),
    "zero_tprune full": (["reproduce", "zero_tprune", "--preset", "full", "--imagenet", "{folder}"], [
        ("--imagenet", "/nonexistent"), ("--batch-size", "0"), ("--throughput-batch", "0"), ("--workers", "-1"),
        ("--limit", "0")]),
    "dtop tiny": (["reproduce", "dtop"], [
        ("--n-test", "0"), ("--p0", "1.5"), ("--p0", "nan"), ("--k", "-1"), ("--bootstrap", "0"),
        ("--timing-batch", "0"), ("--rounds", "0"), ("--data", "/nonexistent")]),
    "dtop full": (["reproduce", "dtop", "--preset", "full", "--ade20k", "{folder}"], [
        ("--ade20k", "/nonexistent"), ("--model", "vit_h"), ("--checkpoint", "/nonexistent.pth"), ("--p0", "2"),
        ("--k", "-1"), ("--limit", "0")]),
    "fasa tiny": (["reproduce", "fasa"], [
        ("--windows", "0"), ("--prefix", "-5"), ("--steps", "0"), ("--budgets", "0"), ("--budgets", "2.5"),
        ("--budgets", "abc"), ("--passkey-contexts", "0"), ("--depths", "1.2"), ("--passkey-budget", "0"),
        ("--latency-contexts", "-1")]),
    "fasa full": (["reproduce", "fasa", "--preset", "full", "--model", "org/name", "--longbench", "{folder}"], [
        ("--model", "/nonexistent"), ("--model", "./nope"), ("--tokenizer", "~/no/such/tokenizer"),
        ("--longbench", "/nonexistent"), ("--limit", "0"), ("--budgets", "1.5"), ("--n-fc", "0"),
        ("--calibration", "/nonexistent.json"), ("--cal-samples", "0"), ("--cal-ks", "0"), ("--max-length", "0"),
        ("--prompts", "/nonexistent.json")]),
    "divprune tiny": (["reproduce", "divprune"], [
        ("--ratios", "0"), ("--ratios", "1.5"), ("--prompts", "0"), ("--decode-steps", "-1"), ("--warmup", "-1"),
        ("--repeat", "0"), ("--seed", "-1")]),
    "hiprune tiny": (["reproduce", "hiprune"], [("--ratios", "-0.1"), ("--repeat", "x")]),
    "divprune full": (["reproduce", "divprune", "--preset", "full"], [
        ("--budgets", "0"), ("--budgets", "1.5"), ("--limit", "0"), ("--batch-size", "0"),
        ("--include-path", "/nonexistent"), ("--method-args", "no_equals_sign")]),
    "hiprune full": (["reproduce", "hiprune", "--preset", "full"], [("--budgets", "-64"), ("--limit", "-1")]),
    "calibrate fasa": (["calibrate", "fasa", "--model", "smollm2", "--out", "{folder}/c.json"], [
        ("--model", "/nonexistent"), ("--windows", "0"), ("--window-len", "0"), ("--queries", "0"), ("--ks", "0"),
        ("--text", "/nonexistent.txt")]),
}


@pytest.mark.parametrize("preset,option,value", [(p, o, v) for p, (_, bad) in CASES.items() for o, v in bad])
def test_bad_values_exit_2_naming_the_option(preset, option, value, folder, capsys):
    base = [a.replace("{folder}", folder) for a in CASES[preset][0]]
    _fails([*base, option, value], option, capsys)


def test_calibrate_with_a_missing_model_path_names_model(capsys):
    err = _fails(["calibrate", "fasa", "--model", "/nonexistent", "--out", "c.json"], "--model", capsys)
    assert "does not exist" in err and "alphanumeric" not in err


def test_argument_types_accept_good_values(tmp_path):
    assert POSITIVE("3") == 3 and RATIO("1") == 1.0 and RATIO("0.25") == 0.25
    assert BUDGET("64") == 64 and isinstance(BUDGET("64"), int) and isinstance(BUDGET("1.0"), float)
    for hub_id in ("smollm2", "meta-llama/Llama-3.1-8B-Instruct", "llava-hf/llava-1.5-7b-hf"):
        assert not looks_like_path(hub_id) and model_arg(hub_id) == hub_id
    assert all(looks_like_path(p) for p in ("/models/x", "./x", "~/x", "../x", "runs/a/b", "a\\b"))
    assert model_arg(str(tmp_path)) == str(tmp_path)
    with pytest.raises(argparse.ArgumentTypeError, match="must lie in"):
        BUDGET("1.5")
