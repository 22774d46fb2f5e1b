"""The diffusion-LM test-bed that generates: the pydoc diffusion LM fine-tuned on tasks with exact answers.

The pydoc test-bed (:mod:`.diffusion_lm`) reads its context but does not generate: with one token per step and
low-confidence remasking its answers collapse to spaces. Window-Diffusion's claim is about generation ("a large
speed-up while largely preserving generation"), and matched output is only checkable where the right answer is
known. So this test-bed starts from the pydoc weights and is fine-tuned the way LLaDA is instruction-tuned (Nie et
al., arXiv 2502.09992, Sec. 2.3: the prompt is left unmasked, only the response is masked, the response is padded
with EOS to the canvas and the EOS padding is part of the response), on two tasks whose answers are unique and whose
length the prompt fixes, written in pydoc's words:

- ``count``: ``"count from 417 to 441 by 6:\\n"`` -> ``"417 423 429 435 441"``. Every number depends on the one
  before it, so the answer must be produced left to right, the locality Window-Diffusion relies on.
- ``repeat``: ``"repeat 3 times: the file object\\n"`` -> ``"the file object the file object the file object"``,
  a copy from the prompt at distances up to the canvas.

Both end before the canvas ends (EOS after), as an instruction-tuned model's answers do, so the share of the time
spent after the answer (the early stop at EOS) can be measured. Short canvases come up more often in training
(:data:`TRAIN_CYCLE`): they carry more instances per step. The pydoc objective can stay in the mix (``text_batch``);
the shipped recipe leaves it out, because a first run with half of every step's tokens on pydoc text (900 steps at
lr 5e-4) learned neither task (no exact answer at G = 64-256); the held-out masked-character accuracy on text is
reported for what the fine-tune keeps of it.

That fine-tune learned the tasks' format, not the tasks. A third task, whose rule is local and whose alphabet the
model already writes, is learned: ``letters``: ``"letters from c to p by 2:\n"`` -> ``"c e g i k m o"`` (strides 1-3,
581 instances, 116 held out of training by :func:`letters_held_out`). The ``letters`` test-bed continues from the
``count`` / ``repeat`` weights on it alone (:data:`TESTBEDS`).

``python -m prunelab.reproductions.testbeds.diffusion_tasks [--testbed letters]`` fine-tunes one (deterministic at a
fixed thread count) and writes the weights with the recipe, the held-out accuracy and the exact-match rates of the
vanilla sampler.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import re
import string
from pathlib import Path

import torch
import torch.nn.functional as F

from prunelab.methods.window_diffusion import DiffusionLM, llada_generate
from prunelab.reproductions.testbeds import diffusion_lm, shipped

WEIGHTS = Path(__file__).with_name("weights") / "diffusion_tasks.safetensors"
SHA256 = "614b5109ec9731359b6609e0a3d2adf534c8d51ff3d3ac48022c493d94b4284d"
COMMAND = "python -m prunelab.reproductions.testbeds.diffusion_tasks"
TASKS = ("count", "repeat", "letters")
GEN_LENGTHS = (64, 128, 256, 512)  # the answer canvases of evaluation
TRAIN_CYCLE = (64, 128, 64, 256, 128, 512)  # of training: the short ones more often (more instances per step)
STEPS_BY = (1, 2, 3, 5, 7, 10)
LETTERS_BY = (1, 2, 3)

__all__ = ["TaskConfig", "Testbed", "TESTBEDS", "testbed_of", "Example", "examples", "finetune", "exact_match",
           "save", "load", "main"]


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """A fine-tuning recipe; the defaults are the ``tasks`` test-bed's."""

    steps: int = 1500
    tasks: tuple[str, ...] = ("count", "repeat")  # drawn with equal chance for each instance
    cycle: tuple[int, ...] = TRAIN_CYCLE  # the canvas length of step i is cycle[i % len(cycle)]
    text_batch: int = 0  # pydoc windows of diffusion_lm's seq_len per step (LLaDA's pre-training loss); 0: none
    task_tokens: int = 2304  # task canvases per step: this many positions
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.03
    eps: float = 1e-3
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Testbed:
    """A shipped fine-tune: its weights file and checksum, its recipe, and the weights it starts from (``base``:
    another test-bed's name, or None for the pydoc test-bed)."""

    weights: Path
    sha256: str
    recipe: TaskConfig
    base: str | None

    @property
    def command(self) -> str:
        name = next(k for k, v in TESTBEDS.items() if v is self)
        return COMMAND if name == "tasks" else f"{COMMAND} --testbed {name}"


