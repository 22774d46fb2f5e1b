"""Fine-tune a dense Vim with ToP-ViM applied: the official recipe of ZLKong/ToP-ViM (b5bc231,
``vim/scripts/ft-vim-s.sh`` and ``ft-vim-t.sh``, run through its DeiT-derived ``vim/main.py``) for Zhan et al.,
"Exploring Token Pruning in Vision State Space Models", NeurIPS 2024 (arXiv 2409.18962).

    accelerate launch -m prunelab.reproductions.top_vim.finetune --imagenet-train DIR --checkpoint FILE --out FILE

Recipe, from the scripts: 30 epochs from the dense hustvl checkpoint, AdamW, ``--lr 5e-6``, ``--warmup-lr 1e-5``,
``--min-lr 1e-5``, ``--weight-decay 1e-8``, ``--drop-path 0``, batch 64 per GPU (Vim-S on 4 GPUs, Vim-T on 8),
``--no_amp``. From ``main.py``'s defaults (the scripts do not set them; read at commit 6fd6282): 5 warm-up epochs;
timm 0.4.12's per-epoch cosine schedule; the lr scaled linearly by the total batch, ``lr * 64 * GPUs / 512`` (Vim-S:
2.5e-6, Vim-T: 5e-6; ``--unscale-lr`` turns it off as in DeiT), so the base lr lies below the warm-up and minimum lr:
the lr falls from 1e-5 towards the base lr over the warm-up and climbs back to 1e-5 along the cosine (kept as the
official code runs it);
AdamW with eps 1e-8, no weight decay on biases, 1-d parameters, ``pos_embed`` and ``cls_token`` (timm's
``create_optimizer``); no gradient clipping; DeiT's augmentation (timm ``create_transform(is_training=True)``:
RandAugment ``rand-m9-mstd0.5-inc1``, bicubic, random erasing 0.25 in pixel mode, colour jitter 0.3, which timm
ignores when RandAugment is on) and mixup 0.8 / cutmix 1.0 (switch probability 0.5, per batch) with label smoothing
0.1 and ``SoftTargetCrossEntropy``. As ``main.py``, epoch e trains at the schedule's value for epoch max(e - 1, 0)
(it steps the scheduler with the finished epoch's index).

Not reproduced: ``main.py``'s repeated-augmentation sampler (on by default in its distributed runs; here accelerate's
plain shuffled sharding), its model EMA (kept but never evaluated or saved as the model), the evaluation after every
epoch and the ``best_checkpoint.pth`` chosen on the validation set (here the last epoch is saved), and the official
code's pruning path (its hard-coded gather-based block; here ``ToPViM`` with ``--alignment``, default the paper's
aligned ``zero_slot``, ``gapped`` for PlainMamba, whose recipe is not released and which gets the same one;
``--alignment none`` fine-tunes the EViT-style baseline). The output holds
``{"model": state_dict, "args": dict, "train_loss": [per-epoch means]}``; ``load_vim_checkpoint`` reads it, and the
full preset evaluates it with ``--finetuned``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from prunelab.cli import NON_NEGATIVE, POSITIVE, RATIO, existing
from prunelab.methods.top_vim.method import ALIGNMENTS
from prunelab.methods.top_vim.scan import IMPLS
from prunelab.reproductions.top_vim.full import (
    MODELS,
    build_model,
    classes_of,
    defaults,
    image_folder,
    load,
    method_for,
)

NO_DECAY = ("pos_embed", "cls_token")  # hustvl VisionMamba.no_weight_decay() (of the names this model has)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m prunelab.reproductions.top_vim.finetune",
                                description=__doc__.split("\n")[0])
    p.add_argument("--imagenet-train", type=existing("dir"), required=True,
                   help="ImageNet-1k training folder (ImageFolder layout: train/<wnid>/*.JPEG)")
    p.add_argument("--checkpoint", type=existing("file"), default=None,
                   help="dense hustvl Vim checkpoint to start from; required unless --no-pretrained")
    p.add_argument("--out", required=True, help="the fine-tuned checkpoint (.pth), rewritten after every epoch")
    p.add_argument("--model", choices=sorted(MODELS), default="vim_s")
    p.add_argument("--epochs", type=POSITIVE, default=30)
    p.add_argument("--lr", type=float, default=5e-6, help="base lr before the linear scaling by batch / 512")
    p.add_argument("--unscale-lr", action="store_true", help="use --lr as given (DeiT's switch)")
    p.add_argument("--warmup-lr", type=float, default=1e-5)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--warmup-epochs", type=NON_NEGATIVE, default=5)
    p.add_argument("--weight-decay", type=float, default=1e-8)
    p.add_argument("--batch-size", type=POSITIVE, default=64, help="images per process (even: mixup pairs them)")
    p.add_argument("--workers", type=NON_NEGATIVE, default=8)
    p.add_argument("--limit", type=POSITIVE, default=None, help="train on N images only (smoke runs)")
    p.add_argument("--keep-ratio", type=RATIO, default=None, help="default: 0.8 for Vim, 0.6 for PlainMamba")
    p.add_argument("--blocks", type=POSITIVE, nargs="+", default=None, help="default: 5 10 15 of 24, scaled")
    p.add_argument("--alignment", choices=ALIGNMENTS, default=None,
                   help="default: zero_slot for Vim, gapped for PlainMamba")
    p.add_argument("--scan-impl", choices=IMPLS, default="parallel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-pretrained", action="store_true", help="start from random weights (pipeline checks)")
    p.add_argument("--no-progress", action="store_true")
    args = defaults(p.parse_args(argv))
    if args.checkpoint is None and not args.no_pretrained:
        p.error("--checkpoint: the dense checkpoint to fine-tune is required (or --no-pretrained)")
    if args.batch_size % 2:
        p.error(f"--batch-size: mixup pairs the images of a batch, so it must be even, got {args.batch_size}")
    for name in ("lr", "warmup_lr", "min_lr", "weight_decay"):
        if not getattr(args, name) >= 0:
            p.error(f"--{name.replace('_', '-')}: expected a number >= 0, got {getattr(args, name)}")
    return args


def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, with 0 bits giving the black image older Pillow gave (Pillow >= 12 refuses 0 bits)."""
    from PIL import Image
    from timm.data.auto_augment import posterize

    return Image.new(img.mode, img.size) if bits_to_keep <= 0 else posterize(img, bits_to_keep, **kwargs)


