"""The vision-Mamba test-bed: a small Vim (middle class token, bidirectional scans) trained on Fashion-MNIST.

The same data pipeline and token grid as the ViT test-bed (``fashion.preprocess``: 56 px, 4 px patches, 14 x 14 =
196 patch tokens, plus the class token in the middle: 197), so the vision-Mamba and ViT reproductions compare at one
sequence length. The model is :class:`prunelab.methods.top_vim.VisionMamba` (hustvl's Vim "v2" block in plain
PyTorch) at a reduced width and depth, trained with the stepped scan (``scan_impl="stepped"``, the fastest on CPU).

Training follows the ViT test-bed's resolution curriculum: most images at 28 px, where the same patches give 7 x 7
tokens and a step costs about a quarter, then 56 px on the real 197-token sequence; then a second cosine cycle at
56 px (``refine``), because the scan's dynamics adapt to the 4x longer sequence more slowly than attention does. During
the 28 px phase :func:`low_res` resamples the 14 x 14 position embedding to 7 x 7 on the fly (bicubic, the middle
CLS's own entry kept), so one set of parameters serves both resolutions. ``python -m
prunelab.reproductions.testbeds.vim`` trains it and writes the weights (fp16, SHA-256 in :data:`SHA256`), then the
fine-tuned stages: the base trained on for :data:`FINETUNE_IMAGES` more images at 56 px with a method applied
(:func:`finetune_methods`), as ToP-ViM fine-tunes after inserting its pruning; ToP-ViM's tiny reproduction evaluates
them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prunelab.methods.top_vim import VimConfig, VisionMamba
from prunelab.reproductions.testbeds import shipped
from prunelab.reproductions.testbeds.fashion import IMG_SIZE, batches, load_fashion_mnist, preprocess
from prunelab.reproductions.testbeds.training import warmup_cosine

_DIR = Path(__file__).with_name("weights")
# "base": the trained test-bed; the others: the base fine-tuned for FINETUNE_IMAGES images with a method applied
WEIGHTS = {"base": _DIR / "vim.safetensors", **{f"ft_{v}": _DIR / f"vim_ft_{v}.safetensors"
                                                for v in ("dense", "naive", "top", "random")}}
SHA256 = {"base": "e75f9281f806053d2d01cee2243f456f7f1c8ad7ac13ac9799ed2213ecbba01f",
          "ft_dense": "76237c3b09d85ae1bec4a044e1cb859d99bfdb41cc0bfc563f0ccfa32005d683",
          "ft_naive": "af784e8ab55d2a0888598a60fcf4776b13e57cfb7d0ca500aed5ffca33472690",
          "ft_top": "f96872e7afd79060f9d6d596a79c6ccd601ae790e720a93f5fbebab6f1d9e294",
          "ft_random": "8b7d81185582504b5e8979c3a9d1d119ae98f2f7a3c0d6f5831562b1911be4e3"}
COMMAND = "python -m prunelab.reproductions.testbeds.vim"
FINETUNE_IMAGES, FINETUNE_LR = 3_000, 3e-4  # at 56 px; ToP-ViM's 30 of 300 epochs is a tenth, as here (33k images)
FINETUNE_TEST = 2_000  # test images whose top-1 the fine-tuned stages record (the base: all 10k)


def finetune_methods() -> dict:
    """The method each fine-tuned stage trains with: none (dense control), naive removal with ToP-ViM's scores
    (``alignment="none"``), ToP-ViM (aligned, default), and random tokens with ToP-ViM's alignment, all at
    ToP-ViM's default schedule (blocks 2, 3, 5 of 8 at 0.8: 197 -> 157 -> 125 -> 101 tokens)."""
    from prunelab.methods.baselines import RandomVim
    from prunelab.methods.top_vim import ToPViM

    return {"ft_dense": None, "ft_naive": ToPViM(alignment="none"), "ft_top": ToPViM(), "ft_random": RandomVim()}


@dataclasses.dataclass(frozen=True)
class VimBedConfig:
    """Architecture and recipe; the defaults are the shipped test-bed's."""

    embed_dim: int = 96
    depth: int = 8
    d_state: int = 8
    # (input px, images seen) per phase over seeded shuffles of the 60k training images; the last at 56 px
    phases: tuple[tuple[int, int], ...] = ((28, 30_000), (56, 3_000))
    # a second cosine cycle at 56 px (a warm restart, its own shuffle): the first cycle ends at 80.5 % on 28 px
    # images but 63.9 % at 56 px (first 1000 test images), the 197-token scan needs more than 3k images to adapt
    refine: tuple[tuple[int, int], ...] = ((56, 9_000),)
    refine_lr: float = 5e-4
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    seed: int = 0

    def vim(self) -> VimConfig:
        return VimConfig(img_size=IMG_SIZE, patch_size=4, in_chans=1, embed_dim=self.embed_dim, depth=self.depth,
                         d_state=self.d_state, num_classes=10, scan_impl="stepped")


