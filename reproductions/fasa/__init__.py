"""The FASA reproduction: SmolLM2-135M offline (tiny) and the paper's models on LongBench-V1 (full)."""
