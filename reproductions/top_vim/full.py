"""Full preset: ToP-ViM on ImageNet-1k val with hustvl's Vim-S or Vim-T, or PlainMamba-L1/L2/L3 (Zhan et al.,
"Exploring Token Pruning in Vision State Space Models", NeurIPS 2024, arXiv 2409.18962).

Three rows at the same schedule (default: prune after blocks 5, 10, 15 at keep ratio 0.8, as the official code
ZLKong/ToP-ViM at b5bc231 hard-codes in ``vim/models_mamba.py``): the dense model, EViT-style naive pruning
(``ToPViM(alignment="none")``: the pruned tokens are removed and the survivors renumbered) and ToP-ViM with the
pruning-aware hidden-state alignment (``--alignment``, default ``zero_slot``). The paper's numbers are fine-tuned
ones (30 epochs with the method applied, ``prunelab.reproductions.top_vim.finetune``): pass the fine-tuned
checkpoints with ``--finetuned`` (ToP-ViM) and ``--finetuned-naive`` (EViT-style); without them that row is
evaluated zero-shot on the dense ``--checkpoint`` and the table's ``weights`` column says so.

Data: ``--imagenet`` is the validation set in ImageFolder layout (``val/<wnid>/*.JPEG``, the class order of hustvl's
training folder). The transform is DeiT's evaluation transform that hustvl/Vim's ``vim/datasets.py`` uses: resize
the shorter side to ``int(224 / 0.875) = 256`` (bicubic), centre crop 224, ImageNet mean and std. GFLOPs are the
analytic per-image MACs of :mod:`prunelab.methods.top_vim.flops` (Vim-S: 5.08 dense, 3.57 naive, 3.61 aligned).

PlainMamba (``--model plainmamba_l3``, the paper's headline: 82.3 -> 81.7 at -41.6 % FLOPs; checkpoints from
ChenhongyiYang/PlainMamba): no CLS, so ``--alignment`` is ``gapped`` (default) or ``none`` (the naive row), and no
schedule is released: the default is the Vim-S blocks scaled to the depth (L3: 8, 15, 23) at ``--keep-ratio 0.6``
(:data:`PLAIN_KEEP_RATIO`). Its GFLOPs use the fvcore scan count of the release (dense L3: 14.4). The release's test
transform (resize the shorter side to 256, bicubic, centre crop 224, ImageNet mean and std) is the same as Vim's.

Several GPUs: ``accelerate launch -m prunelab.cli reproduce top_vim --preset full --imagenet DIR --checkpoint FILE``;
images are sharded by accelerate and the predictions gathered (``gather_for_metrics``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from prunelab.cli import NON_NEGATIVE, POSITIVE, RATIO, existing
from prunelab.common.provenance import markdown_table, provenance, write_results
from prunelab.methods.top_vim import ToPViM, VimConfig, VisionMamba, dense_macs, load_vim_checkpoint, top_vim_macs
from prunelab.methods.top_vim.checkpoint import load_plain_mamba_checkpoint
from prunelab.methods.top_vim.flops import PlainDims, plain_mamba_macs
from prunelab.methods.top_vim.method import ALIGNMENTS, scaled_blocks
from prunelab.methods.top_vim.plain_mamba import ARCHS, PlainMamba, PlainMambaConfig
from prunelab.methods.top_vim.plain_seam import PLAIN_ALIGNMENTS, plain_tokens_per_block
from prunelab.methods.top_vim.scan import IMPLS
from prunelab.reproductions.zero_tprune.evaluate import accelerated_top1, standard_error

MODELS = {  # hustvl's released middle-CLS configs (vim.py); PlainMamba's arch_zoo (plain_mamba.py)
    "vim_t": {"embed_dim": 192},
    "vim_s": {"embed_dim": 384},
    "plainmamba_l1": {"arch": "L1"},
    "plainmamba_l2": {"arch": "L2"},
    "plainmamba_l3": {"arch": "L3"},
    # the pipeline's end-to-end checks on CPU, not paper settings
    "smoke": {"embed_dim": 32, "depth": 4, "img_size": 32, "patch_size": 8, "d_state": 4},
    "plainmamba_smoke": {"arch": "L1", "embed_dim": 32, "depth": 4, "img_size": 32, "patch_size": 8, "d_state": 4,
                         "conv_size": 3},
}
EVAL_CROP_RATIO = 0.875  # DeiT's --eval-crop-ratio default, kept by hustvl/Vim; PlainMamba's resize 256, crop 224
PAPER_KEEP_RATIO = 0.8
# PlainMamba: no schedule is released. Vim-S's blocks scaled to 36 (8, 15, 23) at 0.6 change the GFLOPs by -42.2 %
# under the release's count, the round ratio nearest the abstract's -41.6 %
PLAIN_KEEP_RATIO = 0.6
COLUMNS = ["method", "alignment", "weights", "gflops", "gflops_change_%", "top1", "top1_se", "top1_change",
           "paper_top1", "paper_gflops", "paper_gflops_change_%"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--imagenet", type=existing("dir"), required=True,
                        help="ImageNet-1k validation folder (ImageFolder layout: val/<wnid>/*.JPEG)")
    parser.add_argument("--model", choices=sorted(MODELS), default="vim_s",
                        help="vim_s / vim_t: hustvl's Vim-S / Vim-T; plainmamba_l1/l2/l3: PlainMamba; smoke, "
                             "plainmamba_smoke: tiny models for pipeline checks")
    parser.add_argument("--checkpoint", type=existing("file"), default=None,
                        help="dense checkpoint (.pth): hustvl Vim, or PlainMamba's l1/l2/l3.pth; required unless "
                             "--no-pretrained")
    parser.add_argument("--finetuned", type=existing("file"), default=None,
                        help="checkpoint fine-tuned with ToP-ViM (finetune.py); default: the method zero-shot")
    parser.add_argument("--finetuned-naive", type=existing("file"), default=None,
                        help="checkpoint fine-tuned with naive pruning (finetune.py --alignment none)")
    parser.add_argument("--keep-ratio", type=RATIO, default=None,
                        help=f"keep ratio per pruning step (default: {PAPER_KEEP_RATIO} for Vim, "
                             f"{PLAIN_KEEP_RATIO} for PlainMamba)")
    parser.add_argument("--blocks", type=POSITIVE, nargs="+", default=None,
                        help="1-based blocks after which tokens are pruned (default: 5 10 15 of 24, scaled)")
    parser.add_argument("--alignment", choices=ALIGNMENTS, default=None,
                        help="ToP-ViM's alignment (default: zero_slot for Vim, gapped for PlainMamba, which supports "
                             "gapped and none)")
    parser.add_argument("--scan-impl", choices=IMPLS, default="parallel", help="selective-scan implementation")
    parser.add_argument("--batch-size", type=POSITIVE, default=64)
    parser.add_argument("--workers", type=NON_NEGATIVE, default=8, help="data-loading processes")
    parser.add_argument("--limit", type=POSITIVE, default=None,
                        help="evaluate only N images, spread evenly over the folder (smoke runs)")
    parser.add_argument("--no-pretrained", action="store_true",
                        help="random weights (pipeline checks only; accuracy is meaningless)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def expected() -> dict:
    return yaml.safe_load(Path(__file__).with_name("expected.yaml").read_text())


def is_plain(name: str) -> bool:
    return name.startswith("plainmamba")


def build_model(name: str, scan_impl: str = "parallel") -> VisionMamba | PlainMamba:
    """The ``--model`` config (hustvl's Vim-T/S, PlainMamba-L1/L2/L3 or a smoke model), randomly initialised."""
    cfg = dict(MODELS[name])
    if is_plain(name):
        return PlainMamba(PlainMambaConfig(**{**ARCHS[cfg.pop("arch")], **cfg, "scan_impl": scan_impl}))
    return VisionMamba(VimConfig(**cfg, scan_impl=scan_impl))


def load(model: VisionMamba | PlainMamba, path: str, option: str) -> VisionMamba | PlainMamba:
    """:func:`load_vim_checkpoint` or :func:`load_plain_mamba_checkpoint`, the error naming the option."""
    try:
        if isinstance(model, PlainMamba):
            return load_plain_mamba_checkpoint(model, path)
        return load_vim_checkpoint(model, path)
    except ValueError as err:
        raise ValueError(f"{option}: {err}") from err


def defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the family-dependent defaults of ``--keep-ratio`` and ``--alignment`` (in place); returns ``args``."""
    plain = is_plain(args.model)
    if args.keep_ratio is None:
        args.keep_ratio = PLAIN_KEEP_RATIO if plain else PAPER_KEEP_RATIO
    if args.alignment is None:
        args.alignment = "gapped" if plain else "zero_slot"
    if plain and args.alignment not in PLAIN_ALIGNMENTS:
        raise SystemExit(f"--alignment: PlainMamba supports {', '.join(PLAIN_ALIGNMENTS)}, got {args.alignment}")
    return args


def gflops(model: VisionMamba | PlainMamba, method: ToPViM | None, scan_convention: str = "fvcore") -> float:
    """Per-image GFLOPs (one MAC = one FLOP) under ``method`` (None: dense): Vim by :func:`vim_macs`; PlainMamba by
    :func:`plain_mamba_macs`, by default with the fvcore scan count its release reports (dense L3: 14.4)."""
    if isinstance(model, PlainMamba):
        dims = PlainDims.from_model(model)
        tokens = None if method is None else plain_tokens_per_block(method, dims.num_tokens, dims.depth)
        return plain_mamba_macs(dims, tokens, scan_convention=scan_convention) / 1e9
    return (dense_macs(model) if method is None else top_vim_macs(model, method)) / 1e9


def method_for(args: argparse.Namespace, alignment: str, depth: int) -> ToPViM:
    """ToP-ViM at the command line's schedule; an error naming ``--blocks`` if it does not fit the model."""
    method = ToPViM(keep_ratio=args.keep_ratio, blocks=tuple(args.blocks) if args.blocks else None,
                    alignment=alignment)
    try:
        method.prune_blocks(depth)
    except ValueError as err:
        raise SystemExit(f"--blocks: {str(err).removeprefix('blocks: ')}") from err
    return method


def image_folder(root: str, transform, limit: int | None = None, option: str = "--imagenet"):
    """An ImageFolder at ``root`` (classes sorted by folder name), ``limit`` images spread evenly over it."""
    from torchvision.datasets import ImageFolder

    try:
        dataset = ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise FileNotFoundError(f"{option}: {root} is not an ImageFolder (<class>/<image> files): {err}") from err
    if limit and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, [i * len(dataset) // limit for i in range(limit)])
    return dataset


def classes_of(dataset) -> list[str]:
    return (dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset).classes


def eval_transform(img_size: int):
    """DeiT's evaluation transform (hustvl/Vim ``vim/datasets.py``, ``build_transform(is_train=False)``)."""
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(int(img_size / EVAL_CROP_RATIO), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def run(args: argparse.Namespace, out: Path) -> dict:
    from accelerate import Accelerator

    if args.checkpoint is None and not args.no_pretrained:
        raise SystemExit("--checkpoint: required (a hustvl Vim checkpoint, e.g. vim_s_midclstok_80p5acc.pth for "
                         "--model vim_s, or PlainMamba's l3.pth for --model plainmamba_l3); --no-pretrained checks the "
                         "pipeline on random weights")
    defaults(args)
    accelerator = Accelerator()
    model = build_model(args.model, args.scan_impl)
    depth, img_size = model.cfg.depth, model.cfg.img_size[0]
    naive, top = method_for(args, "none", depth), method_for(args, args.alignment, depth)
    if args.checkpoint is not None:
        load(model, args.checkpoint, "--checkpoint")
    weights = {"dense": "dense" if args.checkpoint else "random"}
    models = {"dense": model}
    for key, option, path in (("naive", "--finetuned-naive", args.finetuned_naive),
                              ("top", "--finetuned", args.finetuned)):
        if path is not None:
            models[key] = load(build_model(args.model, args.scan_impl), path, option)
            weights[key] = f"fine-tuned ({option})"
        else:
            models[key], weights[key] = model, f"{weights['dense']}, zero-shot"
    for m in models.values():
        m.eval().to(accelerator.device)

    dataset = image_folder(args.imagenet, eval_transform(img_size), args.limit)
    classes, num_classes = len(classes_of(dataset)), model.cfg.num_classes
    if classes > num_classes or ("smoke" not in args.model and classes != num_classes):
        raise ValueError(f"--imagenet: {classes} class folders, the model has {num_classes} classes (pass the "
                         "ImageNet-1k val folder with all 1000 <wnid> folders)")
    loader = accelerator.prepare(torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.workers, pin_memory=torch.cuda.is_available()))

    paper = expected().get(args.model) or {}
    default_ratio = PLAIN_KEEP_RATIO if is_plain(args.model) else PAPER_KEEP_RATIO
    paper_schedule = args.keep_ratio == default_ratio and top.prune_blocks(depth) == scaled_blocks(depth)
    rows = []
    naive_name = "ToP-ViM without alignment" if is_plain(args.model) else "EViT-style"
    for key, name, method in (("dense", "dense", None), ("naive", naive_name, naive), ("top", "ToP-ViM", top)):
        correct, total = accelerated_top1(models[key], method, loader, accelerator, name, not args.no_progress)
        cited = paper.get(key, {}) if (paper_schedule or method is None) else {}
        rows.append({"method": name, "alignment": "" if method is None else method.alignment,
                     "weights": weights[key], "gflops": gflops(model, method), "top1": 100 * correct / total,
                     "top1_se": standard_error(correct, total), "paper_top1": cited.get("top1", "n/a"),
                     "paper_gflops": cited.get("gflops", "n/a"),
                     "paper_gflops_change_%": cited.get("gflops_change_pct", "n/a")})
    for r in rows:
        r["gflops_change_%"] = 100 * (r["gflops"] / rows[0]["gflops"] - 1)
        r["top1_change"] = r["top1"] - rows[0]["top1"]
    result = {"rows": rows}
    if accelerator.is_main_process:
        meta = provenance(preset="full", model=args.model, config=MODELS[args.model], checkpoint=str(args.checkpoint),
                          finetuned=str(args.finetuned), finetuned_naive=str(args.finetuned_naive),
                          pretrained=not args.no_pretrained, n_images=total, keep_ratio=args.keep_ratio,
                          blocks=list(top.prune_blocks(depth)), alignment=args.alignment, scan_impl=args.scan_impl,
                          transform=f"resize {int(img_size / EVAL_CROP_RATIO)} bicubic, centre crop {img_size}",
                          processes=accelerator.num_processes,
                          paper_source=paper.get("source", "n/a (not a paper setting)"))
        zero_shot = "" if args.finetuned else " (ToP-ViM zero-shot: no --finetuned checkpoint)"
        write_results(out, "table", rows, meta, COLUMNS,
                      title=f"ToP-ViM, full preset: ImageNet-1k val, {args.model}{zero_shot}")
        print(markdown_table(rows, COLUMNS))
        result["provenance"] = meta
    return result


def default_out() -> Path:
    return Path("runs") / "top_vim" / "full"
