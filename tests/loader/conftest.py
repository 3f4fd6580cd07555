"""Fixtures shared by the loader tests: the CUDA runtime double, built once per session
(a process loads one CUDA runtime, so every test file must get the same library)."""

from __future__ import annotations

import os

import pytest
import torch

from cuda_double import Double, build_double
from warmstart import _native


@pytest.fixture(scope="session")
def double_path(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("a real GPU is here: the double would replace this process's CUDA runtime "
                    "for the GPU tests (run this file on its own to use it)")
    loaded = _native.cuda_runtime_path()
    path = build_double(tmp_path_factory.mktemp("cuda_double"))
    if loaded and os.path.basename(loaded) != os.path.basename(path):
        pytest.skip(f"this process already loaded the CUDA runtime {loaded}")
    return path


@pytest.fixture
def dbl(double_path):
    double = Double(double_path)
    double.reset()
    yield double
    double.reset()


