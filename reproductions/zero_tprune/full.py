"""Full preset: pretrained DeiT-S on ImageNet-1k val, as in the paper.

Needs the timm weights (hub access or a warm hub cache) and the validation set in ImageFolder layout
(``val/<wnid>/*.JPEG``). Several GPUs: ``accelerate launch -m prunelab.cli reproduce zero_tprune
--preset full --imagenet DIR``; evaluation is sharded by accelerate and gathered. Throughput is
measured on one device (the main process) at ``--throughput-batch``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from prunelab.cli import NON_NEGATIVE, POSITIVE, existing
from prunelab.common.provenance import markdown_table, provenance, write_results
from prunelab.methods.zero_tprune.method import PAPER_FLOPS_REDUCTION
from prunelab.reproductions.zero_tprune.evaluate import (
    VARIANTS,
    accelerated_top1,
    model_gflops,
    standard_error,
    throughput,
)

COLUMNS = ["method", "gflops", "throughput_img_s", "throughput_change_%", "top1", "top1_se", "top1_change",
           "paper_top1"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--imagenet", type=existing("dir"), required=True,
                        help="ImageNet-1k validation folder (ImageFolder layout: val/<wnid>/*.JPEG)")
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name")
    parser.add_argument("--batch-size", type=POSITIVE, default=256)
    parser.add_argument("--throughput-batch", type=POSITIVE, default=256)
    parser.add_argument("--workers", type=NON_NEGATIVE, default=8, help="data-loading processes")
    parser.add_argument("--limit", type=POSITIVE, default=None, help="evaluate only the first N images (smoke runs)")
    parser.add_argument("--no-pretrained", action="store_true",
                        help="random weights (pipeline checks only; accuracy is meaningless)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def expected() -> dict:
    return yaml.safe_load((Path(__file__).with_name("expected.yaml")).read_text())


def _loader(args, model, accelerator):
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    if args.imagenet is None or not Path(args.imagenet).is_dir():
        raise FileNotFoundError(f"--imagenet: {args.imagenet} is not a folder; pass the ImageNet-1k val folder "
                                "in ImageFolder layout (val/<wnid>/*.JPEG)")
    dataset = ImageFolder(str(args.imagenet), transform=create_transform(**resolve_data_config({}, model=model)))
    if args.limit:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                         pin_memory=torch.cuda.is_available())
    return accelerator.prepare(loader)


def run(args: argparse.Namespace, out: Path) -> dict:
    import timm
    from accelerate import Accelerator

    accelerator = Accelerator()
    model = timm.create_model(args.model, pretrained=not args.no_pretrained).eval().to(accelerator.device)
    loader = _loader(args, model, accelerator)
    paper = expected().get(args.model, {})
    dense_g = model_gflops(model, None)
    point = (1 - PAPER_FLOPS_REDUCTION) * dense_g
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    tput_x = torch.randn(args.throughput_batch, *size, device=accelerator.device)
    rows, dense_top1, dense_tput = [], None, None
    for key in ("dense", "zero_tprune", "random_drop"):
        variant = VARIANTS[key]
        method = variant.method(point)
        correct, total = accelerated_top1(model, method, loader, accelerator, variant.name,
                                          not args.no_progress)
        acc = 100 * correct / total
        tput = throughput(model, method, tput_x) if accelerator.is_main_process else float("nan")
        dense_top1 = acc if dense_top1 is None else dense_top1
        dense_tput = tput if dense_tput is None else dense_tput
        rows.append({"method": variant.name, "gflops": model_gflops(model, method), "throughput_img_s": tput,
                     "throughput_change_%": 100 * (tput / dense_tput - 1), "top1": acc,
                     "top1_se": standard_error(correct, total), "top1_change": acc - dense_top1,
                     "paper_top1": paper.get(key, {}).get("top1", "n/a")})
    result = {"rows": rows}
    if accelerator.is_main_process:
        meta = provenance(preset="full", model=args.model, pretrained=not args.no_pretrained,
                          n_eval=total, processes=accelerator.num_processes,
                          throughput_batch=args.throughput_batch, paper_source=paper.get("source", "n/a"))
        write_results(out, "table", rows, meta, COLUMNS, title=f"Zero-TPrune, full preset: {args.model}")
        print(markdown_table(rows, COLUMNS))
        result["provenance"] = meta
    return result


def default_out() -> Path:
    return Path("runs") / "zero_tprune" / "full"