TESTBEDS = {
    # count and repeat, from the pydoc weights: learns the format, not the tasks (see the test-beds' README)
    "tasks": Testbed(WEIGHTS, SHA256, TaskConfig(), None),
    # letters, from the "tasks" weights: right on most instances it was trained on, on a fifth to a third of the rest
    "letters": Testbed(WEIGHTS.with_name("diffusion_letters.safetensors"),
                       "e751f844abe22fd9b572cb466b496ee8c2d17aa68d8ebfe77715fc0489bfd46b",
                       TaskConfig(steps=2400, tasks=("letters",), cycle=(64, 128, 64, 256)), "tasks"),
}


def testbed_of(task: str) -> str:
    """The name of the shipped test-bed trained on ``task``."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    return next(k for k, v in TESTBEDS.items() if task in v.recipe.tasks)


@dataclasses.dataclass(frozen=True)
class Example:
    """One task instance: ``prompt`` ends with a newline; ``answer`` fits the canvas ``gen_length`` (EOS after)."""

    task: str
    prompt: str
    answer: str
    gen_length: int


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[A-Za-z_][A-Za-z_]*", text) if len(w) <= 12]


def _count(rng: random.Random, budget: int) -> Example | None:
    by, start = rng.choice(STEPS_BY), rng.randrange(0, 1000)
    terms = [str(start)]
    limit = rng.randint(budget // 4, budget)
    while len(" ".join(terms)) + 1 + len(str(start + by * len(terms))) <= limit:
        terms.append(str(start + by * len(terms)))
    if len(terms) < 2:
        return None
    return Example("count", f"count from {terms[0]} to {terms[-1]} by {by}:\n", " ".join(terms), budget)


def _repeat(rng: random.Random, budget: int, words: list[str]) -> Example | None:
    i = rng.randrange(0, len(words) - 4)
    phrase = " ".join(words[i:i + rng.randint(1, 4)])
    times = rng.randint(2, max(2, (budget + 1) // (len(phrase) + 1)))
    answer = " ".join([phrase] * times)
    if len(answer) > budget:
        return None
    return Example("repeat", f"repeat {times} times: {phrase}\n", answer, budget)


def letters_held_out(first: int, last: int, by: int) -> bool:
    """Whether the ``letters`` instance (alphabet indices of its first and last letter, its stride) is held out of
    training: 116 of the 581 instances, by a fixed rule."""
    return (31 * first + 17 * last + 7 * by) % 5 == 0


def _letters(rng: random.Random, budget: int, split: str) -> Example | None:
    by = rng.choice(LETTERS_BY)
    first = rng.randrange(0, 26 - by)
    last = rng.randrange(first + by, 26)
    seq = string.ascii_lowercase[first:last + 1:by]
    answer = " ".join(seq)
    if len(answer) > budget or letters_held_out(first, first + by * (len(seq) - 1), by) != (split == "held_out"):
        return None
    return Example("letters", f"letters from {seq[0]} to {seq[-1]} by {by}:\n", answer, budget)


def _instance(task: str, rng: random.Random, budget: int, words: list[str], split: str) -> Example | None:
    if task == "count":
        return _count(rng, budget)
    if task == "repeat":
        return _repeat(rng, budget, words)
    return _letters(rng, budget, split)


def examples(task: str, gen_length: int, n: int, *, split: str = "held_out", seed: int = 0) -> list[Example]:
    """``n`` seeded instances of ``task`` for an answer canvas of ``gen_length``; ``repeat`` draws its phrases from
    the pydoc text of ``split`` (``"train"`` or ``"held_out"``), ``letters`` its instances from the split's share
    (:func:`letters_held_out`)."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    if split not in ("train", "held_out"):
        raise ValueError(f"split: expected 'train' or 'held_out', got {split!r}")
    words = _words(diffusion_lm.corpus()[split == "held_out"])
    rng, out = random.Random(f"{task}/{gen_length}/{split}/{seed}"), []
    while len(out) < n:
        ex = _instance(task, rng, gen_length, words, split)
        if ex is not None:
            out.append(ex)
    return out


