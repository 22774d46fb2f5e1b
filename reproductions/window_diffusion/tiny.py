"""Tiny preset: Window-Diffusion against LLaDA's vanilla sampler on the diffusion-LM test-bed trained here (CPU).

The claim tested (Zuo et al., arXiv 2601.20332, abstract): "a large speed-up while largely preserving generation",
"under matched compute budgets". The hosts are the task test-beds
(:mod:`prunelab.reproductions.testbeds.diffusion_tasks`: a 4-layer LLaDA-shaped model trained here on pydoc text,
then fine-tuned on tasks with exact answers), each task on the test-bed trained on it: ``letters`` on the one that
solves most of its held-out instances, ``count`` and ``repeat`` on the one that learned their format only. So matched
output is checked against the right answer as well as against the vanilla sampler. Every sampler runs one token per
step (steps = G), greedy, as the paper evaluates LLaDA.

Rows per task and answer canvas G (a batch of instances of ``--split``, runs interleaved round by round):

- ``vanilla``: LLaDA's single-block low-confidence sampler, the reference of every ratio;
- ``vanilla, matched MACs``: the same sampler with fewer steps (several tokens per step), as many as bring its MACs
  to those of the release's window: the baseline at the same compute budget;
- ``window w/a/R``: Window-Diffusion (window tokens, active tokens, refresh cycle), the release's 64/16/32 and two
  other settings;
- ``... + EOS stop``: the same with the loop ended once every answer is settled (an EOS with no mask before it),
  which the LLaDA release does not do; it splits the speed-up into what pruning and what the early stop give.

Columns: seconds and generated tokens per second per sequence (median over rounds), MACs per sequence
(:mod:`prunelab.methods.window_diffusion.flops`), the speed-up against vanilla (median of the per-round ratios,
spread = IQR or min-max under four rounds), the MACs bound (vanilla MACs / the row's MACs) and the speed-up as a share
of it, the token agreement with vanilla (answer positions, up to the first EOS of either), the share of answers equal
to vanilla's, and the exact-answer accuracy.

A text table adds the quality measures on free text (held-out pydoc prompts continued for ``--text-length``
characters), per test-bed used: the log-likelihood per SmolLM2 token of the continuation given the prompt, distinct
word bigrams, the share of spaces, for vanilla, the release window and uniformly random characters.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from prunelab.cli import POSITIVE
from prunelab.common.provenance import provenance, write_results
from prunelab.common.timing import ratio_summary
from prunelab.methods.window_diffusion import WindowDiffusion, llada_generate, run_macs, window_generate
from prunelab.reproductions.testbeds import diffusion_lm, diffusion_tasks, shipped

LENGTHS = (64, 128, 256, 512)
WINDOWS = {"window 64/16/32 (release)": WindowDiffusion(), "window 32/8/16": WindowDiffusion(32, 8, 16),
           "window 128/32/32": WindowDiffusion(128, 32, 32)}
RELEASE = "window 64/16/32 (release)"
COLUMNS = ["task", "G", "method", "steps", "s_per_seq", "tokens_per_s", "gmacs_per_seq", "speedup", "spread", "bound",
           "of_bound", "token_agreement", "same_answer", "char_accuracy", "exact"]
TEXT_COLUMNS = ["testbed", "method", "G", "smollm2_loglik_per_token", "distinct_2", "space_share", "token_agreement"]

__all__ = ["add_arguments", "run", "run_tiny", "default_out", "agreement", "char_accuracy"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=POSITIVE, nargs="+", default=list(LENGTHS), help="answer canvases G")
    parser.add_argument("--tasks", nargs="+", choices=diffusion_tasks.TASKS, default=list(diffusion_tasks.TASKS))
    parser.add_argument("--n", type=POSITIVE, default=4, help="instances per task and G (one batch)")
    parser.add_argument("--split", choices=("held_out", "train"), default="held_out",
                        help="instances held out of the test-beds' training, or drawn as training draws them")
    parser.add_argument("--rounds", type=POSITIVE, default=3, help="interleaved timing rounds")
    parser.add_argument("--text-length", type=POSITIVE, default=128, help="characters of free-text continuation")
    parser.add_argument("--weights", nargs="+", default=[], metavar="TESTBED=PATH", type=_weights_arg,
                        help="weights files replacing shipped test-beds (names: "
                        f"{', '.join(diffusion_tasks.TESTBEDS)})")
    parser.add_argument("--no-progress", action="store_true", help="hide progress lines")


def run(args: argparse.Namespace, out: Path) -> dict:
    return run_tiny(out, lengths=args.lengths, tasks=args.tasks, n=args.n, rounds=args.rounds, split=args.split,
                    text_length=args.text_length, weights=dict(args.weights), progress=not args.no_progress)


def _weights_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or name not in diffusion_tasks.TESTBEDS:
        raise argparse.ArgumentTypeError(f"expected TESTBED=PATH with TESTBED one of "
                                         f"{tuple(diffusion_tasks.TESTBEDS)}, got {text!r}")
    return name, path


def default_out() -> Path:
    return Path("runs") / "window_diffusion" / "tiny"


def agreement(answers: torch.Tensor, reference: torch.Tensor, eos: int) -> tuple[float, float]:
    """(token agreement, share of equal answers) of ``answers`` with ``reference`` [B, G]: positions compared up to
    the longer of the two answers cut at their first EOS (at least one position)."""
    same, total, equal = 0, 0, 0
    for a, r in zip(answers.tolist(), reference.tolist()):
        cut_a, cut_r = diffusion_tasks.cut_at_eos(a, eos), diffusion_tasks.cut_at_eos(r, eos)
        n = max(len(cut_a), len(cut_r)) + 1  # the EOS that ends the answer counts too
        n = min(n, len(a))
        same += sum(x == y for x, y in zip(a[:n], r[:n]))
        total += n
        equal += cut_a == cut_r
    return same / total, equal / len(answers)


def char_accuracy(answers: list[str], expected: list[str]) -> float:
    """The share of the expected answers' characters, and of the EOS after each, that the answers have in place."""
    hits = total = 0
    for a, e in zip(answers, expected):
        hits += sum(x == y for x, y in zip(a, e)) + (len(a) == len(e))
        total += len(e) + 1
    return hits / total


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _samplers(model, prompts, G: int, matched_steps: int | None) -> dict:
    """The rows' samplers, by name (``matched_steps`` None: the matched-MACs row is left out)."""
    runs = {"vanilla": lambda: llada_generate(model, prompts, G),
            "vanilla + EOS stop": lambda: llada_generate(model, prompts, G, early_stop=True)}
    if matched_steps is not None:
        runs["vanilla, matched MACs"] = lambda: llada_generate(model, prompts, G, matched_steps)
    for name, method in WINDOWS.items():
        runs[name] = lambda m=method: window_generate(model, prompts, G, m)
    runs[RELEASE + " + EOS stop"] = lambda: window_generate(model, prompts, G, WINDOWS[RELEASE], early_stop=True)
    return runs


