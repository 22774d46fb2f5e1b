"""``prunelab reproduce vlm_bench``: every VLM method at identical budgets on the trained test-bed VLM.

A test-bed of :data:`TESTBEDS` (shipped weights: the LLaVA one, :mod:`prunelab.reproductions.testbeds.vlm`, 144
visual tokens an image; or its Qwen2.5-VL variant, :mod:`prunelab.reproductions.testbeds.vlm_qwen`, 36 merged tokens
with M-RoPE) answers held-out questions about Fashion-MNIST composites (test-split images; four kinds: presence,
location, count, relation). For the dense model and each method at each keep ratio of the image's visual tokens, the
same questions, the same batches:

- accuracy per question kind with its standard error (binomial), their mean, and the paired difference to
  ``random_prune`` at the same keep ratio (``vs_random``, with the standard error of the per-question difference);
- the visual tokens kept, as a share of the image's averaged over the language model's layers (``visual_%``:
  methods that prune inside the language model keep more early and fewer late);
- language-model prefill MACs (unpadded, LM head on the last position) as a share of dense, and the whole
  forward's MACs bound ``bound`` = dense / pruned MACs of tower + projector (Qwen2.5-VL: merger) + language
  model (``tower_macs`` of the test-bed's module), the tower counted dense (exact for methods that prune after the
  tower; FlowCut and VisionDrop also prune inside it, so their bounds are higher);
- latency of one batch of ``speed_batch`` questions, measured interleaved (each round times dense and every
  configuration once, in turn), as the median per-round speedup over dense with its inter-quartile range.

Composition rows (``COMPOSE``): a method at each keep ratio, then a random drop of half of what it kept after
language-model layer 1 (:data:`LATE`), the two plans run as one (``Composed``, what ``apply(...,
on_existing="compose")`` builds); their ``vs_random`` is against random followed by the same late drop, the
baseline with the same token count at every layer.

Then the region probe (:mod:`.region`): on the location and relation questions, and the presence questions whose
answer is "yes", the accuracy when exactly the tokens of the cells the answer depends on are removed, against
removing as many tokens at random: the test that the model reads the region it is asked about.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import prunelab
from prunelab.common.llm_flops import vlm_prefill_cost
from prunelab.common.provenance import provenance, write_results
from prunelab.common.timing import Timing, interleave
from prunelab.common.validate import check_int, check_real
from prunelab.reproductions.testbeds import composites as C
from prunelab.reproductions.testbeds import vlm, vlm_qwen
from prunelab.reproductions.testbeds.shipped import sha256
from prunelab.reproductions.vlm_bench.region import DropTokens, cell_tokens, control_tokens
from prunelab.reproductions.vlm_tiny import LABELS, has_official_quirks, make_method, mean_visual

__all__ = ["BUDGETS", "COMPOSE", "LATE", "METHODS", "TESTBEDS", "composed", "evaluate", "plot", "run_bench"]

TESTBEDS = {"llava": vlm, "qwen2_5_vl": vlm_qwen}
"""The trained test-beds by family: the same composites and questions through ``LlavaForConditionalGeneration``
(144 CLIP tokens an image) and ``Qwen2_5_VLForConditionalGeneration`` (36 merged tokens, M-RoPE)."""

METHODS = ("random_prune", "divprune", "hiprune", "flowcut", "visiondrop")
BUDGETS = (0.5, 0.25, 0.111)
"""Keep ratios of each image's visual tokens: 72, 36 and 16 of 144 (LLaVA-1.5's 288, 144, 64 of 576)."""

COMPOSE = ("divprune", "hiprune")
"""Methods that also get composition rows (each after random, its baseline, at the same settings)."""
LATE = {"layer": 1, "budget": 0.5}
"""The later drop of the composition rows: ``RandomPrune`` keeping half of each image's remaining tokens after
language-model layer 1 of the test-bed's 4 (layers 0-1 see the first method's tokens, layers 2-3 half of them)."""

COLUMNS = ["method", "keep_ratio", "visual_%", *C.KINDS, "mean", "mean_se", "vs_random", "vs_random_se",
           "lm_macs_%", "bound", "speedup", "speedup_iqr"]


def _se(p: float, n: int) -> float:
    return (p * (1 - p) / n) ** 0.5 if n else float("nan")


@torch.no_grad()
def evaluate(model, data: C.Dataset, method=None, *, batch_size: int = 64, testbed=vlm) -> dict:
    """Per question: correct or not (``correct``), under ``method`` (a method object, or a callable
    ``samples -> method`` for per-batch probes; ``None``: dense); with the mean visual tokens per LLM layer and the
    summed dense and pruned LM prefill MACs. ``testbed``: the module of ``model``'s inputs (a :data:`TESTBEDS`
    value)."""
    tok = testbed.tokenizer()
    n_layers = model.config.get_text_config().num_hidden_layers
    correct, visual, dense_macs, macs = [], [], 0, 0
    for i in range(0, len(data.samples), batch_size):
        part = data.samples[i:i + batch_size]
        x = testbed.batch(part, data.scenes, tok)
        inputs = testbed.model_inputs(x)
        m = method(part) if callable(method) and not hasattr(method, "vlm_plan") else method
        if m is None:
            logits = model(**inputs, logits_to_keep=1).logits
            cost = vlm_prefill_cost(model, inputs, [testbed.TOKENS] * len(part))
            visual.append(float(testbed.TOKENS * len(part)))
        else:
            with prunelab.apply(model, m) as h:
                logits = model(**inputs, logits_to_keep=1).logits
                cost = vlm_prefill_cost(model, inputs, h)
                visual.append(mean_visual(h, n_layers))
        dense_macs, macs = dense_macs + cost.dense_macs, macs + cost.pruned_macs
        for s, scores in zip(part, testbed.choice_logits(logits, x["kind"], tok)):
            correct.append(s.choices[int(scores.argmax())] == s.answer)
    return {"correct": correct, "visual": sum(visual) / len(data.samples), "dense_macs": dense_macs, "macs": macs}


def accuracy_row(data: C.Dataset, correct: Sequence[bool], baseline: Sequence[bool] | None = None) -> dict:
    """Accuracy per kind, the mean over kinds with its standard error, and the paired difference to ``baseline``."""
    row, ses = {}, []
    for k in C.KINDS:
        got = [c for c, s in zip(correct, data.samples) if s.kind == k]
        if got:
            row[k] = sum(got) / len(got)
            ses.append(_se(row[k], len(got)))
    row["mean"] = statistics.fmean(row[k] for k in C.KINDS if k in row)
    row["mean_se"] = (sum(s * s for s in ses) ** 0.5) / len(ses)
    if baseline is not None:
        kinds = [k for k in C.KINDS if k in row]
        per_kind = []
        for k in kinds:
            d = [float(a) - float(b) for a, b, s in zip(correct, baseline, data.samples) if s.kind == k]
            per_kind.append((statistics.fmean(d), statistics.pvariance(d) / len(d)))
        row["vs_random"] = statistics.fmean(m for m, _ in per_kind)
        row["vs_random_se"] = sum(v for _, v in per_kind) ** 0.5 / len(per_kind)
    return row


def _median_iqr(xs: Sequence[float]) -> tuple[float, float]:
    t = Timing(tuple(xs))
    return t.median_s, t.iqr_s


def region_probe(model, data: C.Dataset, *, batch_size: int, seed: int, testbed=vlm) -> list[dict]:
    """Accuracy with the answer's cells removed, with as many random tokens removed, and intact, on the questions
    whose answer depends on part of the image (location, relation, presence answered "yes")."""
    idx = [i for i, s in enumerate(data.samples) if s.kind in ("location", "relation")
           or (s.kind == "presence" and s.answer == "yes")]
    samples = [data.samples[i] for i in idx]
    sub = C.Dataset(samples, data.scenes)
    cells = testbed.patch_cells()
    g = torch.Generator().manual_seed(seed)
    region = {s: cell_tokens(s.cells, cells) for s in samples}
    control = {s: control_tokens(len(region[s]), testbed.TOKENS, g) for s in samples}
    runs = {"intact": evaluate(model, sub, batch_size=batch_size, testbed=testbed)["correct"],
            "region removed": evaluate(model, sub, lambda p: DropTokens(tuple(region[s] for s in p)),
                                       batch_size=batch_size, testbed=testbed)["correct"],
            "random removed": evaluate(model, sub, lambda p: DropTokens(tuple(control[s] for s in p)),
                                       batch_size=batch_size, testbed=testbed)["correct"]}
    rows = []
    for name, correct in runs.items():
        row = {"tokens": name, "removed": statistics.fmean(len(region[s]) for s in samples) if name != "intact"
               else 0.0}
        for kind, label in (("location", "location"), ("relation", "relation"), ("presence", "presence (yes)")):
            got = [c for c, s in zip(correct, samples) if s.kind == kind]
            row[label] = sum(got) / len(got) if got else float("nan")
            row[label + " se"] = _se(row[label], len(got))
        rows.append(row)
    return rows


def plot(rows: Sequence[dict], path: str | Path | None = None, *, title: str = "trained test-bed VLM"):
    """Mean accuracy (standard error bars) against the kept share of visual tokens, one line per method."""
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = next(r for r in rows if r["method"] == "dense")
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        pts = sorted((r["visual_%"], r["mean"], r["mean_se"]) for r in rows if r["method"] == method)
        x, y, e = zip(*pts)
        ax.errorbar(x, y, yerr=e, marker="o", capsize=2, label=method)
    ax.axhline(dense["mean"], color="k", ls="--", lw=1, label="dense")
    ax.set_xlabel("visual tokens kept, % (mean over LLM layers)")
    ax.set_ylabel("held-out accuracy, mean over question kinds")
    ax.set_title(f"{title}: accuracy against budget", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def speed_table(methods: Sequence[str], budgets: Sequence[float], *, rounds: int) -> list[dict]:
    """Prefill speed of every method at every keep ratio on the LLaVA-1.5-shaped model (:mod:`.speed`), with each
    method's keep-all run (its registry ``keep_all`` settings) as the selection overhead; all interleaved."""
    from prunelab import registry
    from prunelab.reproductions.vlm_bench import speed

    model, inputs = speed.build()
    configs = {}
    for name in methods:
        entry = registry.get(name)
        if "schedule" in entry.keep_all:  # every stage of this model keeps every token and merges none
            stages = 1 + len(entry.build(model).llm_layers)
            configs[(name, "keep-all")] = entry.build(model, schedule=((1.0, 0.0),) * stages)
        else:
            configs[(name, "keep-all")] = entry.build(model, **entry.keep_all)
        for b in budgets:
            configs[(name, b)] = entry.build(model, budget=b)
    rows = speed.speed_rows(model, inputs, configs, rounds=rounds,
                            progress=lambda r, n: print(f"vlm_bench speed: round {r}/{n}", flush=True))
    for r in rows:
        name, b = r.pop("key")
        r.update(method=LABELS[name], keep_ratio=b)
    return rows


