"""The DivPrune reproduction: tiny random VLMs offline (tiny) and the paper's LLaVA setting through lmms-eval (full)."""