def measure(model, charset, task: str, G: int, n: int, rounds: int, split: str = "held_out") -> list[dict]:
    """The rows of one task and canvas (module docstring), on ``n`` instances of ``split``."""
    items = diffusion_tasks.examples(task, G, n, split=split)
    prompts = diffusion_tasks.prompts_of(items, charset)
    cfg, eos = model.config, charset.eos_id
    vanilla_macs = run_macs(cfg, llada_generate(model, prompts[:1], G, 1).log) * G  # a vanilla step's MACs x G
    release_macs = run_macs(cfg, window_generate(model, prompts, G, WINDOWS[RELEASE]).log)
    matched = max(1, round(G * release_macs / vanilla_macs))
    runs = _samplers(model, prompts, G, matched)
    times, outs = {k: [] for k in runs}, {}
    for _ in range(rounds):
        for name, fn in runs.items():
            t, outs[name] = _timed(fn)
            times[name].append(t)
    reference, rows = outs["vanilla"], []
    for name in runs:
        gen = outs[name]
        macs = run_macs(cfg, gen.log)
        speedup, spread = ratio_summary(times["vanilla"], times[name])
        tokens, same = agreement(gen.answer, reference.answer, eos)
        got = diffusion_tasks.answers(gen, charset)
        bound = run_macs(cfg, reference.log) / macs
        rows.append({"task": task, "G": G, "method": name, "steps": len(gen.log),
                     "s_per_seq": statistics.median(times[name]) / n,
                     "tokens_per_s": n * G / statistics.median(times[name]), "gmacs_per_seq": macs / 1e9,
                     "speedup": speedup, "spread": spread, "bound": bound, "of_bound": speedup / bound,
                     "token_agreement": tokens, "same_answer": same,
                     "char_accuracy": char_accuracy(got, [e.answer for e in items]),
                     "exact": sum(g == e.answer for g, e in zip(got, items)) / n})
    return rows


