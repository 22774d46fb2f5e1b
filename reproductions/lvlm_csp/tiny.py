"""``prunelab reproduce lvlm_csp --preset tiny``: LVLM_CSP against one-stage ``[SEG]`` pruning, random tokens and
dense, offline on a CPU, on the tiny-LISA test-bed (``reproductions/testbeds/lisa.py``): gIoU and cIoU of the masks
against the image tokens per language-model layer (``seg.{json,md,png}``), and the prefill time dense and pruned
(``speed.{json,md}``); :mod:`.testbed`."""

from pathlib import Path

from prunelab.cli import NON_NEGATIVE, POSITIVE
from prunelab.reproductions.lvlm_csp.testbed import seg_table


def add_arguments(parser) -> None:
    parser.add_argument("--n", type=POSITIVE, default=500, help="held-out queries (composites of test-split garments)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out queries and the random baselines")
    parser.add_argument("--batch-size", type=POSITIVE, default=32)
    parser.add_argument("--settings", choices=("all", "short"), default="all",
                        help="'short': two LVLM_CSP settings and their baselines (a quick check)")
    parser.add_argument("--rounds", type=NON_NEGATIVE, default=20, help="interleaved timing rounds (0: no timing)")


def default_out() -> Path:
    return Path("runs/lvlm_csp/tiny")


def run(args, out) -> dict:
    return {"seg": seg_table(out, n=args.n, seed=args.seed, batch_size=args.batch_size, short=args.settings == "short",
                            rounds=args.rounds)}
