import os

# Triton needs its interpreter on machines without a GPU, and reads the flag at import time.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest  # noqa: E402

from prunelab.common.tiny_vlm import FAMILIES as VLM_FAMILIES  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module", params=VLM_FAMILIES)
def family_model(request):
    """``(family, model)`` for each tiny VLM family of ``prunelab.common.tiny_vlm``, built once per module."""
    from prunelab.common.tiny_vlm import tiny_vlm

    return request.param, tiny_vlm(request.param)


@pytest.fixture(scope="session")
def vlm_folders(tmp_path_factory):
    """``{family: folder}``: each tiny VLM saved with its processor (``vlm_offline.save_tiny_vlm``), once per run."""
    from prunelab.reproductions.vlm_offline import save_tiny_vlm

    root = tmp_path_factory.mktemp("tiny_vlm_folders")
    return {f: save_tiny_vlm(root / f, f) for f in VLM_FAMILIES}
