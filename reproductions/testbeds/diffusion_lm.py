"""The diffusion-LM test-bed: a small masked diffusion LM (LLaDA's objective) trained here on CPython's ``pydoc_data``.

Window-Diffusion accelerates LLaDA and Dream, whose weights cannot be downloaded here, and SmolLM2 (the one packaged
language model) is causal. So this test-bed is trained from scratch: a LLaDA-shaped :class:`DiffusionLM` (Llama
blocks, bidirectional, width 256, 4 layers, 3.5 M parameters) over **characters** of the pydoc topic texts that ship
with CPython (``pydoc_data.topics``, 465k characters, 79 topics; the last tenth of every topic is held out). Why
characters: a 106-symbol vocabulary keeps the head small, so a CPU step goes to the transformer, and 465k characters
are about 14 passes in 20 minutes; with SmolLM2's 49k-token vocabulary the head would dominate and the text would be
about 120k tokens.

Objective (LLaDA, Nie et al., arXiv 2502.09992, Eq. 3): for each sequence draw t ~ U(eps, 1), mask every character
with probability t, and minimise the cross-entropy on the masked characters weighted by 1 / t, averaged over all
characters of the batch. ``python -m prunelab.reproductions.testbeds.diffusion_lm`` trains it (deterministic at a
fixed thread count) and writes the weights (fp16, SHA-256 in :data:`SHA256`) with the training record and the
held-out masked-character accuracy at several mask ratios next to the majority-character baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prunelab.methods.window_diffusion import DiffusionLM
from prunelab.reproductions.testbeds import shipped
from prunelab.reproductions.testbeds.training import warmup_cosine

WEIGHTS = Path(__file__).with_name("weights") / "diffusion_lm.safetensors"
SHA256 = "6d15b20d1fb756c5554ea5055183cb1b7e81cddd1d95fd78c4f793904df8ef45"
COMMAND = "python -m prunelab.reproductions.testbeds.diffusion_lm"
EVAL_RATIOS = (0.15, 0.5, 0.9)

__all__ = ["DLMConfig", "corpus", "Charset", "build", "train", "masked_accuracy", "held_out_accuracy", "save", "load",
           "report", "main"]


@dataclasses.dataclass(frozen=True)
class DLMConfig:
    """Architecture and recipe; the defaults are the shipped test-bed's."""

    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 768
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1500
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.03
    eps: float = 1e-3  # the smallest mask ratio drawn
    seed: int = 0


