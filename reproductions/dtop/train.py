"""Training for the full preset: stage A (the base segmenter, nothing pruned) and stage B (fine-tuning with DToP
active) on ADE20K, with the official configs' recipe.

    accelerate launch -m prunelab.reproductions.dtop.train --ade20k DIR --model vit_b --stage base --iters 160000
    accelerate launch -m prunelab.reproductions.dtop.train --ade20k DIR --model vit_b --stage dtop \\
        --init runs/dtop/train/vit_b-base.safetensors --iters 40000

Recipe (``config/prune/prune_segvit_ade20k.py`` of the official code): AdamW, lr 2e-5 (x10 for the heads), betas
(0.9, 0.999), weight decay 0.01; a linear warm-up from 1e-6 of the rate over 1.5k iterations, then poly decay
(power 0.9) to zero; batch 16 in all (4 per GPU on 4 GPUs: ``--batch`` is per process); every head trained with the
ATM loss on its own canvas (``Segmenter.loss``); stage B selects under ``no_grad`` (the seam). Augmentation as
mmseg's ADE20K pipeline: random rescale of the config's scale (ViT-B 2048 x 512, ViT-L 2560 x 640) by 0.5-2.0, a
random crop in which no class covers more than 75 % (10 tries), horizontal flip; mmseg's photometric distortion is
replaced by a brightness and contrast jitter (said in the README). ``--pretrained`` starts the encoder from timm's
default weights for the config's model name (the official configs start from mmseg's conversion of Segmenter's
ImageNet-21k ViT checkpoints, which timm does not ship under that name: results can differ by that).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from prunelab.cli import NON_NEGATIVE, POSITIVE, existing
from prunelab.methods.dtop import DToP
from prunelab.reproductions.dtop.full import CONFIGS, MEAN, STD, build, load_checkpoint

WARMUP, HEAD_LR_MULT, LR, WEIGHT_DECAY = 1500, 10.0, 2e-5, 0.01


class ADE20KTrain(torch.utils.data.Dataset):
    """Training crops of ADE20K: (image [3, crop, crop] normalised, label [crop, crop], 0-149 and 255 ignored)."""

    def __init__(self, root: str | Path, crop: int, scale: tuple[int, int] = (2048, 512), seed: int = 0):
        root = Path(root)
        self.images = sorted((root / "images" / "training").glob("*.jpg"))
        if not self.images:
            raise FileNotFoundError(f"--ade20k: no images/training/*.jpg under {root}")
        self.labels = [root / "annotations" / "training" / f"{p.stem}.png" for p in self.images]
        self.crop, self.scale, self.seed = crop, scale, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        rng = np.random.default_rng([self.seed, i, torch.randint(1 << 30, ()).item()])
        img = Image.open(self.images[i]).convert("RGB")
        lab = Image.open(self.labels[i])
        w, h = img.size
        ratio = rng.uniform(0.5, 2.0)
        scale = min(self.scale[0] * ratio / max(w, h), self.scale[1] * ratio / min(w, h))
        size = (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5)))
        img, lab = img.resize(size, Image.BILINEAR), lab.resize(size, Image.NEAREST)
        x = np.asarray(img, dtype=np.float32)
        y = np.asarray(lab, dtype=np.int64)
        y = np.where(y == 0, 255, y - 1)  # reduce_zero_label
        x, y = self._crop(rng, x, y)
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        x = np.clip((x - x.mean()) * rng.uniform(0.8, 1.2) + x.mean() + rng.uniform(-32, 32), 0, 255)
        x = (torch.from_numpy(np.ascontiguousarray(x)) - torch.tensor(MEAN)) / torch.tensor(STD)
        return x.permute(2, 0, 1).float(), torch.from_numpy(np.ascontiguousarray(y))

    def _crop(self, rng, x: np.ndarray, y: np.ndarray):
        c = self.crop
        ph, pw = max(c - y.shape[0], 0), max(c - y.shape[1], 0)
        x = np.pad(x, ((0, ph), (0, pw), (0, 0)))
        y = np.pad(y, ((0, ph), (0, pw)), constant_values=255)
        for _ in range(10):  # mmseg's cat_max_ratio = 0.75
            t, left = rng.integers(0, y.shape[0] - c + 1), rng.integers(0, y.shape[1] - c + 1)
            cy = y[t:t + c, left:left + c]
            _, counts = np.unique(cy[cy != 255], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < 0.75:
                break
        return x[t:t + c, left:left + c], cy


def lr_factor(it: int, total: int) -> float:
    """The configs' schedule: linear from 1e-6 to 1 over the warm-up, then poly (power 0.9) to zero at ``total``."""
    if it < WARMUP:
        return 1e-6 + (1 - 1e-6) * it / WARMUP
    return (1 - (it - WARMUP) / max(1, total - WARMUP)) ** 0.9 if it < total else 0.0


