"""FlowCut: information-flow-aware visual token pruning (Tong et al., NeurIPS 2025, arXiv 2505.19536)."""

from prunelab.methods.flowcut.method import LLAVA15_BUDGETS, PAPER_BUDGETS, FlowCut

__all__ = ["LLAVA15_BUDGETS", "PAPER_BUDGETS", "FlowCut"]
