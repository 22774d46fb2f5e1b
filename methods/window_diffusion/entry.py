"""Window-Diffusion's registry entry (``prunelab.registry``)."""

from prunelab.methods.window_diffusion.method import WindowDiffusion
from prunelab.registry import MethodEntry

ENTRIES = (
    MethodEntry(
        name="window_diffusion", cls=WindowDiffusion, family="diffusion LM", seams=("diffusion",),
        paper="Window-Diffusion: Accelerating Diffusion Language Model Inference with Windowed Token Pruning and "
              "Caching (arXiv 2601.20332)",
        backbones=("prunelab DiffusionLM on Llama blocks (LLaDA-8B checkpoints)",
                   "prunelab DiffusionLM on Qwen2 blocks with shifted logits (Dream-v0-7B checkpoints)"),
        budget="window_tokens", for_model="for_model", reproduction="window_diffusion",
        keep_all={"refresh_cycle": 1, "window_tokens": 4096}, prune={"window_tokens": 6, "active_tokens": 3,
                                                                     "refresh_cycle": 4},
        bad=(({"window_tokens": 0}, "window_tokens"), ({"active_tokens": 0}, "active_tokens"),
             ({"refresh_cycle": 1.5}, "refresh_cycle"), ({"window_tokens": 4, "active_tokens": 8}, "active_tokens")),
        status="LLaDA and Dream on transformers' Llama / Qwen2 blocks (LLaDA-8B, Dream-7B checkpoints load); both "
               "released schedulers on one batched K/V cache; diffusion-LM test-bed trained here",
    ),
)
