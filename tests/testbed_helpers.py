"""Helpers shared by the test-bed tests."""

from __future__ import annotations

import os

import pytest

from prunelab.reproductions.testbeds import fashion

NEEDS_FASHION_MNIST = pytest.mark.skipif(
    not os.path.isdir(fashion.DEFAULT_ROOT),
    reason=f"Fashion-MNIST not installed at {fashion.DEFAULT_ROOT} (apt-get install dataset-fashion-mnist)",
)
"""Skips a test (or, as ``pytestmark``, a module) where the Fashion-MNIST files the test-beds read are missing."""