SPEED_COLUMNS = ["method", "keep_ratio", "dense_ms", "ms", "speedup", "speedup_iqr", "bound", "of_bound",
                 "tower_GMACs", "lm_GMACs"]


def composed(name: str, model, ratio: float, seed: int = 0, family: str = "llava"):
    """The composition row's method: ``name`` at keep ratio ``ratio`` (as its own row builds it), then
    ``RandomPrune(**LATE)`` (seeded apart from a first random drop)."""
    from prunelab.common.vlm_methods import Composed
    from prunelab.methods.baselines import RandomPrune

    return Composed(make_method(name, model, family, ratio, seed), RandomPrune(seed=seed + 1000, **LATE))


def accuracy_table(model, data: C.Dataset, methods: Sequence[str], budgets: Sequence[float], *,
                   batch_size: int = 64, seed: int = 0, compose: Sequence[str] = (), official: Sequence[str] = (),
                   testbed=vlm) -> tuple[list[dict], dict]:
    """Rows (dense first, then each method at each keep ratio, then the rows of ``official`` with
    ``official_quirks=True``, then the composition rows of ``compose`` after random's) of accuracy per kind,
    ``visual_%``, ``lm_macs_%`` and ``bound`` on ``data``; and the method objects by ``(name, ratio)``. Each row's
    ``name`` is the registry name, ``+official`` or ``+late`` appended for the extra rows."""
    dense = evaluate(model, data, batch_size=batch_size, testbed=testbed)
    tower = testbed.tower_macs(model) * len(data.samples)
    whole_dense = tower + dense["dense_macs"]
    rows = [{"name": "dense", "method": "dense", "keep_ratio": 1.0, "visual_%": 100.0,
             **accuracy_row(data, dense["correct"]), "lm_macs_%": 100.0, "bound": 1.0}]
    configs, results = {}, {}
    rows_of = [(name, "") for name in methods] + [(name, "official") for name in official]
    rows_of += [(name, "late") for name in dict.fromkeys(("random_prune", *compose) if compose else ())]
    suffix = {"": "", "official": " (official quirks)", "late": " + late random"}
    for name, extra in rows_of:
        key, label = (f"{name}+{extra}" if extra else name), LABELS[name] + suffix[extra]
        base_key = "random_prune+late" if extra == "late" else "random_prune"
        for b in budgets:
            print(f"  {label} at {b} ...", flush=True)
            configs[(key, b)] = (composed(name, model, b, seed, testbed.FAMILY) if extra == "late"
                                 else make_method(name, model, testbed.FAMILY, b, seed, official=extra == "official"))
            results[(key, b)] = res = evaluate(model, data, configs[(key, b)], batch_size=batch_size, testbed=testbed)
            base = results.get((base_key, b)) if key != base_key else None
            rows.append({"name": key, "method": label, "keep_ratio": b,
                         "visual_%": 100 * res["visual"] / testbed.TOKENS,
                         **accuracy_row(data, res["correct"], base["correct"] if base else None),
                         "lm_macs_%": 100 * res["macs"] / res["dense_macs"],
                         "bound": whole_dense / (tower + res["macs"])})
    return rows, configs


