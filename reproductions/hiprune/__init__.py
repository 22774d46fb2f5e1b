"""The HiPrune reproduction: tiny random VLMs offline (tiny); LLaVA / Qwen2.5-VL via lmms-eval (full, to come)."""