def _canvas(batch: list[Example], charset: diffusion_lm.Charset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention_mask, response) [B, P + G]: left-padded prompts, the answers padded with EOS to G."""
    P, G = max(len(e.prompt) for e in batch), batch[0].gen_length
    ids = torch.full((len(batch), P + G), charset.eos_id, dtype=torch.long)
    real = torch.zeros_like(ids)
    for b, e in enumerate(batch):
        ids[b, P - len(e.prompt):P] = charset.encode(e.prompt)
        ids[b, P:P + len(e.answer)] = charset.encode(e.answer)
        real[b, P - len(e.prompt):] = 1
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, P:] = True
    return ids, real, response


def sft_loss(model: DiffusionLM, ids, real, response, generator: torch.Generator, eps: float) -> torch.Tensor:
    """LLaDA's SFT loss: mask response positions with a ratio t ~ U(eps, 1) per row, cross-entropy on the masked ones
    weighted by 1 / t, normalised by each row's response length, averaged over rows."""
    B, N = ids.shape
    t = eps + (1 - eps) * torch.rand(B, 1, generator=generator)
    masked = (torch.rand(B, N, generator=generator) < t) & response
    logits = model(torch.where(masked, model.mask_id, ids), real)
    ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(B, N)
    return ((ce * masked / t).sum(1) / response.sum(1)).mean()


def finetune(cfg: TaskConfig | None = None, *, base: str | Path | None = None, progress: bool = True
             ) -> tuple[DiffusionLM, diffusion_lm.Charset, dict]:
    """Fine-tune the pydoc test-bed (``base``: its weights file, default the shipped one) on the tasks and the pydoc
    text; returns the model (fp16-rounded, eval), its charset and the training record."""
    cfg = cfg or TaskConfig()
    model, charset, base_info = diffusion_lm.load(base)
    text = charset.encode(diffusion_lm.corpus()[0])
    seq_len = base_info["config"]["seq_len"]
    torch.manual_seed(cfg.seed)
    gen, rng = torch.Generator().manual_seed(cfg.seed), random.Random(cfg.seed)
    words = _words(diffusion_lm.corpus()[0])

    def batch_loss(step: int) -> torch.Tensor:
        loss = torch.zeros(())
        if cfg.text_batch:
            starts = torch.randint(0, len(text) - seq_len, (cfg.text_batch,), generator=gen)
            loss = diffusion_lm.llada_loss(model, torch.stack([text[s:s + seq_len] for s in starts.tolist()]), gen,
                                           cfg.eps)
        G = cfg.cycle[step % len(cfg.cycle)]
        batch = []
        while len(batch) * (G + 32) < cfg.task_tokens or not batch:
            # one draw per instance when there is a choice: for ("count", "repeat") the draws of the shipped recipe
            task = cfg.tasks[int(rng.random() * len(cfg.tasks))] if len(cfg.tasks) > 1 else cfg.tasks[0]
            ex = _instance(task, rng, G, words, "train")
            batch += [ex] if ex is not None else []
        return loss + sft_loss(model, *_canvas(batch, charset), gen, cfg.eps)

    losses, seconds = diffusion_lm.optimise(model, batch_loss, cfg, desc="fine-tune diffusion LM on tasks",
                                            progress=progress)
    info = {"config": base_info["config"], "charset": charset.chars, "tasks_recipe": dataclasses.asdict(cfg),
            "base_sha256": shipped.sha256(base or diffusion_lm.WEIGHTS), "train_seconds": seconds,
            "loss_first_last": diffusion_lm.loss_ends(losses),
            "torch_version": torch.__version__, "threads": torch.get_num_threads()}
    return model, charset, info


