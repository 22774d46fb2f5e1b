"""A reusable demonstration set: CATP's query-independent work on a fixed set of demonstrations, done once.

In an in-context prompt the demonstrations come first. Stage 1 of a demonstration image reads only that image and
its paired text, and causal attention makes the demonstrations' rows through any layer independent of the query. So
for a fixed demonstration set, the vision tower on its images, stage 1 and the language model's layers ``0 .. K`` on
its rows are the same for every query; the engine caches them (``prunelab.common.vlm_prefix``). What depends on the
query is computed per query, as in the paper: the layer-``K`` ranking of the context tokens (it reads the query's last
token and its mean hidden state), the query image's stages, and every layer after ``K`` (whose states depend on the
tokens kept).

The demonstrations end where the query's image begins: the cut is right before the query's image tokens, so each
demonstration's paired text (up to the next image) is what it is in the whole prompt. :meth:`inputs` checks this.
"""

from __future__ import annotations

import torch

from prunelab.common.vlm_prefix import PrefixCache

__all__ = ["DemonstrationSet"]


class DemonstrationSet:
    """Demonstrations cached once under a CATP handle, continued by many queries.

    ``demos = DemonstrationSet(handle, **processor(text=demos_text, images=demo_images))`` with ``handle`` from
    ``prunelab.apply(model, CATP.for_model(model))``; then per batch of queries (each the text from the query's image
    on, with its image) ``model(**demos.inputs(**query))`` or ``model.generate(**demos.inputs(**query))``. The result
    equals CATP on the whole prompts (demonstrations, then each query), to float rounding.
    """

    def __init__(self, handle, **inputs):
        from prunelab.methods.catp.method import CATP

        if not isinstance(handle.method, CATP):
            raise TypeError(f"handle: a handle of prunelab.apply(model, CATP(...)), got one of "
                            f"{type(handle.method).__name__}")
        self.image_token_id = handle.model.config.image_token_id
        self.prefix: PrefixCache = handle.cache_prefix(**inputs)

    @property
    def images(self) -> int:
        """The demonstrations' images."""
        return len(self.prefix.images)

    def inputs(self, **query) -> dict:
        """The forward / generate() arguments for a batch of queries after the demonstrations: each query's first
        token (after any left padding) is its image's first token, and it holds one image."""
        ids, mask = query.get("input_ids"), query.get("attention_mask")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError("input_ids: the queries as a [batch, length] tensor of token ids")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        first = ids.gather(1, valid.long().argmax(-1, keepdim=True))[:, 0]
        image = (ids == self.image_token_id) & valid
        starts = (image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]).sum(-1)  # runs of image tokens
        if not bool((first == self.image_token_id).all()) or not bool((starts == 1).all()):
            raise ValueError("input_ids: each query must start with its image's tokens and hold one image (cut the "
                             "prompt right before the query's image, so the demonstrations' paired text is whole)")
        return self.prefix.inputs(**query)
