"""A tiny DeiT-like timm ViT trained on Fashion-MNIST, cached on disk, for CPU pruning experiments.

The model sees 56 px images through 4 px patches: 14 x 14 = 196 patch tokens plus one CLS token, the same
197-token sequence as DeiT at 224 px, so token pruning acts on it at DeiT's granularity.

Run ``python -m prunelab.reproductions.zero_tprune.tiny_vit [--retrain] [--data DIR]`` to train or load it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator

import timm
import torch
import torch.nn.functional as F
from timm.layers import Format
from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from prunelab.common import packaged
from prunelab.reproductions.zero_tprune.data import (
    FILES,
    IMG_SIZE,
    batches,
    file_sha256,
    load_fashion_mnist,
    preprocess,
    split_paths,
)


@dataclasses.dataclass(frozen=True)
class TinyViTConfig:
    """Architecture and training recipe; every field enters the cache key.

    The defaults were chosen by measurement on 2 CPU cores (AMD EPYC, torch 2.13): about 140 s of
    training plus 20 s to evaluate 10k test images, for about 82% test top-1. With the same budget, plain
    56 px training reached 74%; batch 32 beat 64 and 128, mlp_ratio 2 beat 4 per second of training.
    """

    img_size: int = 56
    patch_size: int = 4
    in_chans: int = 1
    num_classes: int = 10
    embed_dim: int = 64
    depth: int = 8
    num_heads: int = 2
    mlp_ratio: float = 2.0
    # Resolution curriculum: (input px, images seen) per phase, in one seeded random order over the 60k
    # training images (more than 60k means more than an epoch). 28 px gives 7 x 7 = 49 tokens, about 5x
    # cheaper per image than 56 px; the last phase runs at img_size, on the real 197-token sequence.
    phases: tuple[tuple[int, int], ...] = ((28, 60000), (56, 15000))
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    augment: bool = False  # random flip + shift; not worth it with little more than one epoch
    label_smoothing: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def key(self) -> str:
        """Returns a short, stable hash of all fields, used to name the cache file."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_tiny_vit(cfg: TinyViTConfig) -> VisionTransformer:
    """Builds the (untrained) DeiT-like ViT: CLS token, token pooling, 197 tokens at the defaults."""
    return VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        class_token=True, global_pool="token",
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 500,
    size: int = IMG_SIZE,
) -> float:
    """Returns the top-1 accuracy (in %) of ``model`` on uint8 ``images`` [N, 28, 28] resized to ``size``."""
    model.eval()
    correct = 0
    for x, y in batches(images, labels, batch_size, size=size):
        correct += (model(x).argmax(-1) == y).sum().item()
    return 100.0 * correct / len(labels)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a shift of up to 2 px of the 28 px original, per image."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    size = x.shape[-1]
    pad = size // 14
    # Pad with the normalised background value so shifted-in borders look like the real background.
    padded = F.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    dx, dy = torch.randint(0, 2 * pad + 1, (2, n), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + size, dx[i] : dx[i] + size] for i in range(n)])


