"""One sub-package per paper: the paper's idea and its adapters, nothing else."""
