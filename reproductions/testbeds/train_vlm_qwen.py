"""Training the Qwen2.5-VL variant of the VLM test-bed (``vlm_qwen.py``): two stages, one command.

Stage A, :func:`pretrain_tower`: the vision tower and the ``PatchMerger`` learn what each merged token shows. Every
token the merger gives the language model (one per 2 x 2 unit of patches, 36 an image) predicts the class of the grid
cell it lies in (one of 10, or empty) and which cell that is, with a linear head each, as the LLaVA test-bed's stage A
does on its 144 CLIP tokens; a cell's content and place are then readable from its own 4 tokens.

Stage B, :func:`train_reading`: the tower frozen (the merger's inputs of ``scenes`` training composites cached once,
:func:`vlm_qwen.tower_states`), the merger and a language model trained from initialisation on sequences of 8
questions per composite with every answer's cross-entropy (``train_vlm.question_batch``), with the two things the
LLaVA test-bed's stage C found it needed: input embeddings at a large norm (``embed_scale`` times the initial ones),
so a question's words survive beside the image tokens in their own residual streams, and the routing aid (the answer
position of every location question must name the asked cell after language-model layer 1, through a linear head
that is not shipped). It skips the LLaVA recipe's stage B (the whole model on questions from pixels): that stage
mostly taught the language model the templates, which this one learns directly, at a fraction of the cost.

:func:`main` runs both, evaluates the result on held-out questions and writes the weights (fp16 safetensors with the
vocabulary and the recipe, the held-out accuracy and the training time in the metadata) and prints their SHA-256.
"""

from __future__ import annotations

import argparse
import time

import torch

from prunelab.reproductions.testbeds import composites as C
from prunelab.reproductions.testbeds import shipped
from prunelab.reproductions.testbeds import train_vlm as T
from prunelab.reproductions.testbeds import vlm_qwen as Q

__all__ = ["evaluate_tower", "main", "pretrain_tower", "train_reading"]


def _merged(model, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 36, text width]: the merger's output per image, raster order (what the language model receives)."""
    grid = torch.tensor([Q.GRID_THW] * len(pixels))
    return model.model.visual(Q.patchify(pixels), grid_thw=grid).pooler_output.view(len(pixels), Q.TOKENS, -1)


