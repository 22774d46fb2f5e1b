"""Shared, deterministic data for the offline trained test-beds.

``fashion``: Fashion-MNIST IDX loading (Debian package ``dataset-fashion-mnist``), class names.
``composites``: 3 x 3 grids of Fashion-MNIST items with templated questions for a tiny VLM that must read its image.
"""
