"""Triton kernels, each beside its float32 torch reference, with ``impl="auto"|"torch"|"triton"`` dispatch."""
