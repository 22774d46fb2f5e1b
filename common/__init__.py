"""Shared core: token layout and kept-token contract, backbone adapters, FLOPs, timing, provenance."""
