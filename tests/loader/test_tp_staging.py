"""Tensor parallelism in the vLLM plugin, on the CUDA runtime double: under TP > 1 a GPU
rank's tensors land in host memory, so the loader moves no byte to the device and holds no
device memory (vLLM's weight loaders narrow on the host and copy only the rank's share);
without TP they land on the GPU through the staged pipeline, holding at most
`STREAM_GROUPS` groups of device memory at a time.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM plugin needs vllm installed")

from cuda_double import DoubleMemory  # noqa: E402
from test_cuda_double import cfg_for, no_hazards, oracle  # noqa: E402
from test_oracle import assert_same  # noqa: E402
from warmstart.loader import LoaderConfig  # noqa: E402
from warmstart.loader.api import STREAM_GROUPS  # noqa: E402
from warmstart.testing.checkpoints import make_checkpoint  # noqa: E402
from warmstart.vllm_plugin.model_loader import plan_staging, weights_stream  # noqa: E402
from warmstart.vllm_plugin.options import parse_extra_config  # noqa: E402

GROUP = 256 << 10
CONFIG = LoaderConfig(chunk_size=64 << 10, memory_budget=1 << 20, group_size=GROUP)


class MeteredMemory(DoubleMemory):
    """DoubleMemory that also knows how many bytes of "device" memory are alive (numpy
    arrays back the tensors, so a finalizer sees the last view go) and the peak."""

    def __init__(self, double) -> None:
        super().__init__(double)
        self._lock = threading.Lock()
        self.live = self.peak = 0

    def alloc(self, device: int, nbytes: int, stream: int) -> torch.Tensor:
        super().alloc(device, nbytes, stream)  # records it (and may inject a failure)
        backing = np.empty(nbytes, dtype=np.uint8)
        with self._lock:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        weakref.finalize(backing, self._freed, nbytes)
        return torch.from_numpy(backing)

    def _freed(self, nbytes: int) -> None:
        with self._lock:
            self.live -= nbytes


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return make_checkpoint(root, 3 << 20, shards=2, dtype=torch.float16)


def test_staging_plan():
    cuda, cpu, auto = torch.device("cuda", 1), torch.device("cpu"), LoaderConfig()
    assert plan_staging(cpu, 4, "auto", auto).device == cpu
    one = plan_staging(cuda, 1, "auto", auto)
    assert one.device == cuda and one.config is auto
    tp = plan_staging(cuda, 2, "auto", auto)
    assert tp.device == cpu
    assert (tp.config.mmap, tp.config.direct_io) == (True, False)  # ranks share page cache
    assert tp.config.replace(mmap=None, direct_io=None) == auto  # nothing else changes
    mine = auto.replace(mmap=False, direct_io=True)
    assert plan_staging(cuda, 2, "auto", mine).config == mine  # what the user set stays
    assert plan_staging(cuda, 2, "device", auto).device == cuda
    assert plan_staging(cuda, 1, "host", auto).device == cpu


def test_tp_staging_option_is_parsed_and_checked():
    from warmstart.errors import ConfigError

    assert parse_extra_config({}).tp_staging == "auto"
    assert parse_extra_config({"tp_staging": "host"}).tp_staging == "host"
    with pytest.raises(ConfigError, match="'tp_staging' must be one of auto, host, device"):
        parse_extra_config({"tp_staging": "gpu"})


def _rank_load(path, double, mem, device, tp_size):
    staging = plan_staging(device, tp_size, "auto", cfg_for(double, CONFIG))
    got = {}
    for name, tensor in weights_stream(str(path), staging, _device_memory=mem):
        got[name] = tensor.clone()  # as a weight loader copies into its parameter
    return staging, got


def test_under_tp_each_rank_moves_nothing_to_the_gpu_itself(dbl, ckpt):
    want = oracle(ckpt)
    pinned_before = dbl.stat("pinned_bytes")  # an idle ring left by an earlier test
    for rank in range(2):
        mem = MeteredMemory(dbl)
        staging, got = _rank_load(ckpt, dbl, mem, torch.device("cuda", rank), 2)
        assert_same(got, want)
        assert all(t.device.type == "cpu" for t in got.values())
        assert mem.allocs == [] and mem.peak == 0  # no device memory held by the loader
        assert dbl.stat("enqueued") == 0  # no host-to-device copy by the loader
        assert dbl.stat("pinned_bytes") == pinned_before  # and no pinned ring


def test_without_tp_the_gpu_path_holds_a_bounded_number_of_groups(dbl, ckpt):
    want = oracle(ckpt)
    total = sum(t.numel() * t.element_size() for t in want.values())
    mem = MeteredMemory(dbl)
    staging, got = _rank_load(ckpt, dbl, mem, torch.device("cuda", 1), 1)
    assert staging.device == torch.device("cuda", 1)
    assert_same(got, want)
    assert sum(a[1] for a in mem.allocs) >= total  # every byte went to the device
    assert total > (STREAM_GROUPS + 1) * GROUP  # so the bound below means something
    biggest = max(a[1] for a in mem.allocs)
    # the group being consumed (its latest tensor still referenced) and the one ahead
    assert biggest < mem.peak <= STREAM_GROUPS * biggest
    assert dbl.stat("done") == dbl.stat("enqueued") > 0
    assert dbl.stat("pageable") == 0
    no_hazards(dbl)
