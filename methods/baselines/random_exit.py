"""RandomExit: DToP's stage loop with the exiting tokens drawn at random (the segmentation baseline at equal cost)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelab.common.validate import check_int, check_real


@dataclass(frozen=True)
class RandomExit:
    """After auxiliary stage ``s``, a uniformly random ``rates[s]`` share of each image's active tokens exits with
    its prediction frozen, as DToP's do; the presets set ``rates`` to DToP's measured exit shares so that both run
    at the same average FLOPs.

    Every image draws from its own generator (seeded with ``seed`` at the first stage), so its exits do not depend on
    the batch it is in.
    """

    rates: tuple[float, ...] = (0.5,)
    seed: int = 0
    freeze: str = "full_prediction"

    def __post_init__(self):
        if isinstance(self.rates, (str, bytes)) or not hasattr(self.rates, "__len__"):
            raise ValueError(f"rates: expected a sequence of shares in [0, 1], got {self.rates!r}")
        object.__setattr__(self, "rates", tuple(check_real(r, f"rates[{i}]", low=0.0, high=1.0)
                                                for i, r in enumerate(self.rates)))
        object.__setattr__(self, "seed", check_int(self.seed, "seed"))
        object.__setattr__(self, "_gens", [])

    def probabilities(self, head, out) -> torch.Tensor:
        return out.tokens  # unused: random exits read no confidence

    def exits(self, stage: int, probs: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        if stage >= len(self.rates):
            raise ValueError(f"rates: {len(self.rates)} shares for a segmenter with more auxiliary stages "
                             f"(stage {stage})")
        gens = self._gens
        if stage == 0:
            gens[:] = [torch.Generator().manual_seed(self.seed) for _ in range(active.shape[0])]
        out = torch.zeros_like(active)
        for b, g in enumerate(gens):  # one small draw per image: its exits must not depend on the batch
            idx = active[b].nonzero().squeeze(1)
            n = int(torch.floor(torch.tensor(len(idx) * self.rates[stage] + 0.5)))
            out[b, idx[torch.randperm(len(idx), generator=g)[:n].to(idx.device)]] = True
        return out