def pretrain_tower(model, *, steps: int = 400, batch_size: int = 64, lr: float = 2e-3, scenes: int = 60_000,
                   seed: int = 0, log_every: int = 50) -> T.TowerHeads:
    """Stage A on ``model``'s tower and merger (trained in place); returns the heads, with the step losses as
    ``heads.losses``. AdamW, warm-up over 50 steps, cosine decay, gradients clipped at 1; composites from the
    Fashion-MNIST training images, drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    data = C.make_dataset("train", scenes, seed=seed)
    visual = model.model.visual
    heads = T.TowerHeads(model.config.vision_config.out_hidden_size)
    params = [*visual.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    visual.train()
    start, losses = time.perf_counter(), []
    try:
        for step in range(steps):
            T._schedule(opt, lr, step, steps, 50)
            idx = torch.randint(0, scenes, (batch_size,), generator=g).numpy()
            loss = T.tower_loss(heads, _merged(model, C.to_pixels(data.scenes.images(idx))), data.scenes, idx,
                              Q.patch_cells())
            T._update(opt, params, loss)
            T._log(losses, loss, step, steps, log_every, start, "tower")
    finally:
        visual.eval()
    heads.losses = losses
    return heads


@torch.no_grad()
def evaluate_tower(model, heads: T.TowerHeads, *, n: int = 1000, seed: int = 1) -> dict:
    """Held-out accuracy of stage A on composites of Fashion-MNIST test images: per merged token, per cell (majority
    of its 4 tokens), on non-empty cells, and of the cell index."""
    data = C.make_dataset("test", n, seed=seed)
    idx = list(range(n))
    h = _merged(model, C.to_pixels(data.scenes.images(idx)))
    return T.tower_accuracy(heads, h, data.scenes, idx, Q.patch_cells(), unit="token")


def train_reading(model, *, steps: int = 6000, batch_size: int = 32, per_image: int = 8, lr: float = 5e-4,
                  embed_scale: float = 100.0, scenes: int = 40_000, route: float = 1.0, route_layer: int = 1,
                  seed: int = 0, log_every: int = 100) -> list[float]:
    """Stage B on ``model`` (after stage A, trained in place); returns the answer losses. Multiplies the input
    embeddings by ``embed_scale``, freezes the tower, caches the merger's inputs of ``scenes`` training composites
    (:func:`vlm_qwen.tower_states`) and trains the merger and the language model on ``per_image`` questions per
    composite, ``batch_size`` composites a step (``train_vlm.reading_stage``, the LLaVA test-bed's stage C loop).
    ``route`` > 0 adds the routing aid (see the module docstring) after layer ``route_layer``."""

    def forward(x, states, hidden):
        x["mm_token_type_ids"] = (x["input_ids"] == Q.IMAGE_TOKEN).long()
        return Q.cached_forward(model, x, states, hidden=hidden)

    tok = Q.tokenizer()
    prefix = Q.prompt_ids("", tok)[:Q.TOKENS + 2]  # the image's span: start marker, placeholders, end marker
    return T.reading_stage(model, lambda pixels: Q.tower_states(model, pixels), forward,
                         lambda name: not name.startswith("model.visual.") or ".merger." in name, tok=tok,
                         steps=steps, batch_size=batch_size, per_image=per_image, lr=lr, embed_scale=embed_scale,
                         scenes=scenes, route=route, route_layer=route_layer, seed=seed, log_every=log_every,
                         cache_batch=128, prefix=prefix)


def main(argv: list[str] | None = None) -> dict:
    """Train the Qwen2.5-VL test-bed (stages A and B), evaluate it on held-out questions, write it."""
    parser = argparse.ArgumentParser(prog="python -m prunelab.reproductions.testbeds.train_vlm_qwen",
                                     description="Train the Qwen2.5-VL variant of the tiny VLM test-bed.")
    parser.add_argument("--tower-steps", type=int, default=400, help="stage A steps (64 composites each)")
    parser.add_argument("--steps", type=int, default=6000, help="stage B steps (32 composites each)")
    parser.add_argument("--per-image", type=int, default=8, help="stage B questions per composite")
    parser.add_argument("--lr", type=float, default=5e-4, help="stage B peak learning rate")
    parser.add_argument("--embed-scale", type=float, default=100.0,
                        help="stage B: the initial input embeddings are multiplied by this")
    parser.add_argument("--scenes", type=int, default=40_000, help="stage B: the composites whose tower states it "
                                                                   "caches")
    parser.add_argument("--route", type=float, default=1.0, help="stage B: weight of the routing aid; 0 turns it off")
    parser.add_argument("--route-layer", type=int, default=1,
                        help="stage B: the language-model layer after which the routing aid reads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (results depend on it in the last bits; the shipped file used 2)")
    parser.add_argument("--n-eval", type=int, default=2000, help="held-out questions for the recorded accuracy")
    parser.add_argument("--out", default=str(Q.WEIGHTS), help="where to write the weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, _ = Q.build(seed=args.seed)
    heads = pretrain_tower(model, steps=args.tower_steps, seed=args.seed)
    stage_a = evaluate_tower(model, heads)
    print(f"stage A held-out: {stage_a}", flush=True)
    train_reading(model, steps=args.steps, per_image=args.per_image, lr=args.lr, embed_scale=args.embed_scale,
                  scenes=args.scenes, route=args.route, route_layer=args.route_layer, seed=args.seed)
    minutes = (time.perf_counter() - start) / 60
    held = T.evaluate(model, C.make_dataset("test", args.n_eval, seed=args.seed + 2), testbed=Q)
    held.pop("correct")
    print(f"held-out accuracy: {held} ({minutes:.1f} min)", flush=True)
    info = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "stage_a": stage_a,
            "heldout_accuracy": held, "train_minutes": round(minutes, 1), "torch": torch.__version__}
    digest = shipped.save_with_vocabulary(model, Q.vocabulary(), info, args.out)
    print(f"wrote {args.out}\nsha256 {digest}")
    return {"accuracy": held, "sha256": digest, "minutes": minutes}


if __name__ == "__main__":
    main()
