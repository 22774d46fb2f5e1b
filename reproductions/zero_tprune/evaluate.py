"""Evaluation shared by the tiny and full presets: top-1, throughput and GFLOPs of a pruned ViT."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

import prunelab
from prunelab.common.flops import ViTDims, vit_gflops
from prunelab.common.timing import benchmark
from prunelab.methods.baselines import CLSAttention, RandomDrop
from prunelab.methods.zero_tprune import ZeroTPrune


@dataclass(frozen=True)
class Variant:
    """One row of the table: a name and a method factory for a FLOPs target (``None``: dense)."""

    name: str
    build: object  # callable(gflops) -> method, or None for the dense model

    def method(self, gflops: float):
        return None if self.build is None else self.build(gflops)


VARIANTS = {
    "dense": Variant("dense", None),
    "zero_tprune": Variant("Zero-TPrune", lambda g: ZeroTPrune(gflops=g)),
    "random_drop": Variant("random drop", lambda g: RandomDrop(gflops=g)),
    # Ablation: WPR with one iteration everywhere, i.e. attention received from the CLS-weighted start.
    "one_iteration": Variant("Zero-TPrune, 1 iteration", lambda g: ZeroTPrune(gflops=g, iterations=(1, 1, 1))),
    # Baseline: the class token's own attention row (head mean), the score WPR generalises.
    "cls_attention": Variant("CLS attention", lambda g: CLSAttention(gflops=g)),
}


def applied(model, method):
    return contextlib.nullcontext() if method is None else prunelab.apply(model, method)


@torch.inference_mode()
def accelerated_top1(model, method, loader, accelerator, desc: str, progress: bool) -> tuple[int, int]:
    """(correct, total) over an accelerate-prepared loader, predictions gathered over processes, with ``method``
    applied (``None``: dense); the full presets' ImageNet evaluation."""
    from tqdm.auto import tqdm

    correct = total = 0
    with applied(model, method):
        for images, labels in tqdm(loader, desc=desc, disable=not (progress and accelerator.is_main_process)):
            pred = model(images).argmax(-1)
            pred, labels = accelerator.gather_for_metrics((pred, labels))
            correct += int((pred == labels).sum())
            total += labels.numel()
    return correct, total


def model_gflops(model, method) -> float:
    """Analytic GFLOPs (MAC convention) of one image through ``model`` with ``method`` applied."""
    dims = ViTDims.from_timm(model)
    if method is None:
        return vit_gflops(dims)
    with prunelab.apply(model, method) as handle:
        return vit_gflops(dims, handle.plan.tokens_per_block)


@torch.inference_mode()
def hits(model, method, batches, *, desc: str = "eval", progress: bool = True) -> torch.Tensor:
    """[N] bool: whether each image of ``batches`` (``(images, labels)`` pairs) is classified correctly."""
    out = []
    with applied(model, method):
        for images, labels in tqdm(batches, desc=desc, leave=False, disable=not progress):
            pred = model(images).argmax(dim=-1)
            out.append((pred == labels.to(pred.device)).cpu())
    return torch.cat(out)


def throughput(model, method, images: torch.Tensor, *, repeat: int = 5) -> float:
    """Images per second on ``images`` (one batch), median of ``repeat`` timed runs after warm-up."""
    with applied(model, method):
        timing = benchmark(lambda: model(images), warmup=2, repeat=repeat)
    return images.shape[0] / timing.median_s


def standard_error(correct: int, total: int) -> float:
    """Binomial standard error of a top-1 accuracy, in percentage points."""
    p = correct / total
    return 100 * math.sqrt(p * (1 - p) / total)


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Top-1 of ``a`` minus top-1 of ``b`` (per-image hits on the same images) and its paired standard error, in
    points: the images both get right or both get wrong cancel, so it is much tighter than either row's SE."""
    d = a.double() - b.double()
    se = 100 * d.std(unbiased=True).item() / math.sqrt(d.numel()) if d.numel() > 1 else 0.0
    return 100 * d.mean().item(), se
