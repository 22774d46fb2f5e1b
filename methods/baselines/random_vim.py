"""RandomVim: ToP-ViM's pruning loop with uniformly random token scores (the vision-Mamba baseline at equal budget)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelab.common.validate import check_int
from prunelab.methods.top_vim.method import ToPViM
from prunelab.methods.top_vim.plain_mamba import PlainSSMOutput
from prunelab.methods.top_vim.vim import SSMOutputs


@dataclass(frozen=True)
class RandomVim(ToPViM):
    """ToP-ViM with the importance S replaced by uniform noise: the same blocks, keep counts, CLS handling and
    ``alignment``, so it runs at exactly ToP-ViM's token budget and FLOPs.

    Every image draws from its own generator, seeded with ``seed`` at the start of each forward (the seam calls
    :meth:`start_forward`), so an image's tokens do not depend on the batch it is in nor on the call. Images of equal
    length therefore draw the same positions: at a fixed image size every image keeps the same random subset of
    positions, one subset per ``seed`` (compare several seeds for the spread between subsets).
    """

    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "seed", check_int(self.seed, "seed"))
        object.__setattr__(self, "_gens", [])

    def start_forward(self, batch_size: int) -> None:
        self._gens[:] = [torch.Generator().manual_seed(self.seed) for _ in range(batch_size)]

    def importance(self, ssm: SSMOutputs | PlainSSMOutput) -> torch.Tensor:
        signal = ssm.fwd if isinstance(ssm, SSMOutputs) else ssm.y
        B, _, L = signal.shape
        if len(self._gens) != B:
            raise RuntimeError("RandomVim: importance() called outside a forward of the Vision Mamba seam")
        return torch.stack([torch.rand(L, generator=g) for g in self._gens]).to(signal.device)