TESTBED_COLUMNS = ["method", "keep_ratio", "visual_%", *C.KINDS, "mean", "mean_se", "vs_random", "vs_random_se",
                   "lm_macs_%"]


def write_testbed_table(out, methods: Sequence[str], budgets: Sequence[float], *, paper: str, n: int = 400,
                        seed: int = 0, batch_size: int = 64) -> list[dict]:
    """The accuracy part of the leaderboard for one paper's tiny preset: its methods at its keep ratios on ``n``
    held-out questions of the trained test-bed; writes ``testbed.{json,md}`` into ``out``."""
    n = check_int(n, "testbed_n", low=len(C.KINDS))
    model, _ = vlm.load()
    data = C.make_dataset("test", n, seed=1000 + seed)
    print(f"{paper} tiny: accuracy on the trained test-bed VLM ({n} held-out questions) ...", flush=True)
    rows, _ = accuracy_table(model, data, methods, budgets, batch_size=batch_size, seed=seed)
    for r in rows:
        r.pop("name")
    meta = provenance(preset="tiny", model=f"trained test-bed VLM ({vlm.WEIGHTS.name}, sha256 {vlm.SHA256[:16]}...)",
                      data=f"{n} held-out questions (Fashion-MNIST test images, train templates, seed {1000 + seed})",
                      accuracy="argmax over the kind's choices; se: binomial; vs_random: paired difference to "
                               "random_prune at the same keep ratio")
    write_results(out, "testbed", rows, meta, TESTBED_COLUMNS, f"{paper} tiny: held-out accuracy on the trained "
                  "test-bed VLM (prunelab reproduce vlm_bench has every method, speed and the region probe)")
    return rows


