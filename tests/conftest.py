"""Test configuration: Triton kernels run under the CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton compiles any kernel, i.e. before the kernel
modules are imported; moe_kernels imports them lazily, after this file has run.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return torch.device(DEVICE)