def cut_at_eos(row: list[int], eos: int) -> list[int]:
    """A token list up to its first EOS."""
    return row[:row.index(eos)] if eos in row else row


def answers(gen, charset: diffusion_lm.Charset) -> list[str]:
    """The answers of a :class:`~prunelab.methods.window_diffusion.Generation`, cut at the first EOS."""
    return [charset.decode(cut_at_eos(row, charset.eos_id)) for row in gen.answer.tolist()]


def prompts_of(batch: list[Example], charset: diffusion_lm.Charset) -> list[torch.Tensor]:
    return [charset.encode(e.prompt) for e in batch]


def exact_match(model: DiffusionLM, charset: diffusion_lm.Charset, task: str, gen_length: int, n: int = 16, *,
                batch_size: int = 8, seed: int = 0, split: str = "held_out") -> float:
    """The share of ``n`` instances of ``split`` whose answer the vanilla sampler (one token per step, greedy) gets
    exactly right."""
    items, hits = examples(task, gen_length, n, seed=seed, split=split), 0
    for i in range(0, n, batch_size):
        batch = items[i:i + batch_size]
        got = answers(llada_generate(model, prompts_of(batch, charset), gen_length), charset)
        hits += sum(g == e.answer for g, e in zip(got, batch))
    return hits / n


def save(model: DiffusionLM, info: dict, path: str | Path = WEIGHTS) -> str:
    return diffusion_lm.save(model, info, path)


def _testbed(name: str) -> Testbed:
    if name not in TESTBEDS:
        raise ValueError(f"testbed: expected one of {tuple(TESTBEDS)}, got {name!r}")
    return TESTBEDS[name]


def load(path: str | Path | None = None, *, testbed: str = "tasks", check: bool = True
         ) -> tuple[DiffusionLM, diffusion_lm.Charset, dict]:
    """A fine-tuned test-bed (fp32, eval), its charset and its record: the shipped file of ``testbed`` (checked
    against its SHA-256) unless ``path`` names another."""
    tb = _testbed(testbed)
    path, _ = shipped.metadata(path, tb.weights, tb.sha256, tb.command, check=check)
    return diffusion_lm.load(path, check=False)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=COMMAND, description="Fine-tune the diffusion-LM test-bed on exact-answer "
                                     "tasks and write its weights.")
    parser.add_argument("--testbed", choices=tuple(TESTBEDS), default="tasks", help="which recipe to run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it in the last bits)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the recipe's)")
    parser.add_argument("--eval", type=int, default=16, help="held-out instances per task and length for exact match")
    parser.add_argument("--out", default=None, help="the weights file (default: the test-bed's shipped file)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tb = TESTBEDS[args.testbed]
    cfg = tb.recipe if args.steps is None else dataclasses.replace(tb.recipe, steps=args.steps)
    base = None if tb.base is None else TESTBEDS[tb.base]
    if base is not None:  # the base's checksum
        shipped.metadata(None, base.weights, base.sha256, base.command)
    model, charset, info = finetune(cfg, base=None if base is None else base.weights)
    info["held_out"] = diffusion_lm.held_out_accuracy(model, charset)
    for split in ("held_out", "train") if "letters" in cfg.tasks else ("held_out",):
        info["exact_match" + ("" if split == "held_out" else "_train")] = {
            f"{t}/{g}": exact_match(model, charset, t, g, args.eval, split=split)
            for t in cfg.tasks for g in GEN_LENGTHS[:3]}
    return diffusion_lm.report(model, info, args.out or tb.weights)


if __name__ == "__main__":
    main()
