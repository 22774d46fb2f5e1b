"""Reproduction entry points, one sub-package per paper, run by ``prunelab reproduce <paper>``."""