def corpus() -> tuple[str, str]:
    """(train text, held-out text): the pydoc topics sorted by name, the last tenth of each held out, joined by
    blank lines."""
    from pydoc_data.topics import topics

    cuts = [(topics[n], len(topics[n]) * 9 // 10) for n in sorted(topics)]
    return "\n\n".join(t[:c] for t, c in cuts), "\n\n".join(t[c:] for t, c in cuts)


@dataclasses.dataclass(frozen=True)
class Charset:
    """The characters of the corpus, then the EOS (also the padding) and the mask symbol."""

    chars: str

    @classmethod
    def of(cls, text: str) -> Charset:
        return cls("".join(sorted(set(text))))

    @property
    def eos_id(self) -> int:
        return len(self.chars)

    @property
    def mask_id(self) -> int:
        return len(self.chars) + 1

    @property
    def size(self) -> int:
        return len(self.chars) + 2

    def encode(self, text: str) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ValueError(f"text: characters outside the test-bed's charset: {unknown[:10]}")
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        out = []
        for i in torch.as_tensor(ids).tolist():
            out.append(self.chars[i] if i < len(self.chars) else ("<eos>" if i == self.eos_id else "_"))
        return "".join(out)


def build(cfg: DLMConfig, charset: Charset) -> DiffusionLM:
    """A fresh model for ``cfg`` over ``charset``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=charset.size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    return DiffusionLM(LlamaForCausalLM(config), mask_id=charset.mask_id, eos_id=charset.eos_id)


def llada_loss(model: DiffusionLM, x: torch.Tensor, generator: torch.Generator, eps: float) -> torch.Tensor:
    """LLaDA's pre-training loss on clean sequences ``x`` [B, L]: mask with a ratio t ~ U(eps, 1) per sequence,
    cross-entropy on the masked positions weighted by 1 / t, averaged over all B L positions."""
    B, L = x.shape
    t = eps + (1 - eps) * torch.rand(B, 1, generator=generator)
    masked = torch.rand(B, L, generator=generator) < t
    logits = model(torch.where(masked, model.mask_id, x))
    ce = F.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="none").view(B, L)
    return (ce * masked / t).sum() / (B * L)


def train(cfg: DLMConfig | None = None, *, progress: bool = True) -> tuple[DiffusionLM, dict]:
    """Train a fresh test-bed on random windows of the training text; returns the model (fp16-rounded, eval) and
    its training record."""
    cfg = cfg or DLMConfig()
    text, _ = corpus()
    charset = Charset.of("".join(corpus()))
    data = charset.encode(text)
    torch.manual_seed(cfg.seed)
    model = build(cfg, charset)
    gen = torch.Generator().manual_seed(cfg.seed)

    def batch_loss(step: int) -> torch.Tensor:
        starts = torch.randint(0, len(data) - cfg.seq_len, (cfg.batch_size,), generator=gen)
        return llada_loss(model, torch.stack([data[s:s + cfg.seq_len] for s in starts.tolist()]), gen, cfg.eps)

    losses, seconds = optimise(model, batch_loss, cfg, desc="train diffusion LM", progress=progress)
    info = {"config": dataclasses.asdict(cfg), "charset": charset.chars, "train_seconds": seconds,
            "characters_seen": cfg.steps * cfg.batch_size * cfg.seq_len, "loss_first_last": loss_ends(losses),
            "torch_version": torch.__version__, "threads": torch.get_num_threads()}
    return model, info


def optimise(model: DiffusionLM, batch_loss, cfg, *, desc: str, progress: bool = True
             ) -> tuple[list[float], float]:
    """The test-beds' loop: ``cfg.steps`` AdamW steps (``cfg.lr`` with warm-up and cosine decay, ``cfg.weight_decay``,
    gradients clipped at 1) on ``batch_loss(step)``; then the weights rounded to fp16 (what ships) and eval mode.
    Returns the losses and the seconds taken."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    losses, start = [], time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(step / cfg.steps, cfg.lr, cfg.warmup_frac)
        loss = batch_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(t.half().float())
    model.eval()
    return losses, round(time.perf_counter() - start, 1)


def loss_ends(losses: list[float]) -> list[float]:
    """The mean loss of the first and of the last quarter (at most 50 steps each) of a run."""
    w = min(50, max(1, len(losses) // 4))
    return [sum(losses[:w]) / w, sum(losses[-w:]) / w]


@torch.no_grad()
def masked_accuracy(model: DiffusionLM, text: str, charset: Charset, ratio: float, *, windows: int = 64,
                    seq_len: int = 256, seed: int = 0) -> tuple[float, float]:
    """(accuracy, majority-character baseline) of predicting masked characters of ``text`` at mask ratio ``ratio``,
    over ``windows`` seeded windows of ``seq_len`` characters."""
    data = charset.encode(text)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq_len, (windows,), generator=gen)
    x = torch.stack([data[s:s + seq_len] for s in starts.tolist()])
    masked = torch.rand(x.shape, generator=gen) < ratio
    pred = model(torch.where(masked, model.mask_id, x)).argmax(-1)
    majority = torch.bincount(charset.encode(corpus()[0])).argmax()
    hits, base = (pred == x)[masked].float().mean(), (x == majority)[masked].float().mean()
    return float(hits), float(base)


def save(model: DiffusionLM, info: dict, path: str | Path = WEIGHTS) -> str:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in model.lm.state_dict().items()}, str(path),
              metadata={"info": json.dumps(info)})
    return shipped.sha256(path)


def load(path: str | Path | None = None, *, check: bool = True) -> tuple[DiffusionLM, Charset, dict]:
    """The trained test-bed (fp32, eval), its charset and its training record; the shipped file is checked against
    :data:`SHA256`."""
    from safetensors.torch import load_file

    path, meta = shipped.metadata(path, WEIGHTS, SHA256, COMMAND, check=check)
    if "info" not in meta:
        raise ValueError(f"path: {path} carries no training info; write it with diffusion_lm.save()")
    info = json.loads(meta["info"])
    charset = Charset(info["charset"])
    model = build(DLMConfig(**info["config"]), charset)
    model.lm.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
    return model.eval(), charset, info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=COMMAND, description="Train the diffusion-LM test-bed and write its weights.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it in the last bits)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--out", default=str(WEIGHTS), help="the weights file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = DLMConfig() if args.steps is None else DLMConfig(steps=args.steps)
    model, info = train(cfg)
    info["held_out"] = held_out_accuracy(model, Charset(info["charset"]))
    return report(model, info, args.out)


def held_out_accuracy(model: DiffusionLM, charset: Charset) -> dict:
    """:func:`masked_accuracy` on the held-out text at each of :data:`EVAL_RATIOS`, as the weights record it."""
    held = corpus()[1]
    return {str(r): dict(zip(("accuracy", "majority_baseline"), masked_accuracy(model, held, charset, r)))
            for r in EVAL_RATIOS}


def report(model: DiffusionLM, info: dict, out: str | Path) -> dict:
    """Save the weights with ``info``, print the record and the checksum; returns ``info``."""
    digest = save(model, info, out)
    print(json.dumps(info, indent=2))
    print(f"wrote {out} (SHA-256 {digest})", flush=True)
    return info


if __name__ == "__main__":
    main()
