"""CUDA path: pinned ring + cudaMemcpyAsync on a stream with events. Runs only with a GPU."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from test_oracle import TINY, assert_same
from warmstart.loader import LoaderConfig, load, stream
from warmstart.loader.copy import cuda_device_count

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or cuda_device_count() == 0,
                       reason="needs an NVIDIA GPU with a driver and a CUDA build of torch"),
]


@pytest.mark.parametrize("config", [LoaderConfig(), TINY, TINY.replace(direct_io=True)],
                         ids=["default", "tiny", "tiny-odirect"])
@pytest.mark.parametrize("layout", ["single.safetensors", "sharded", "folder"])
def test_cuda_matches_oracle(checkpoint, layout, config):
    root, tensors = checkpoint
    got = load(str(root / layout), "cuda:0", config=config)
    assert all(t.device.type == "cuda" for t in got.values())
    assert_same({k: v.cpu() for k, v in got.items()}, tensors)


def test_cuda_stream_and_safetensors_agree(checkpoint):
    root, _ = checkpoint
    want = load_file(str(root / "single.safetensors"), device="cuda:0")
    got = {n: t.clone() for n, t in stream(str(root / "single.safetensors"), "cuda:0",
                                           config=TINY)}
    assert_same({k: v.cpu() for k, v in got.items()}, {k: v.cpu() for k, v in want.items()})


from test_oracle import checkpoint  # noqa: E402,F401  (shared module fixture)