def zero_bit_posterize(transform):
    """Let ``transform``'s RandAugment posterize keep 0 bits. ``rand-m9-mstd0.5-inc1`` draws magnitudes up to 10,
    where "PosterizeIncreasing" keeps 0 bits: the black image with the Pillow DeiT and Vim trained with, an error
    (and a crashed epoch) with ours. Returns ``transform``, changed in place."""
    from timm.data.auto_augment import RandAugment

    for t in getattr(transform, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
    return transform


def lr_at(epoch: int, base: float, args: argparse.Namespace) -> float:
    """The lr of 0-based ``epoch``: timm 0.4.12's ``CosineLRScheduler`` (warm-up from ``warmup_lr``, cosine from
    ``base`` to ``min_lr`` over ``epochs``), one epoch late as ``main.py`` steps it."""
    t = max(epoch - 1, 0)
    if t < args.warmup_epochs:
        return args.warmup_lr + t * (base - args.warmup_lr) / args.warmup_epochs
    return args.min_lr + 0.5 * (base - args.min_lr) * (1 + math.cos(math.pi * t / args.epochs))


def main(argv: list[str] | None = None) -> Path:
    from accelerate import Accelerator
    from timm.data import Mixup, create_transform
    from timm.loss import SoftTargetCrossEntropy
    from tqdm.auto import tqdm

    import prunelab

    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision="no")  # the scripts' --no_amp
    torch.manual_seed(args.seed + accelerator.process_index)
    model = build_model(args.model, args.scan_impl)
    if args.checkpoint is not None:
        load(model, args.checkpoint, "--checkpoint")
    method = method_for(args, args.alignment, model.cfg.depth)
    data = image_folder(args.imagenet_train, zero_bit_posterize(create_transform(
        input_size=model.cfg.img_size[0], is_training=True, color_jitter=0.3, auto_augment="rand-m9-mstd0.5-inc1",
        interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1)), args.limit, "--imagenet-train")
    if len(classes_of(data)) > model.cfg.num_classes:
        raise ValueError(f"--imagenet-train: {len(classes_of(data))} class folders, more than the model's "
                         f"{model.cfg.num_classes} classes")
    if len(data) < args.batch_size * accelerator.num_processes:
        raise ValueError(f"--batch-size: {args.batch_size} x {accelerator.num_processes} processes is more than the "
                         f"{len(data)} training images (--limit)")
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, pin_memory=torch.cuda.is_available())
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch", label_smoothing=0.1,
                  num_classes=model.cfg.num_classes)
    params = [p for p in model.parameters() if p.requires_grad]
    no_decay = {id(p) for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias") or n in NO_DECAY}
    groups = [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": args.weight_decay},
              {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
    base_lr = args.lr if args.unscale_lr else args.lr * args.batch_size * accelerator.num_processes / 512
    opt = torch.optim.AdamW(groups, lr=lr_at(0, base_lr, args), eps=1e-8)
    handle = prunelab.apply(model, method)  # before wrapping: the seam replaces the model's own forward
    model, opt, loader = accelerator.prepare(model, opt, loader)
    criterion, out, losses = SoftTargetCrossEntropy(), Path(args.out), []
    out.parent.mkdir(parents=True, exist_ok=True)
    model.train()
    try:
        for epoch in range(args.epochs):
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch, base_lr, args)
            total = count = 0.0
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}",
                       disable=args.no_progress or not accelerator.is_main_process)
            for images, labels in bar:
                images, targets = mixup(images, labels)
                loss = criterion(model(images), targets)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}; stopping (as main.py)")
                opt.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                opt.step()
                total, count = total + loss.item(), count + 1
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
            mean = accelerator.reduce(torch.tensor([total, count], device=accelerator.device), "sum")
            losses.append(float(mean[0] / mean[1]))
            if accelerator.is_main_process:
                state = {k: v.detach().cpu() for k, v in accelerator.unwrap_model(model).state_dict().items()}
                torch.save({"model": state, "args": dict(vars(args)), "train_loss": losses}, out)
                print(f"epoch {epoch + 1}: mean loss {losses[-1]:.4f}; wrote {out}")
    finally:
        handle.remove()
    return out


if __name__ == "__main__":
    main()