def _config(recorded: dict) -> VimBedConfig:
    """The :class:`VimBedConfig` a weights file records (JSON lists back to tuples)."""
    return VimBedConfig(**{k: tuple(map(tuple, v)) if k in ("phases", "refine") else v for k, v in recorded.items()})


def build(cfg: VimBedConfig | None = None) -> VisionMamba:
    cfg = VimBedConfig() if cfg is None else cfg
    return VisionMamba(cfg.vim())


@contextlib.contextmanager
def low_res(model: VisionMamba, size: int):
    """Lets ``model`` take ``size`` px images: the patch tokens' position embedding is resampled from the model's grid
    (bicubic), the middle CLS keeps its own entry and sits at the middle of the shorter sequence; instance attributes
    that are removed on exit."""
    pe_grid, patch = model.patch_embed.grid_size, model.patch_embed.proj.kernel_size[0]
    grid = (size // patch, size // patch)
    full_mid, mid = model.patch_embed.num_patches // 2, grid[0] * grid[1] // 2

    def embed(x: torch.Tensor) -> torch.Tensor:
        patches = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
        pe = model.pos_embed
        grid_pe = torch.cat([pe[:, :full_mid], pe[:, full_mid + 1:]], dim=1).transpose(1, 2).reshape(1, -1, *pe_grid)
        grid_pe = F.interpolate(grid_pe, size=grid, mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        cls = model.cls_token.expand(patches.shape[0], -1, -1)
        tokens = torch.cat([patches[:, :mid], cls, patches[:, mid:]], dim=1)
        pos = torch.cat([grid_pe[:, :mid], pe[:, full_mid:full_mid + 1], grid_pe[:, mid:]], dim=1)
        return model.pos_drop(tokens + pos)

    model.embed = embed
    model.forward_features = lambda x: model.forward_tokens(x)[:, mid]
    try:
        yield
    finally:
        del model.embed, model.forward_features


def train_base(cfg: VimBedConfig | None = None, *, data_root: str | None = None, progress: bool = True,
               model: VisionMamba | None = None, info: dict | None = None) -> tuple[VisionMamba, dict]:
    """The shipped recipe: ``cfg.phases`` from scratch, then the ``cfg.refine`` cycle at ``cfg.refine_lr`` on a new
    shuffle. ``model`` and ``info``: the first cycle's result (e.g. read back with :func:`load`), which is what the
    first cycle returns bit for bit (its weights are rounded to fp16 before it returns)."""
    cfg = VimBedConfig() if cfg is None else cfg
    if model is None:
        model, info = train(cfg, data_root=data_root, progress=progress)
    if cfg.refine:
        model, second = train(dataclasses.replace(cfg, seed=cfg.seed + 2), model=model, phases=cfg.refine,
                              lr=cfg.refine_lr, data_root=data_root, progress=progress, desc="refine Vim")
        info = {**info, "images_seen": info["images_seen"] + second["images_seen"],
                "train_seconds": info["train_seconds"] + second["train_seconds"],
                "refine": {k: second[k] for k in ("phases", "images_seen", "lr", "train_seconds", "loss_first_last")}}
    return model, info


def train(cfg: VimBedConfig | None = None, *, model: VisionMamba | None = None, method=None,
          phases: tuple[tuple[int, int], ...] | None = None, lr: float | None = None, data_root: str | None = None,
          progress: bool = True, desc: str = "train Vim") -> tuple[VisionMamba, dict]:
    """Trains a fresh test-bed (``model`` None) through ``cfg.phases``, or fine-tunes ``model`` with ``method``
    applied at 56 px (ToP-ViM's fine-tuning after pruning is inserted; ``phases`` e.g. ``((56, 3000),)``), on seeded
    shuffles of Fashion-MNIST's training split. The learning rate follows the compute (tokens processed)."""
    import prunelab

    cfg = VimBedConfig() if cfg is None else cfg
    phases = cfg.phases if phases is None else phases
    if not phases or phases[-1][0] != IMG_SIZE:
        raise ValueError(f"phases: the last of {phases} must run at {IMG_SIZE} px")
    torch.manual_seed(cfg.seed)
    model = build(cfg) if model is None else model
    peak = cfg.lr if lr is None else lr
    tokens = {size: (size // 4) ** 2 + 1 for size, _ in phases}
    total_cost, cost = sum(n * tokens[size] for size, n in phases), 0
    train_x, train_y = load_fashion_mnist("train", data_root)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=cfg.weight_decay)
    handle = prunelab.apply(model, method) if method is not None else None
    model.train()
    losses, start, seen = [], time.perf_counter(), 0
    bar = tqdm(total=sum(n for _, n in phases), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for size, n in phases:
            done = 0
            with low_res(model, size) if size != IMG_SIZE else contextlib.nullcontext():
                while done < n:
                    for idx in torch.randperm(len(train_x), generator=gen).split(cfg.batch_size):
                        idx = idx[: n - done]
                        for g in opt.param_groups:
                            g["lr"] = warmup_cosine(cost / total_cost, peak, cfg.warmup_frac)
                        loss = F.cross_entropy(model(preprocess(train_x[idx], size)), train_y[idx])
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                        opt.step()
                        done, seen, cost = done + len(idx), seen + len(idx), cost + len(idx) * tokens[size]
                        losses.append(loss.item())
                        bar.update(len(idx))
                        bar.set_postfix(px=size, loss=f"{loss.item():.3f}")
                        if done >= n:
                            break
    finally:
        bar.close()
        if handle is not None:
            handle.remove()
    with torch.no_grad():  # what ships: fp16 weights
        for t in model.state_dict().values():
            t.copy_(t.half().float())
    model.eval()
    w = min(50, max(1, len(losses) // 4))
    info = {"config": dataclasses.asdict(cfg), "phases": [list(p) for p in phases], "images_seen": seen, "lr": peak,
            "train_seconds": round(time.perf_counter() - start, 1),
            "loss_first_last": [sum(losses[:w]) / w, sum(losses[-w:]) / w], "torch_version": torch.__version__,
            "threads": torch.get_num_threads()}
    return model, info


@torch.no_grad()
def hits(model: VisionMamba, images: torch.Tensor, labels: torch.Tensor, method=None,
         batch_size: int = 250) -> torch.Tensor:
    """[N] bool, whether each image is classified right, with ``method`` applied (``None``: dense)."""
    import prunelab

    model.eval()
    out = []
    handle = prunelab.apply(model, method) if method is not None else None
    try:
        for x, y in batches(images, labels, batch_size):
            out.append(model(x).argmax(-1) == y)
    finally:
        if handle is not None:
            handle.remove()
    return torch.cat(out)


def save(model: VisionMamba, info: dict, path: str | Path = WEIGHTS["base"]) -> str:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"info": json.dumps(info)})
    return shipped.sha256(path)


def load(stage: str = "base", path: str | Path | None = None, *, check: bool = True) -> tuple[VisionMamba, dict]:
    """A trained Vim (fp32, eval) and its training info: ``stage`` is a key of :data:`WEIGHTS`; the shipped file is
    checked against :data:`SHA256`, ``path`` reads another file."""
    from safetensors.torch import load_file

    if stage not in WEIGHTS:
        raise ValueError(f"stage: expected one of {sorted(WEIGHTS)}, got {stage!r}")
    path, meta = shipped.metadata(path, WEIGHTS[stage], SHA256[stage], COMMAND, check=check)
    if "info" not in meta:
        raise ValueError(f"path: {path} carries no training info; write it with vim.save()")
    info = json.loads(meta["info"])
    model = build(_config(info["config"]))
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
    return model.eval(), info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=COMMAND, description="Train the Vim test-bed (base, then the fine-tuned "
                                     "stages) and write its weights.")
    parser.add_argument("--data", metavar="DIR", default=None, help="Fashion-MNIST folder (IDX gz files)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it in the last bits)")
    parser.add_argument("--stage", choices=["all", "finetuned", *WEIGHTS], default="all",
                        help="what to train (default: all; the fine-tuned stages start from the base file in --out)")
    parser.add_argument("--low-res-images", type=int, default=None, help="images of the 28 px phase (default: the "
                        "config's)")
    parser.add_argument("--out", default=str(_DIR), help="folder for the weights files")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    test_x, test_y = load_fashion_mnist("test", args.data)
    stages = {"all": list(WEIGHTS), "finetuned": list(WEIGHTS)[1:]}.get(args.stage, [args.stage])
    infos = {}
    for stage in stages:
        if stage == "base":
            cfg = VimBedConfig()
            if args.low_res_images is not None:
                cfg = dataclasses.replace(cfg, phases=((28, args.low_res_images), cfg.phases[-1]))
            model, info = train_base(cfg, data_root=args.data)
            method = None
        else:
            base, base_info = load("base", out / WEIGHTS["base"].name, check=False)
            method = finetune_methods()[stage]
            cfg = dataclasses.replace(_config(base_info["config"]), seed=base_info["config"]["seed"] + 1)
            model, info = train(cfg, model=base, method=method, phases=((IMG_SIZE, FINETUNE_IMAGES),),
                                lr=FINETUNE_LR, data_root=args.data, desc=f"fine-tune {stage}")
            info.update(stage=stage, method=repr(method), base_sha256=shipped.sha256(out / WEIGHTS["base"].name))
        n = len(test_y) if stage == "base" else FINETUNE_TEST  # the tiny preset evaluates the fine-tuned ones
        info["test_images"], info["test_top1"] = n, 100 * float(hits(model, test_x[:n], test_y[:n], method)
                                                                .float().mean())
        digest = save(model, info, out / WEIGHTS[stage].name)
        infos[stage] = info
        print(json.dumps(info, indent=2))
        print(f"wrote {out / WEIGHTS[stage].name} (SHA-256 {digest}); test top-1 {info['test_top1']:.2f} %",
              flush=True)
    return infos


if __name__ == "__main__":
    main()
