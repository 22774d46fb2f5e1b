"""prunelab: faithful, fast, tested reimplementations of token-pruning papers.

The front door is :func:`apply`::

    from prunelab.methods.zero_tprune import ZeroTPrune
    with prunelab.apply(model, ZeroTPrune()):   # the paper's operating point: DeiT-S 4.6 -> 3.0 GFLOPs
        logits = model(images)
"""

from prunelab.common.apply import Handle, UnsupportedModelError, apply, handle_of

__all__ = ["apply", "handle_of", "Handle", "UnsupportedModelError", "__version__"]
__version__ = "0.1.0"
