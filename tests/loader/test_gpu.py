"""CUDA path on a real GPU: pinned ring + copies on a stream with events. Runs only with a GPU.

The same paths run on CPU CI through the CUDA runtime double (test_cuda_double.py). Nothing
here loads CUDA at collection time: a first load must pin its ring by itself."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from test_oracle import TINY, assert_same
from warmstart import _native
from warmstart.loader import LoaderConfig, load, native_loop, stream

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs an NVIDIA GPU with a driver and a CUDA build of torch"),
    pytest.mark.skipif("double" in _native.cuda_runtime_path(),
                       reason="this process loaded the CUDA runtime double"),
]


@pytest.mark.parametrize("config", [LoaderConfig(), TINY, TINY.replace(direct_io=True)],
                         ids=["default", "tiny", "tiny-odirect"])
@pytest.mark.parametrize("layout", ["single.safetensors", "sharded", "folder"])
def test_cuda_matches_oracle(checkpoint, layout, config):
    root, tensors = checkpoint
    got = load(str(root / layout), "cuda:0", config=config)
    assert all(t.device.type == "cuda" for t in got.values())
    assert_same({k: v.cpu() for k, v in got.items()}, tensors)
    stats = native_loop.last_stats()  # local files: through the native copy loop
    assert stats["chunks_done"] == stats["copies"] > 0 and stats["slots_in_use"] == 0


def test_cuda_stream_and_safetensors_agree(checkpoint):
    root, _ = checkpoint
    want = load_file(str(root / "single.safetensors"), device="cuda:0")
    got = {n: t.clone() for n, t in stream(str(root / "single.safetensors"), "cuda:0",
                                           config=TINY)}
    assert_same({k: v.cpu() for k, v in got.items()}, {k: v.cpu() for k, v in want.items()})


def test_caller_device_and_stream_unchanged(checkpoint):
    root, tensors = checkpoint
    torch.cuda.set_device(0)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        got = load(str(root / "single.safetensors"), f"cuda:{torch.cuda.device_count() - 1}",
                   config=TINY)
        assert torch.cuda.current_stream() == side
    assert torch.cuda.current_device() == 0
    assert_same({k: v.cpu() for k, v in got.items()}, tensors)


from test_oracle import checkpoint  # noqa: E402,F401  (shared module fixture)
