"""Let the CUDA build of torchvision import next to a CPU build of torch.

The torchvision wheel on PyPI is a CUDA build; next to CPU torch its import fails with
``operator torchvision::nms does not exist`` because the C++ library that registers that schema cannot
load. transformers and timm import torchvision, so this breaks them too. The set-up script installs
this module into the virtual environment with a ``.pth`` file that imports it at start-up (pytest,
subprocesses and Jupyter kernels alike). It is environment plumbing, not part of prunelab: library
code patches nothing.

The finder reacts only to ``import torchvision`` and only when torch is a CPU build. Before the real
import runs it defines the two operator schemas torchvision's Python code looks up at import time.
Torchvision's C++ ops (nms, roi_align, image decoding) still raise if called; prunelab never calls them.
"""

import importlib.abc
import sys

_LIBRARY = []  # keeps the torch.library fragment alive for the life of the process


class _TorchvisionCpuShim(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)  # act once
        try:
            import torch

            if torch.version.cuda is None and not _LIBRARY:
                lib = torch.library.Library("torchvision", "FRAGMENT")
                for op in ("nms", "qnms"):
                    try:
                        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                    except RuntimeError:  # already defined by a working C++ extension
                        pass
                _LIBRARY.append(lib)
        except Exception:  # never make an import fail because of the shim
            pass
        return None  # let the normal finders import the real package


if not any(isinstance(f, _TorchvisionCpuShim) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionCpuShim())
