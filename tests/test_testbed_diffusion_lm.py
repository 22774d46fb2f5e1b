"""The diffusion-LM test-bed: the corpus split, the charset, LLaDA's loss, a short run that round-trips, and the
shipped weights (checksum, held-out masked-character accuracy far above the majority baseline)."""

from __future__ import annotations

import pytest
import torch

from prunelab.reproductions.testbeds import diffusion_lm as dlm
from prunelab.reproductions.testbeds import shipped

SMALL = dlm.DLMConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64, seq_len=32, batch_size=4, steps=40,
                      lr=3e-3)


def test_corpus_split_and_charset():
    train, held = dlm.corpus()
    assert 400_000 < len(train) and 40_000 < len(held) < 60_000
    charset = dlm.Charset.of(train + held)
    assert charset.decode(charset.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
    assert (charset.eos_id, charset.mask_id, charset.size) == (len(charset.chars), len(charset.chars) + 1,
                                                              len(charset.chars) + 2)
    with pytest.raises(ValueError, match="text: characters outside"):
        charset.encode("\u2603")


def test_llada_loss_weights_masked_characters_by_one_over_t():
    charset = dlm.Charset.of("abc")
    model = dlm.build(SMALL, charset)
    x = torch.randint(0, 3, (2, 8))
    loss = dlm.llada_loss(model, x, torch.Generator().manual_seed(0), eps=1e-3)
    g = torch.Generator().manual_seed(0)  # the same draws, by hand
    t = 1e-3 + (1 - 1e-3) * torch.rand(2, 1, generator=g)
    masked = torch.rand(2, 8, generator=g) < t
    ce = torch.nn.functional.cross_entropy(model(torch.where(masked, model.mask_id, x)).flatten(0, 1), x.flatten(),
                                           reduction="none").view(2, 8)
    torch.testing.assert_close(loss, (ce * masked / t).sum() / 16)


def test_a_short_run_learns_and_round_trips(tmp_path):
    model, info = dlm.train(SMALL, progress=False)
    first, last = info["loss_first_last"]
    assert last < first
    path = tmp_path / "dlm.safetensors"
    dlm.save(model, info, path)
    loaded, charset, meta = dlm.load(path)
    x = charset.encode("for x in y:")[None]
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["config"]["hidden_size"] == 32


def test_shipped_weights_checksum():
    assert shipped.sha256(dlm.WEIGHTS) == dlm.SHA256


def test_a_wrong_checksum_is_refused(monkeypatch):
    monkeypatch.setattr(dlm, "SHA256", "0" * 64)
    with pytest.raises(ValueError, match="SHA-256"):
        dlm.load()


def test_the_shipped_model_reads_its_context():
    model, charset, info = dlm.load()
    held = dlm.corpus()[1]
    accuracy, baseline = dlm.masked_accuracy(model, held, charset, 0.15, windows=16)
    assert accuracy > baseline + 0.3  # far above predicting the majority character (the space)
    assert info["held_out"]["0.15"]["accuracy"] > info["held_out"]["0.9"]["accuracy"]  # more context, more right
