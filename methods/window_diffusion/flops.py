"""MACs of a diffusion LM's sampling run from its per-step log (one MAC = one FLOP, products only).

Per layer, a step whose q query tokens attend to k keys costs q (C C + 2 C C_kv + C C) for the q/k/v/o projections
(C_kv = kv_heads * head_dim), 2 q k C for the scores and the weighted sum (heads * head_dim = C), and 3 q C I for the
SwiGLU MLP; the head costs q C V. A refresh or a vanilla step has q = k = the sequence it runs; a pruned step has
q = |A| and k = |W|, its buffer's keys read from the cache, not recomputed. The paper's own cost note (a pruned step
≈ L (|A| MLP + |A| |W| attention) against L N) is this count.
"""

from __future__ import annotations

__all__ = ["step_macs", "run_macs"]


def step_macs(config, queries: float, keys: float) -> float:
    """MACs of one forward of ``queries`` tokens attending to ``keys`` keys, per row."""
    c, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or c // config.num_attention_heads
    c_kv = config.num_key_value_heads * head_dim
    per_layer = queries * (2 * c * c + 2 * c * c_kv) + 2 * queries * keys * c + 3 * queries * c * i
    return config.num_hidden_layers * per_layer + queries * c * v


def run_macs(config, log) -> float:
    """MACs per row of a whole run from :attr:`~.samplers.Generation.log`.

    An entry ``(kind, queries, keys)`` costs :func:`step_macs` ``(queries, keys)``; the count is linear in the
    queries and in their product with the keys, so an entry may stand for a forward that only some rows ran, or ran
    with different sizes: with ``queries`` the rows' tokens summed and divided by the batch size and ``keys`` the
    keys per query (weighted by the rows' queries), as :func:`~.dream.dream_generate` and
    :func:`~.dream_window.dream_window_generate` log, the batch
    size times this is the batch's total, the sum of its rows' single runs."""
    return sum(step_macs(config, q, k) for _, q, k in log)
