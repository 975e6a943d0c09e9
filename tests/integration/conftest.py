"""The integration suite: real torchvision and timm architectures, PyTorch's own ModuleInfo samples through the PWS
classes, ONNX Runtime. It needs the integration environment (torch 2.14.1 + torchvision 0.29.1, timm, onnx,
onnxruntime, onnxscript, expecttest): ``bash .ci/integration`` builds it once under ~/.cache/pwsconv and runs it.
It is not collected by the README's ``python -m pytest -q`` (``norecursedirs`` in pyproject.toml); its imports are
not skipped when missing: an integration run without its environment fails loudly."""

import os

import torch

os.environ.setdefault("PYTORCH_TEST_WITH_SLOW", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))
