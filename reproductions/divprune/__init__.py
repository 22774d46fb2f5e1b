"""The DivPrune reproduction: tiny random VLMs offline (tiny) and LLaVA through lmms-eval (full, to come)."""
