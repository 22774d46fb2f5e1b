"""Training the tiny VLM test-bed (``vlm.py``), stage by stage.

Stage A, :func:`pretrain_tower`: the CLIP tower alone learns what each patch shows. Every patch token of LLaVA's
feature layer (-2) predicts the class of the grid cell it lies in (one of 10, or empty) and which cell that is, with a
linear head each, so a cell's content and place are readable from its own 16 tokens: removing a region's tokens then
removes what the model knows about that region, which is what the pruning experiments need. On 2 CPU cores a step of
64 composites takes about 1.2 s; 300 steps (19k composites, 6 minutes) reach 0.90 per-cell accuracy on held-out
composites (0.71 on the non-empty cells) and 1.00 on the cell index.

Stage B, :func:`train_questions`: the whole model (tower, projector, language model) learns to answer the questions
(cross-entropy of the answer word at the last prompt position), while stage A's loss stays on as an auxiliary term so
the tower keeps each region's content in that region's tokens.

Stage C, :func:`train_reading`: from stage B's weights, the words' input embeddings scaled up so that a question's
words survive beside the image tokens in their own residual streams, the tower frozen (its features cached once), the
projector and the language model trained on the same questions: what lifted presence and count far above their
majority answers. With it, a training aid (``route``): the answer position of every location question must name the
asked cell after language-model layer 1, without which the question's position words never reached that position and
location stayed at 0.50 (0.82 with it).

:func:`main` runs stages A-B (``--stage ab``, the base weights the ICL and LISA test-beds start from), stage C from
them (``--stage c``, the default) or all three, and writes the weights (fp16 safetensors, with the vocabulary, the
settings and the held-out accuracy in the metadata) and prints their SHA-256.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prunelab.reproductions.testbeds import composites as C
from prunelab.reproductions.testbeds import vlm

__all__ = ["TowerHeads", "evaluate", "evaluate_tower", "main", "pretrain_tower", "question_batch", "save",
           "train_questions"]


class TowerHeads(torch.nn.Module):
    """Stage A's linear heads on the feature layer's patch tokens: the cell's class (0 empty, 1..10) and the cell."""

    def __init__(self, width: int):
        super().__init__()
        self.cls = torch.nn.Linear(width, len(C.CHOICES["location"]))
        self.cell = torch.nn.Linear(width, C.GRID * C.GRID)


def _features(tower, pixels: torch.Tensor) -> torch.Tensor:
    return tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # LLaVA's feature layer, no CLS


