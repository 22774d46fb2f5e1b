"""The FlowCut reproduction: tiny random VLMs offline (tiny); LLaVA-1.5 / NeXT / Qwen2.5-VL through lmms-eval (full)."""
