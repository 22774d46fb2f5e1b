"""Window-Diffusion against LLaDA's vanilla sampler: wall-clock, tokens/s, MACs and the MACs bound, token agreement.

    python benchmarks/window_diffusion_speed.py [--lengths 64 128 256] [--prompt 64] [--rounds 3] [--batch 1]
        [--width 256] [--layers 4] [--vocab 2048] [--window 64 --active 16 --cycle 32] [--device cpu|cuda]

A random LLaDA-shaped model (Llama blocks, bidirectional): the timing does not depend on the weights, the agreement
does (a random model's tokens say nothing about quality). ``--testbed`` runs the trained diffusion-LM test-bed instead
(``prunelab.reproductions.testbeds.diffusion_lm``, characters of CPython's pydoc texts), prompted with seeded windows
of its held-out text: there the agreement with the vanilla sampler is meaningful. Steps =
generation length, temperature 0, as the paper evaluates LLaDA. Vanilla and windowed runs are interleaved round by
round; the speed-up is the median of the per-round ratios with its spread (IQR, or min-max under four rounds).
``bound`` = vanilla MACs / windowed MACs (:mod:`prunelab.methods.window_diffusion.flops`); ``of_bound`` =
(speed-up - 1) / (bound - 1).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from prunelab.common.timing import ratio_summary
from prunelab.methods.window_diffusion import WindowDiffusion, llada_generate, run_macs, tiny_llada, window_generate


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--active", type=int, default=16)
    p.add_argument("--cycle", type=int, default=32)
    p.add_argument("--testbed", action="store_true", help="the trained diffusion-LM test-bed, held-out prompts")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    if args.testbed:
        from prunelab.reproductions.testbeds import diffusion_lm

        model, charset, _ = diffusion_lm.load()
        held = charset.encode(diffusion_lm.corpus()[1])
        starts = torch.randint(0, len(held) - args.prompt, (args.batch,), generator=g).tolist()
        prompts = [held[s:s + args.prompt] for s in starts]
        args.width, args.layers, args.vocab = model.config.hidden_size, model.config.num_hidden_layers, charset.size
    else:
        model = tiny_llada(vocab_size=args.vocab, hidden_size=args.width, layers=args.layers, heads=args.width // 64,
                           kv_heads=args.width // 64, intermediate_size=int(args.width * 8 / 3) // 64 * 64,
                           max_positions=4096)
        prompts = [torch.randint(0, args.vocab - 2, (args.prompt,), generator=g) for _ in range(args.batch)]
    model = model.to(args.device)
    method = WindowDiffusion(window_tokens=args.window, active_tokens=args.active, refresh_cycle=args.cycle)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    kind = "the diffusion-LM test-bed" if args.testbed else "LLaDA-shaped random model"
    print(f"{kind}: width {args.width}, {args.layers} layers, vocab {args.vocab}; prompt "
          f"{args.prompt}, batch {args.batch}; window {args.window}, active {args.active}, refresh cycle {args.cycle}; "
          f"{name}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    def run(fn, *fn_args):
        sync()
        start = time.perf_counter()
        out = fn(*fn_args)
        sync()
        return time.perf_counter() - start, out

    rows = []
    for length in args.lengths:
        vanilla_fn = functools.partial(llada_generate, model, prompts, length)
        window_fn = functools.partial(window_generate, model, prompts, length, method)
        run(vanilla_fn), run(window_fn)  # warm-up
        dense, pruned = [], []
        for _ in range(args.rounds):
            t, vanilla = run(vanilla_fn)
            dense.append(t)
            t, windowed = run(window_fn)
            pruned.append(t)
        speedup, spread = ratio_summary(dense, pruned)
        bound = run_macs(model.config, vanilla.log) / run_macs(model.config, windowed.log)
        rows.append({"length": length, "vanilla_s": statistics.median(dense), "window_s": statistics.median(pruned),
                     "speedup": speedup, "spread": spread, "bound": bound, "of_bound": (speedup - 1) / (bound - 1),
                     "tokens_per_s": args.batch * length / statistics.median(pruned),
                     "agreement": float((vanilla.answer == windowed.answer).float().mean())})
        r = rows[-1]
        print(f"  G={length:4d}  vanilla {r['vanilla_s']:7.2f} s  window {r['window_s']:6.2f} s  speed-up "
              f"{speedup:5.2f} (spread {spread:.2f})  MACs bound {bound:5.2f}  of bound {r['of_bound']:.2f}  "
              f"{r['tokens_per_s']:6.1f} tok/s  agreement {r['agreement']:.3f}")
    return rows


if __name__ == "__main__":
    main()