def run_bench(out, methods: Sequence[str] = METHODS, *, budgets: Sequence[float] = BUDGETS, n: int = 1000,
              templates: str = "train", batch_size: int = 64, speed_batch: int = 8, rounds: int = 7,
              seed: int = 0, weights: str | Path | None = None, speed: bool = False, speed_rounds: int = 5,
              compose: Sequence[str] = COMPOSE, official: Sequence[str] = (), testbed: str = "llava") -> dict:
    """Write ``bench.{json,md}``, ``region.{json,md}`` and ``bench.png`` into ``out`` (and with ``speed``,
    ``speed.{json,md}``: :func:`speed_table`); return the rows. ``compose``: methods with composition rows
    (:data:`LATE`; empty: none); ``official``: methods that also get rows with ``official_quirks=True``.
    ``testbed``: a key of :data:`TESTBEDS`, the trained model to run on."""
    if testbed not in TESTBEDS:
        raise ValueError(f"testbed: expected one of {tuple(TESTBEDS)}, got {testbed!r}")
    tb = TESTBEDS[testbed]
    for arg, names in (("methods", methods), ("compose", compose), ("official", official)):
        bad = [m for m in names if m not in METHODS]
        if bad:
            raise ValueError(f"{arg}: unknown {bad}; choose from {METHODS}")
    no_switch = [m for m in official if not has_official_quirks(m)]
    if no_switch:
        raise ValueError(f"official: {no_switch} have no official_quirks switch")
    budgets = [check_real(b, f"budgets[{i}]", low=0.0, high=1.0, low_open=True) for i, b in enumerate(budgets)]
    n = check_int(n, "n", low=len(C.KINDS))
    speed_batch, rounds = check_int(speed_batch, "speed_batch", low=1), check_int(rounds, "rounds", low=1)
    model, _ = tb.load(weights)
    data = C.make_dataset("test", n, seed=1000 + seed, templates=templates)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"vlm_bench: {n} held-out questions, {testbed} test-bed", flush=True)
    rows, configs = accuracy_table(model, data, methods, budgets, batch_size=batch_size, seed=seed,
                                   compose=compose, official=official, testbed=tb)
    print("vlm_bench: latency, interleaved ...", flush=True)
    x = tb.batch(data.samples[:speed_batch], data.scenes)
    inputs = tb.model_inputs(x)
    dense_s, times = interleave(model, configs, lambda: model(**inputs, logits_to_keep=1), rounds=rounds)
    for r in rows:
        key = (r.pop("name"), r["keep_ratio"])
        ratios = [d / t for d, t in zip(dense_s, times[key])] if key in configs else [1.0]
        r["speedup"], r["speedup_iqr"] = _median_iqr(ratios)
    print("vlm_bench: region probe ...", flush=True)
    region = region_probe(model, data, batch_size=batch_size, seed=seed, testbed=tb)
    dense_ms, dense_iqr = _median_iqr([t * 1e3 for t in dense_s])
    path = tb.WEIGHTS if weights is None else Path(weights)
    name = path.name if weights is None else str(path)
    meta = provenance(preset="tiny", model=f"trained test-bed VLM, {tb.ARCHITECTURE} ({name}, sha256 "
                      f"{sha256(path)[:16]}...), float32",
                      data=f"{n} held-out questions (Fashion-MNIST test images, {templates} templates, seed "
                           f"{1000 + seed}), batches of {batch_size}, left padding",
                      accuracy="argmax over the question kind's choices; se: binomial standard error; mean: over "
                               "kinds; vs_random: paired difference to random_prune at the same keep ratio (for "
                               "a '+ late random' row: to random + late random)",
                      composition=f"'+ late random': the method, then RandomPrune(**{LATE}) (Composed)",
                      macs="lm_macs_%: language-model prefill MACs, unpadded, LM head on the last position; bound: "
                           "dense / pruned MACs of the whole forward with the tower counted dense",
                      latency=f"batch of {speed_batch}, {rounds} interleaved rounds; dense median {dense_ms:.1f} ms "
                              f"(IQR {dense_iqr:.1f}); speedup: median per-round dense / pruned time, with its IQR; "
                              f"torch threads {torch.get_num_threads()}")
    write_results(out, "bench", rows, meta, COLUMNS, f"VLM leaderboard on the trained {tb.ARCHITECTURE} test-bed: "
                  "held-out accuracy per question kind, cost and speed at identical budgets")
    write_results(out, "region", region, meta, None, "Region probe: accuracy with the answer's cells removed, "
                  "against as many random tokens removed")
    fig = plot(rows, out / "bench.png", title=f"trained {tb.ARCHITECTURE} test-bed")
    plt.close(fig)
    result = {"rows": rows, "region": region}
    if speed:
        print("vlm_bench: speed on the LLaVA-1.5-shaped model ...", flush=True)
        result["speed"] = speed_table(methods, budgets, rounds=speed_rounds)
        smeta = provenance(model="LLaVA-1.5 shapes: CLIP-L/14 at 336 px (random weights) + SmolLM2-135M-Instruct "
                           "(packaged weights), float32", prompt="one prompt, 576 image tokens + the instruction; "
                           "prefill alone (use_cache=False)",
                           latency=f"{speed_rounds} interleaved rounds (dense, then every configuration); speedup: "
                                   "median per-round dense / pruned time with its IQR; keep-all: the method with "
                                   "every token kept (its selection overhead); torch threads "
                                   f"{torch.get_num_threads()}",
                           macs="bound: dense / pruned MACs of tower + language model, per layer on the tokens each "
                                "ran on; of_bound: speedup / bound")
        write_results(out, "speed", result["speed"], smeta, SPEED_COLUMNS, "Prefill speed at LLaVA-1.5 shapes: "
                      "every method against dense and against its FLOPs bound")
    print(f"vlm_bench: tables and figure in {out}")
    return result