def main(argv: list[str] | None = None) -> Path:
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    import prunelab

    p = argparse.ArgumentParser(prog="python -m prunelab.reproductions.dtop.train", description=__doc__.split("\n")[0])
    p.add_argument("--ade20k", type=existing("dir"), required=True, help="ADEChallengeData2016 folder")
    p.add_argument("--model", choices=sorted(CONFIGS), default="vit_b")
    p.add_argument("--stage", choices=("base", "dtop"), required=True, help="base: stage A; dtop: stage B")
    p.add_argument("--init", type=existing("file"), default=None, help="stage B: the stage-A checkpoint")
    p.add_argument("--pretrained", action="store_true", help="stage A: start the encoder from timm's weights")
    p.add_argument("--iters", type=POSITIVE, default=40_000, help="iterations (configs: 160k base, 40k fine-tune)")
    p.add_argument("--batch", type=POSITIVE, default=4, help="crops per process (4 x 4 GPUs = the configs' 16)")
    p.add_argument("--p0", type=float, default=None, help="stage B threshold (default: the config's)")
    p.add_argument("--workers", type=NON_NEGATIVE, default=4)
    p.add_argument("--save-every", type=POSITIVE, default=5000)
    p.add_argument("--out", default="runs/dtop/train")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.stage == "dtop" and args.init is None:
        p.error("--init: stage B fine-tunes a stage-A checkpoint; pass it")
    cfg = CONFIGS[args.model]
    # blocks that every token of a batch skipped get no gradient (the official config also sets this)
    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    model = build(args.model, pretrained=args.pretrained)
    if args.init is not None:
        load_checkpoint(model, args.init)
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith("heads.")], "lr": LR},
              {"params": [p for n, p in model.named_parameters() if n.startswith("heads.")], "lr": LR * HEAD_LR_MULT}]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY)
    data = ADE20KTrain(args.ade20k, cfg["crop"], cfg["scale"])
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                         drop_last=len(data) >= args.batch, pin_memory=torch.cuda.is_available())
    model, opt, loader = accelerator.prepare(model, opt, loader)
    core = accelerator.unwrap_model(model)
    handle = prunelab.apply(core, DToP(p0=cfg["p0"] if args.p0 is None else args.p0)) if args.stage == "dtop" else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.model}-{args.stage}.safetensors"
    model.train()
    it, bar = 0, tqdm(total=args.iters, disable=args.no_progress or not accelerator.is_main_process)
    try:
        while it < args.iters:
            for x, y in loader:
                for g, base in zip(opt.param_groups, (LR, LR * HEAD_LR_MULT)):
                    g["lr"] = base * lr_factor(it, args.iters)
                _, outs = model(x, return_heads=True)  # the wrapper calls the segmenter's (DToP's) forward
                loss = core.loss(outs, y)
                opt.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                opt.step()
                it += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if accelerator.is_main_process and (it % args.save_every == 0 or it == args.iters):
                    save_file({k: v.detach().cpu().contiguous() for k, v in core.state_dict().items()}, str(path))
                if it >= args.iters:
                    break
    finally:
        bar.close()
        if handle is not None:
            handle.remove()
    if accelerator.is_main_process and math.isfinite(loss.item()):
        print(f"wrote {path} after {it} iterations (last loss {loss.item():.3f})")
    return path


if __name__ == "__main__":
    main()
