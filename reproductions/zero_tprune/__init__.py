"""Tiny CPU reproduction of Zero-TPrune (zero-shot token pruning) on a Fashion-MNIST ViT."""
