"""DToP: dynamic token pruning (early exit) for plain-ViT semantic segmentation (Tang et al., ICCV 2023)."""

from prunelab.methods.dtop.grading import atm_probability, exit_mask, max_class_probability
from prunelab.methods.dtop.heads import ATMHead, HeadOutput, LinearHead
from prunelab.methods.dtop.method import DToP
from prunelab.methods.dtop.seam import EarlyExitHandle, EarlyExitState, early_exit_forward
from prunelab.methods.dtop.segmenter import Segmenter

__all__ = ["DToP", "Segmenter", "LinearHead", "ATMHead", "HeadOutput", "exit_mask", "max_class_probability",
           "atm_probability", "early_exit_forward", "EarlyExitHandle", "EarlyExitState"]
