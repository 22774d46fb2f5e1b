"""ToP-ViM's reproductions: the tiny preset on the shipped Vim test-bed, the full preset on ImageNet-1k."""
