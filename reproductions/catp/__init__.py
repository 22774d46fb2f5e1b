"""CATP's reproduction: ``prunelab reproduce catp`` (the tiny preset)."""