def _distinct_2(text: str) -> float:
    words = text.split()
    pairs = list(zip(words, words[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 0.0


@torch.no_grad()
def _loglik(lm, tokenizer, prompt: str, continuation: str) -> float:
    """Mean log-likelihood per SmolLM2 token of ``continuation`` after ``prompt``."""
    p = tokenizer(prompt, return_tensors="pt").input_ids
    c = tokenizer(continuation, return_tensors="pt", add_special_tokens=False).input_ids
    if c.numel() == 0:
        return float("nan")
    ids = torch.cat([p, c], 1)
    logp = torch.log_softmax(lm(ids).logits[0, p.shape[1] - 1:-1].float(), -1)
    return float(logp.gather(-1, c[0][:, None]).mean())


def text_quality(model, charset, G: int, n: int, scorer, testbed: str, prompt_chars: int = 96) -> list[dict]:
    """Free-text continuations of held-out pydoc prompts, scored by SmolLM2 (``scorer``: its model and tokenizer;
    module docstring)."""
    held = charset.encode(diffusion_lm.corpus()[1])
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(held) - prompt_chars, (n,), generator=g).tolist()
    prompts = [held[s:s + prompt_chars] for s in starts]
    vanilla = llada_generate(model, prompts, G)
    window = window_generate(model, prompts, G, WINDOWS[RELEASE])
    rand = torch.randint(0, len(charset.chars), (n, G), generator=g)
    lm, tokenizer = scorer
    rows = []
    for name, answers in (("vanilla", vanilla.answer), (RELEASE, window.answer), ("random characters", rand)):
        texts = [charset.decode(diffusion_tasks.cut_at_eos(a, charset.eos_id)) for a in answers.tolist()]
        lls = [_loglik(lm, tokenizer, charset.decode(p), t) for p, t in zip(prompts, texts)]
        lls = [x for x in lls if not math.isnan(x)]
        rows.append({"testbed": testbed, "method": name, "G": G,
                     "smollm2_loglik_per_token": statistics.mean(lls) if lls else float("nan"),
                     "distinct_2": statistics.mean(_distinct_2(t) for t in texts),
                     "space_share": sum(t.count(" ") for t in texts) / max(1, sum(len(t) for t in texts)),
                     "token_agreement": agreement(answers, vanilla.answer, charset.eos_id)[0]})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    tasks = sorted({r["task"] for r in rows})
    for name in [RELEASE, RELEASE + " + EOS stop", "window 32/8/16", "window 128/32/32"]:
        for task, style in zip(tasks, ("-", "--", ":")):
            pts = sorted((r["G"], r["speedup"], r["bound"]) for r in rows if r["method"] == name and r["task"] == task)
            if pts:
                line, = axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                                     label=f"{name}, {task}")
                if name == RELEASE:
                    axes[0].plot([p[0] for p in pts], [p[2] for p in pts], style, color=line.get_color(), alpha=0.35,
                                 label=f"MACs bound, {task}")
    for name in ["vanilla, matched MACs", RELEASE, RELEASE + " + EOS stop", "window 32/8/16", "window 128/32/32"]:
        for task, style in zip(tasks, ("-", "--", ":")):
            pts = sorted((r["G"], r["token_agreement"]) for r in rows if r["method"] == name and r["task"] == task)
            if pts:
                axes[1].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{name}, {task}")
    axes[0].set(xscale="log", xlabel="answer canvas G", ylabel="speed-up over vanilla (wall clock)",
                title="speed-up and its MACs bound")
    axes[1].set(xscale="log", xlabel="answer canvas G", ylabel="token agreement with vanilla", ylim=(-0.05, 1.05),
                title="agreement with the vanilla sampler")
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_tiny(out: str | Path, *, lengths=LENGTHS, tasks=diffusion_tasks.TASKS, n: int = 4, rounds: int = 3,
             split: str = "held_out", text_length: int = 128, weights: dict[str, str] | None = None,
             progress: bool = True) -> dict:
    """The tables and the plot (module docstring) into ``out``; ``weights`` maps test-bed names to weights files
    that replace the shipped ones."""
    from prunelab.common.packaged import load_smollm2

    out, weights = Path(out), dict(weights or {})
    unknown = set(weights) - set(diffusion_tasks.TESTBEDS)
    if unknown:
        raise ValueError(f"weights: unknown test-beds {sorted(unknown)}; expected names of "
                         f"{tuple(diffusion_tasks.TESTBEDS)}")
    testbeds = {}  # name -> (model, charset, info), in the order the tasks first use them
    for task in tasks:
        name = diffusion_tasks.testbed_of(task)
        if name not in testbeds:
            testbeds[name] = diffusion_tasks.load(weights.get(name), testbed=name)
    rows = []
    for task in tasks:
        model, charset, _ = testbeds[diffusion_tasks.testbed_of(task)]
        for G in lengths:
            start = time.perf_counter()
            rows += measure(model, charset, task, G, n, rounds, split)
            if progress:
                print(f"[tiny] {task} G={G}: {time.perf_counter() - start:.0f} s", flush=True)
    scorer = load_smollm2()
    text = [row for name, (model, charset, _) in testbeds.items()
            for row in text_quality(model, charset, text_length, n, scorer, name)]
    command = (f"prunelab reproduce window_diffusion --preset tiny --lengths {' '.join(map(str, lengths))} --tasks "
               f"{' '.join(tasks)} --n {n} --rounds {rounds} --split {split} --text-length {text_length}")
    meta = provenance(preset="tiny", n=n, rounds=rounds, split=split, command=command, testbeds={
        name: {"command": diffusion_tasks.TESTBEDS[name].command, "weights": str(weights.get(name, "shipped")),
               "sha256": shipped.sha256(weights.get(name, diffusion_tasks.TESTBEDS[name].weights)),
               "held_out_masked_accuracy": info.get("held_out"), "exact_match": info.get("exact_match")}
        for name, (_, _, info) in testbeds.items()})
    write_results(out, "speed", rows, meta, COLUMNS, title="Window-Diffusion on the diffusion-LM test-beds")
    write_results(out, "text", text, meta, TEXT_COLUMNS, title="Free-text continuations scored by SmolLM2")
    plot(rows, out / "curve.png")
    return {"rows": rows, "text": text, "provenance": meta}
