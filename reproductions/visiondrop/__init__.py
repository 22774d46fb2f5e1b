"""The VisionDrop reproduction: tiny random VLMs offline (tiny); LLaVA-1.5 / NeXT / Qwen2.5-VL via lmms-eval (full)."""
