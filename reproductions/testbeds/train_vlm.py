"""Training the tiny VLM test-bed (``vlm.py``), stage by stage.

Stage A, :func:`pretrain_tower`: the CLIP tower alone learns what each patch shows. Every patch token of LLaVA's
feature layer (-2) predicts the class of the grid cell it lies in (one of 10, or empty) and which cell that is, with a
linear head each, so a cell's content and place are readable from its own 16 tokens: removing a region's tokens then
removes what the model knows about that region, which is what the pruning experiments need. On 2 CPU cores a step of
64 composites takes about 1.2 s; 300 steps (19k composites, 6 minutes) reach 0.90 per-cell accuracy on held-out
composites (0.71 on the non-empty cells) and 1.00 on the cell index.

The later stage (projector and low-rank adapters of the language model trained on the questions) is not in the repo
yet.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from prunelab.reproductions.testbeds import composites as C
from prunelab.reproductions.testbeds import vlm

__all__ = ["TowerHeads", "evaluate_tower", "pretrain_tower"]


class TowerHeads(torch.nn.Module):
    """Stage A's linear heads on the feature layer's patch tokens: the cell's class (0 empty, 1..10) and the cell."""

    def __init__(self, width: int):
        super().__init__()
        self.cls = torch.nn.Linear(width, len(C.CHOICES["location"]))
        self.cell = torch.nn.Linear(width, C.GRID * C.GRID)


def _features(tower, pixels: torch.Tensor) -> torch.Tensor:
    return tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # LLaVA's feature layer, no CLS


def _targets(scenes: C.Scenes, idx) -> torch.Tensor:
    """[B, 144]: 0 for a patch in an empty cell, 1 + class otherwise."""
    return torch.as_tensor(scenes.cells[idx]).long()[:, vlm.patch_cells()] + 1


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
        loss = (F.cross_entropy(heads.cls(h).flatten(0, 1), _targets(data.scenes, idx).flatten())
                + F.cross_entropy(heads.cell(h).flatten(0, 1), cells.expand(batch_size, -1).flatten()))
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
    pred, want, cells = heads.cls(h).argmax(-1), _targets(data.scenes, idx), vlm.patch_cells()
    votes = torch.stack([torch.mode(pred[:, cells == k], dim=1).values for k in range(C.GRID * C.GRID)], 1)
    truth = torch.as_tensor(data.scenes.cells[idx]).long() + 1
    return {"patch": float((pred == want).float().mean()), "cell": float((votes == truth).float().mean()),
            "nonempty_cell": float((votes == truth)[truth > 0].float().mean()),
            "cell_index": float((heads.cell(h).argmax(-1) == cells).float().mean())}
