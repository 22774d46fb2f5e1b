"""Window-Diffusion (Zuo et al., arXiv 2601.20332): windowed token pruning and caching for masked diffusion LMs.

Built so far: the diffusion LM it accelerates (:class:`DiffusionLM`, LLaDA / Dream on transformers' Llama / Qwen2
parts, with loaders for their checkpoints), LLaDA's vanilla sampler (:func:`llada_generate`), Dream's leftmost-mask
loop (:func:`dream_generate`) and the windowed schedulers: LLaDA's (:class:`WindowDiffusion`,
:func:`window_generate`) and Dream's (:class:`DreamWindow`, :func:`dream_window_generate`), on one cache
(:mod:`.window`), with MACs in :mod:`.flops`. The reproductions are not built yet; see README.md.
"""

from prunelab.methods.window_diffusion.checkpoint import load_dream, load_llada
from prunelab.methods.window_diffusion.dream import dream_generate
from prunelab.methods.window_diffusion.dream_window import DreamWindow, dream_window_generate
from prunelab.methods.window_diffusion.flops import run_macs, step_macs
from prunelab.methods.window_diffusion.method import WindowDiffusion, window_generate
from prunelab.methods.window_diffusion.model import DiffusionLM, bidirectional_mask, padded_positions, tiny_llada
from prunelab.methods.window_diffusion.sampler import method_for, vanilla_generate, windowed_generate
from prunelab.methods.window_diffusion.samplers import Generation, llada_generate, num_transfer_tokens, pad_prompts

__all__ = ["DiffusionLM", "bidirectional_mask", "padded_positions", "tiny_llada", "load_llada", "load_dream",
           "Generation", "llada_generate", "num_transfer_tokens", "pad_prompts", "WindowDiffusion", "window_generate",
           "run_macs", "step_macs", "dream_generate", "DreamWindow", "dream_window_generate",
           "method_for", "vanilla_generate", "windowed_generate"]
