"""LVLM_CSP's reproduction: ``prunelab reproduce lvlm_csp`` (the tiny preset)."""
