"""prunelab: faithful, fast, tested reimplementations of token-pruning papers.

The front door is :func:`apply`::

    from prunelab.methods.zero_tprune import ZeroTPrune
    with prunelab.apply(model, ZeroTPrune.deit_s_3gflops()):
        logits = model(images)
"""

from prunelab.common.apply import Handle, UnsupportedModelError, apply

__all__ = ["apply", "Handle", "UnsupportedModelError", "__version__"]
__version__ = "0.1.0"
