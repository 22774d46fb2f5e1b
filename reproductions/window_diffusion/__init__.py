"""Window-Diffusion's reproductions: the tiny preset on the diffusion-LM test-bed trained here, the full preset on
LLaDA-8B / Dream-7B through lm-evaluation-harness."""