def _index_stream(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Yields index batches over endless seeded permutations of ``range(n)`` (epoch after epoch)."""
    while True:
        yield from torch.randperm(n, generator=gen).split(batch_size)


@contextlib.contextmanager
def _low_res(model: VisionTransformer) -> Iterator[None]:
    """Lets ``model`` take smaller inputs, resampling its 14 x 14 position embedding on the fly.

    It switches on timm's own ``dynamic_img_size`` path for the duration, so the model keeps its
    DeiT-like structure (and one optimiser state) across the low- and full-resolution phases.
    """
    pe = model.patch_embed
    saved = (model.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt)
    model.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt = True, False, False, Format.NHWC
    try:
        yield
    finally:
        model.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt = saved


def _lr_at(progress: float, cfg: TinyViTConfig) -> float:
    """Linear warmup then cosine decay to zero; ``progress`` runs from 0 to 1 over the training compute."""
    if progress < cfg.warmup_frac:
        return cfg.lr * max(progress, 1e-3) / cfg.warmup_frac
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (progress - cfg.warmup_frac) / (1.0 - cfg.warmup_frac)))


def train_tiny_vit(
    cfg: TinyViTConfig, data_root: str | None = None, progress: bool = True
) -> tuple[VisionTransformer, dict]:
    """Trains the tiny ViT deterministically and evaluates it on the full 10k test set.

    Args:
        cfg: Architecture and recipe.
        data_root: Folder of the Fashion-MNIST IDX gz files; defaults to the Debian package's.
        progress: Show a tqdm bar over the training images.

    Returns:
        ``(model, info)`` with the model in eval mode and ``info`` describing the run.
    """
    if not cfg.phases or cfg.phases[-1][0] != cfg.img_size:
        raise ValueError(f"the last of phases={cfg.phases} must run at img_size={cfg.img_size}")
    torch.manual_seed(cfg.seed)
    images, labels = load_fashion_mnist("train", data_root)
    gen = torch.Generator().manual_seed(cfg.seed)
    stream = _index_stream(len(images), cfg.batch_size, gen)
    total = sum(n for _, n in cfg.phases)
    # The schedule advances with compute (tokens processed), not images: a 56 px image costs ~4x a 28 px one,
    # so the 197-token phase gets its share of the learning rate instead of only the cosine's tail.
    tokens = {size: (size // cfg.patch_size) ** 2 + 1 for size, _ in cfg.phases}
    total_cost, cost = sum(n * tokens[size] for size, n in cfg.phases), 0
    model = build_tiny_vit(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    start = time.perf_counter()
    model.train()
    bar = tqdm(total=total, desc="train tiny ViT", unit="img", disable=not progress, dynamic_ncols=True)
    seen, steps, phase_seconds = 0, 0, []
    for size, n_images in cfg.phases:
        phase_start, phase_end = time.perf_counter(), seen + n_images
        with _low_res(model) if size != cfg.img_size else contextlib.nullcontext():
            while seen < phase_end:
                idx = next(stream)[: phase_end - seen]
                x, y = preprocess(images[idx], size), labels[idx]
                if cfg.augment:
                    x = _augment(x, gen)
                for group in opt.param_groups:
                    group["lr"] = _lr_at(cost / total_cost, cfg)
                loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                seen, steps, cost = seen + len(idx), steps + 1, cost + len(idx) * tokens[size]
                bar.update(len(idx))
                bar.set_postfix(px=size, loss=f"{loss.item():.3f}")
        phase_seconds.append(round(time.perf_counter() - phase_start, 1))
    bar.close()
    train_seconds = time.perf_counter() - start

    test_images, test_labels = load_fashion_mnist("test", data_root)
    start = time.perf_counter()
    top1 = evaluate(model, test_images, test_labels, size=cfg.img_size)
    eval_seconds = time.perf_counter() - start
    info = {
        "config": dataclasses.asdict(cfg), "config_key": cfg.key(), "test_top1": top1,
        "train_seconds": round(train_seconds, 1), "phase_seconds": phase_seconds,
        "eval_seconds": round(eval_seconds, 1), "train_images": len(images), "images_seen": total,
        "steps": steps, "torch_version": torch.__version__, "timm_version": timm.__version__,
        "train_images_file": FILES["train"][0],
        "train_images_sha256": file_sha256(split_paths("train", data_root)[0]),
    }
    return model, info


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/prunelab/zero_tprune`` (``~/.cache`` when XDG_CACHE_HOME is unset or empty)."""
    return str(packaged.default_cache_dir("zero_tprune"))


def load_or_train_tiny_vit(
    cfg: TinyViTConfig | None = None,
    cache_dir: str | None = None,
    data_root: str | None = None,
    progress: bool = True,
    retrain: bool = False,
) -> tuple[VisionTransformer, dict]:
    """Loads the trained tiny ViT from the cache, or trains and caches it.

    Args:
        cfg: Configuration; defaults to ``TinyViTConfig()``.
        cache_dir: Cache folder; defaults to ``default_cache_dir()``.
        data_root: Fashion-MNIST folder, used only when training.
        progress: Show the training progress bar.
        retrain: Train even when a cached model exists (and overwrite it).

    Returns:
        ``(model, info)`` with the model in eval mode; ``info["source"]`` is ``"cache"`` or ``"trained"``.
    """
    cfg = TinyViTConfig() if cfg is None else cfg
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    weights = os.path.join(cache_dir, f"tiny_vit-{cfg.key()}.pt")
    meta = weights[: -len(".pt")] + ".json"
    if not retrain and os.path.isfile(weights) and os.path.isfile(meta):
        model = build_tiny_vit(cfg)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        model.eval()
        with open(meta) as f:
            info = json.load(f)
        info["source"] = "cache"
        print(f"tiny ViT: loaded from cache {weights} (test top-1 {info['test_top1']:.2f}%)")
        return model, info

    model, info = train_tiny_vit(cfg, data_root=data_root, progress=progress)
    os.makedirs(cache_dir, exist_ok=True)
    # Write to temporary names then rename, so an interrupted run never leaves a truncated cache entry.
    # The json goes last: its presence marks the entry complete.
    tmp = f".{os.getpid()}.tmp"  # per process, so two concurrent first runs do not write the same file
    torch.save(model.state_dict(), weights + tmp)
    os.replace(weights + tmp, weights)
    with open(meta + tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(meta + tmp, meta)
    info["source"] = "trained"
    top1, secs = info["test_top1"], info["train_seconds"]
    print(f"tiny ViT: trained in {secs:.0f} s (test top-1 {top1:.2f}%), cached at {weights}")
    return model, info


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: train (or load) the default tiny ViT and print its info."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retrain", action="store_true", help="train even if a cached model exists")
    parser.add_argument("--data", metavar="DIR", default=None, help="Fashion-MNIST folder (IDX gz files)")
    parser.add_argument("--cache-dir", metavar="DIR", default=None, help="cache folder for the weights")
    args = parser.parse_args(argv)
    _, info = load_or_train_tiny_vit(cache_dir=args.cache_dir, data_root=args.data, retrain=args.retrain)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