def _targets(scenes: C.Scenes, idx, token_cells: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T]: 0 for an image token in an empty cell, 1 + class otherwise; token ``t`` lies in cell
    ``token_cells[t]`` (default: this test-bed's 144 patches, :func:`vlm.patch_cells`)."""
    cells = vlm.patch_cells() if token_cells is None else token_cells
    return torch.as_tensor(scenes.cells[idx]).long()[:, cells] + 1


def tower_loss(heads: TowerHeads, h: torch.Tensor, scenes: C.Scenes, idx, token_cells: torch.Tensor) -> torch.Tensor:
    """Stage A's loss on features ``h`` [B, T, width] of scenes ``idx`` (token ``t`` in cell ``token_cells[t]``): the
    cross-entropy of each token's cell class (or empty) plus that of its cell index."""
    return (F.cross_entropy(heads.cls(h).flatten(0, 1), _targets(scenes, idx, token_cells).flatten())
            + F.cross_entropy(heads.cell(h).flatten(0, 1), token_cells.expand(len(idx), -1).flatten()))


def tower_accuracy(heads: TowerHeads, h: torch.Tensor, scenes: C.Scenes, idx, token_cells: torch.Tensor, *,
                   unit: str = "patch") -> dict:
    """Stage A's accuracy on features ``h`` [B, T, width] of scenes ``idx`` (token ``t`` in cell
    ``token_cells[t]``): per token (keyed ``unit``), per cell (majority of its tokens), on the non-empty cells, and of
    the cell index."""
    pred, want = heads.cls(h).argmax(-1), _targets(scenes, idx, token_cells)
    votes = torch.stack([torch.mode(pred[:, token_cells == k], dim=1).values for k in range(C.GRID * C.GRID)], 1)
    truth = torch.as_tensor(scenes.cells[idx]).long() + 1
    return {unit: float((pred == want).float().mean()), "cell": float((votes == truth).float().mean()),
            "nonempty_cell": float((votes == truth)[truth > 0].float().mean()),
            "cell_index": float((heads.cell(h).argmax(-1) == token_cells).float().mean())}


def pretrain_tower(tower, *, steps: int = 300, batch_size: int = 64, lr: float = 2e-3, scenes: int = 60_000,
                   seed: int = 0, log_every: int = 50) -> TowerHeads:
    """Stage A on ``tower`` (a ``CLIPVisionModel``, trained in place); returns the heads. AdamW, linear warm-up over
    the first 50 steps, cosine decay; composites from the Fashion-MNIST training images, drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    data = C.make_dataset("train", scenes, seed=seed)
    heads = TowerHeads(tower.config.hidden_size)
    params = [*tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    cells = vlm.patch_cells()
    tower.train()
    start, losses = time.perf_counter(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, scenes, (batch_size,), generator=g).numpy()
        h = _features(tower, C.to_pixels(data.scenes.images(idx)))
        loss = tower_loss(heads, h, data.scenes, idx, cells)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"tower step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    tower.eval()
    heads.losses = losses
    return heads


@torch.no_grad()
def evaluate_tower(tower, heads: TowerHeads, *, n: int = 1000, seed: int = 1) -> dict:
    """Held-out accuracy of stage A on composites of Fashion-MNIST test images: per patch, per cell (majority of the
    cell's 16 patches), on non-empty cells, and of the cell index."""
    data = C.make_dataset("test", n, seed=seed)
    idx = list(range(n))
    h = _features(tower, C.to_pixels(data.scenes.images(idx)))
    return tower_accuracy(heads, h, data.scenes, idx, vlm.patch_cells())


def _schedule(opt, lr: float, step: int, steps: int, warmup: int) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def _update(opt, params, loss: torch.Tensor) -> None:
    """Backward, gradients clipped at norm 1, one optimiser step."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()


def _log(losses: list[float], answer: torch.Tensor, step: int, steps: int, every: int, start: float, stage: str,
         extra: str = "") -> None:
    """Record the answer loss; every ``every`` steps (and at the last) print its recent mean."""
    losses.append(answer.item())
    if every and (step % every == 0 or step == steps - 1):
        recent = sum(losses[-every:]) / len(losses[-every:])
        print(f"{stage} step {step + 1}/{steps}: answer loss {recent:.3f}{extra} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


def question_batch(scenes: C.Scenes, idx, rng, per_image: int, tok, *, pixels: bool = True,
                   prefix: Sequence[int] | None = None) -> dict:
    """Training inputs: per scene ``idx[b]``, ``per_image`` questions of random kinds in a row, each followed by its
    answer word (``[image] Question: q1 Answer: a1 Question: q2 Answer: a2 ...``; the first one is exactly the
    evaluation prompt), left padding; ``targets`` lists (row, position, answer id) of every answer, ``asked``
    (row, position, cell) of every location question's answer position. Without ``pixels``, no ``pixel_values`` (a
    training path with cached tower features). ``prefix``: the image's token ids before the first question (default:
    this test-bed's 144 ``<image>`` placeholders)."""
    words = vlm.answer_ids(tok)
    rows, targets, asked = [], [], []
    for b, i in enumerate(idx):
        ids = list(prefix) if prefix is not None else [vlm.IMAGE_TOKEN] * vlm.TOKENS
        answered = 0
        while answered < per_image:
            q = C.ask(rng, scenes.cells[i], C.KINDS[int(rng.integers(len(C.KINDS)))], int(i))
            if q is None:
                continue
            ids += tok(vlm.PROMPT.format(question=q.question)).input_ids
            targets.append((b, len(ids) - 1, words[q.answer]))
            if q.kind == "location":
                asked.append((b, len(ids) - 1, q.cells[0]))
            ids.append(words[q.answer])
            answered += 1
        rows.append(ids[:-1])  # the last answer is a target only
    out = vlm.left_pad(rows)
    pads = [out["input_ids"].shape[1] - len(r) for r in rows]
    out.update(targets=torch.tensor([(b, pads[b] + t, a) for b, t, a in targets]),
               asked=torch.tensor([(b, pads[b] + t, c) for b, t, c in asked], dtype=torch.long).view(-1, 3))
    if pixels:
        out["pixel_values"] = C.to_pixels(scenes.images(idx))
    return out


def train_questions(model, heads: TowerHeads, *, steps: int = 1500, batch_size: int = 16, per_image: int = 8,
                    lr: float = 1e-3, aux: float = 0.5, scenes: int = 100_000, seed: int = 0,
                    log_every: int = 50) -> list[float]:
    """Stage B on ``model`` (the test-bed LLaVA, trained in place) with stage A's ``heads``; returns the losses.

    Every step: ``batch_size`` training scenes with ``per_image`` questions each (:func:`question_batch`, train
    templates, kinds uniform), the cross-entropy of every answer word, plus ``aux`` times stage A's loss on the
    tower features the same forward computed. AdamW, warm-up over 100 steps (a tenth of a shorter run), cosine
    decay."""
    g = torch.Generator().manual_seed(seed + 1)
    rng = np.random.default_rng(seed + 1)
    torch.manual_seed(seed + 1)
    data = C.make_dataset("train", scenes, seed=seed + 1)
    tok = vlm.tokenizer()
    params = [*model.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    cells = vlm.patch_cells()
    seen = {}
    hook = model.model.vision_tower.register_forward_hook(
        lambda m, i, o: seen.__setitem__("h", o.hidden_states[-2][:, 1:]))
    model.train()
    start, losses = time.perf_counter(), []
    try:
        for step in range(steps):
            _schedule(opt, lr, step, steps, min(100, max(1, steps // 10)))
            idx = torch.randint(0, scenes, (batch_size,), generator=g).numpy()
            x = question_batch(data.scenes, idx, rng, per_image, tok)
            t, _ = x.pop("targets"), x.pop("asked")
            logits = model(**x).logits[t[:, 0], t[:, 1]]
            qa = F.cross_entropy(logits, t[:, 2])
            h = seen.pop("h")
            tower = tower_loss(heads, h, data.scenes, idx, cells)
            _update(opt, params, qa + aux * tower)
            _log(losses, qa, step, steps, log_every, start, "question", f", tower loss {tower.item():.3f}")
    finally:
        hook.remove()
        model.eval()
    return losses


@torch.no_grad()
def cache_images(encode, scenes: C.Scenes, *, batch_size: int) -> torch.Tensor:
    """bf16 ``encode(pixels)`` of every scene, batch by batch: a frozen tower's output, computed once."""
    out = []
    for i in range(0, len(scenes), batch_size):
        idx = np.arange(i, min(len(scenes), i + batch_size))
        out.append(encode(C.to_pixels(scenes.images(idx))).bfloat16())
    return torch.cat(out)


def cache_features(model, scenes: C.Scenes, *, batch_size: int = 256) -> torch.Tensor:
    """bf16 [N, 144, width]: what the projector reads for every scene (about 100 scenes a second on 2 cores)."""
    return cache_images(lambda pixels: vlm.tower_features(model, pixels), scenes, batch_size=batch_size)


def reading_stage(model, encode, forward, trainable, *, tok, steps: int, batch_size: int, per_image: int, lr: float,
                  embed_scale: float, scenes: int, route: float, route_layer: int, seed: int, log_every: int,
                  cache_batch: int, prefix: Sequence[int] | None = None) -> list[float]:
    """The reading stage shared by the VLM test-beds (this one's stage C, the Qwen2.5-VL variant's stage B), on
    ``model`` in place; returns the answer losses.

    Multiplies the input embeddings by ``embed_scale``; caches ``encode(pixels)`` (the frozen tower's output) for
    ``scenes`` training composites; trains the parameters whose names pass ``trainable`` on ``per_image`` questions
    per composite (:func:`question_batch` with ``tok`` and ``prefix``), ``batch_size`` composites a step, every
    answer's cross-entropy on the output of ``forward(x, cached, hidden)`` (the language model's, for the batch
    ``x`` whose images have the cached rows ``cached``), in bf16 autocast: AdamW, warm-up over 50 steps, cosine
    decay, gradients clipped at 1. ``route`` > 0 adds the routing aid: at the answer position of every location
    question, the hidden state after language-model layer ``route_layer`` must name the asked cell (9-way
    cross-entropy weighted by ``route``, through a linear head that is not kept)."""
    layers = model.config.text_config.num_hidden_layers
    if route > 0 and not 0 <= route_layer < layers:
        raise ValueError(f"route_layer must name a language-model layer, 0..{layers - 1}; got {route_layer}")
    g = torch.Generator().manual_seed(seed + 2)
    rng = np.random.default_rng(seed + 2)
    torch.manual_seed(seed + 2)
    data = C.make_dataset("train", scenes, seed=seed + 2)
    start = time.perf_counter()
    cached = cache_images(encode, data.scenes, batch_size=cache_batch)
    print(f"reading: tower outputs of {scenes} composites ({time.perf_counter() - start:.0f} s)", flush=True)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(embed_scale)
    params = [p for n, p in model.named_parameters() if trainable(n)]
    if route > 0:
        aid = torch.nn.Linear(model.config.text_config.hidden_size, C.GRID * C.GRID)
        params += list(aid.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    model.train()
    losses, routed = [], []
    try:
        for step in range(steps):
            _schedule(opt, lr, step, steps, 50)
            idx = torch.randint(0, scenes, (batch_size,), generator=g).numpy()
            x = question_batch(data.scenes, idx, rng, per_image, tok, pixels=False, prefix=prefix)
            t, a = x.pop("targets"), x.pop("asked")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = forward(x, cached[idx].float(), route > 0)
            h = out.last_hidden_state
            loss = total = F.cross_entropy(model.lm_head(h[t[:, 0], t[:, 1]].float()), t[:, 2])
            extra = ""
            if route > 0 and len(a):
                z = aid(out.hidden_states[route_layer + 1][a[:, 0], a[:, 1]].float())
                total = total + route * F.cross_entropy(z, a[:, 2])
                routed.append(float((z.argmax(-1) == a[:, 2]).float().mean()))
                extra = f", asked cell read at {np.mean(routed[-max(1, log_every):]):.2f}"
            _update(opt, params, total)
            _log(losses, loss, step, steps, log_every, start, "reading", extra)
    finally:
        model.eval()
    return losses


def train_reading(model, *, steps: int = 2000, batch_size: int = 32, per_image: int = 8, lr: float = 5e-4,
                  embed_scale: float = 60.0, scenes: int = 30_000, route: float = 1.0, route_layer: int = 1,
                  seed: int = 0, log_every: int = 100) -> list[float]:
    """Stage C on ``model`` (the test-bed after stages A-B, trained in place); returns the answer losses.

    After stage B the words are drowned in their own residual streams: the input embeddings have norm about 0.6,
    projected image tokens about 65, and after the first layer's attention a text position carries norm about 40,
    almost all of it image content, so a question's words (which class, which cell) barely reach the layers that
    must match them against the image. Stage C multiplies every input embedding by ``embed_scale`` (the first
    layer's normalised input of a word is unchanged; its residual stream now keeps the word), freezes the tower,
    caches its features of ``scenes`` training composites once (:func:`cache_features`), and trains the projector
    and the language model as stage B does (:func:`question_batch`, every answer's cross-entropy), in bf16
    autocast: AdamW, warm-up over 50 steps, cosine decay, gradients clipped at 1 (:func:`reading_stage`).

    ``route`` > 0 adds a training aid (its linear head is not kept): at the answer position of every location
    question, the hidden state after language-model layer ``route_layer`` must name the asked cell (9-way
    cross-entropy, weighted by ``route``), so the question's position words reach the position that answers."""

    def forward(x, feats, hidden):
        return vlm.cached_forward(model, x["input_ids"], feats, attention_mask=x["attention_mask"], hidden=hidden)

    return reading_stage(model, lambda pixels: vlm.tower_features(model, pixels), forward,
                         lambda name: not name.startswith("model.vision_tower."), tok=vlm.tokenizer(), steps=steps,
                         batch_size=batch_size, per_image=per_image, lr=lr, embed_scale=embed_scale, scenes=scenes,
                         route=route, route_layer=route_layer, seed=seed, log_every=log_every, cache_batch=256)


@torch.no_grad()
def evaluate(model, data: C.Dataset, *, batch_size: int = 64, testbed=vlm) -> dict:
    """Accuracy per question kind (argmax over the kind's choices) on ``data``, and ``correct`` per sample;
    ``testbed``: the module that makes the model's inputs (:mod:`.vlm`, or :mod:`.vlm_qwen` for its variant)."""
    tok = testbed.tokenizer()
    correct = []
    for i in range(0, len(data.samples), batch_size):
        part = data.samples[i:i + batch_size]
        x = testbed.batch(part, data.scenes, tok)
        logits = model(**testbed.model_inputs(x), logits_to_keep=1).logits
        for s, scores in zip(part, testbed.choice_logits(logits, x["kind"], tok)):
            correct.append(s.choices[int(scores.argmax())] == s.answer)
    out = {k: float(sum(c for c, s in zip(correct, data.samples) if s.kind == k)
                    / max(1, sum(s.kind == k for s in data.samples))) for k in C.KINDS}
    out["correct"] = correct
    return out


def save(model, path: str | Path, **metadata) -> str:
    """Write ``model``'s weights as fp16 safetensors with the vocabulary and ``metadata`` (JSON-encoded); return
    the file's SHA-256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    meta = {"vocabulary": "\n".join(vlm.vocabulary()), **{k: json.dumps(v) for k, v in metadata.items()}}
    save_file(state, str(path), metadata=meta)
    return vlm.sha256(path)


def main(argv: list[str] | None = None) -> dict:
    """Train the test-bed (stages A-B from scratch, and / or stage C from their weights), evaluate it on held-out
    questions, write it."""
    parser = argparse.ArgumentParser(prog="python -m prunelab.reproductions.testbeds.train_vlm",
                                     description="Train the tiny VLM test-bed and write its weights.")
    parser.add_argument("--stage", choices=["c", "ab", "all"], default="c",
                        help="c (default): stage C from the shipped stages A-B weights (--base) to the shipped "
                             "test-bed; ab: stages A-B from scratch (the base); all: A-B, then C")
    parser.add_argument("--tower-steps", type=int, default=300, help="stage A steps (64 composites each)")
    parser.add_argument("--steps", type=int, default=1500, help="stage B steps")
    parser.add_argument("--batch-size", type=int, default=16, help="stage B scenes per step")
    parser.add_argument("--per-image", type=int, default=8, help="stage B and C questions per scene")
    parser.add_argument("--lr", type=float, default=1e-3, help="stage B peak learning rate")
    parser.add_argument("--reading-steps", type=int, default=2000, help="stage C steps (32 scenes each)")
    parser.add_argument("--reading-lr", type=float, default=5e-4, help="stage C peak learning rate")
    parser.add_argument("--embed-scale", type=float, default=60.0,
                        help="stage C: the input embeddings are multiplied by this")
    parser.add_argument("--reading-scenes", type=int, default=30_000,
                        help="stage C: the composites whose tower features it caches")
    parser.add_argument("--route", type=float, default=1.0,
                        help="stage C: weight of the routing aid (the asked cell read from the answer position); 0 "
                             "turns it off")
    parser.add_argument("--route-layer", type=int, default=1,
                        help="stage C: the language-model layer after which the routing aid reads")
    parser.add_argument("--base", default=None, help="stage C's start (default: the shipped stages A-B weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (results depend on it in the last bits; the shipped stage C file was "
                             "trained with 1, the base file with 2)")
    parser.add_argument("--n-eval", type=int, default=2000, help="held-out questions for the recorded accuracy")
    parser.add_argument("--out", default=None, help="where to write the weights (default: the shipped file of the "
                                                   "last stage run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    info = {}
    if args.stage == "c":
        model, _ = vlm.load(args.base, base=True)
        info["base_sha256"] = vlm.sha256(vlm.BASE_WEIGHTS if args.base is None else args.base)
    else:
        model, _ = vlm.build(seed=args.seed)
        heads = pretrain_tower(model.model.vision_tower, steps=args.tower_steps, seed=args.seed)
        info["stage_a"] = evaluate_tower(model.model.vision_tower, heads)
        print(f"stage A held-out: {info['stage_a']}", flush=True)
        train_questions(model, heads, steps=args.steps, batch_size=args.batch_size, per_image=args.per_image,
                        lr=args.lr, seed=args.seed)
    if args.stage != "ab":
        train_reading(model, steps=args.reading_steps, per_image=args.per_image, lr=args.reading_lr,
                      embed_scale=args.embed_scale, scenes=args.reading_scenes, route=args.route,
                      route_layer=args.route_layer, seed=args.seed)
    minutes = (time.perf_counter() - start) / 60
    held = evaluate(model, C.make_dataset("test", args.n_eval, seed=args.seed + 2))
    held.pop("correct")
    print(f"held-out accuracy: {held} ({minutes:.1f} min)", flush=True)
    out = args.out or (vlm.BASE_WEIGHTS if args.stage == "ab" else vlm.WEIGHTS)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    digest = save(model, out, settings=settings, heldout_accuracy=held, train_minutes=round(minutes, 1),
                  torch=torch.__version__, **info)
    print(f"wrote {out}\nsha256 {digest}")
    return {"accuracy": held, "sha256": digest, "minutes": minutes}


if __name__ == "__main__":
    main()
