"""Header parse, read planning, host-ring cycling and digests."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from warmstart.loader.header import parse_header
from warmstart.loader.memory import HostRing
from warmstart.loader.plan import plan_reads

MiB = 1 << 20


def test_parse_header(benchmark, llama_header):
    raw, size = llama_header
    header = benchmark(parse_header, raw, size, "bench.safetensors")
    assert len(header.tensors) > 100


@pytest.mark.parametrize("chunk_mib", [4, 16])
def test_plan_reads(benchmark, llama_header, chunk_mib):
    raw, size = llama_header
    headers = [parse_header(raw, size, f"shard{i}.safetensors") for i in range(4)]
    plan = benchmark(plan_reads, headers, None, chunk_size=chunk_mib * MiB,
                     group_size=1 << 30, gap_size=MiB)
    assert plan.read_bytes >= plan.tensor_bytes


def test_ring_cycle(benchmark):
    """1000 get/put cycles through an 8-slot pageable ring (the per-chunk hand-off cost)."""
    loop = asyncio.new_event_loop()
    ring = HostRing.pageable(8, MiB)

    async def cycle():
        for _ in range(1000):
            slot = await ring.get()
            ring.put(slot)

    try:
        benchmark(lambda: loop.run_until_complete(cycle()))
    finally:
        ring.free()
        loop.close()


@pytest.mark.parametrize("algorithm", ["blake2b", "sha256"])
def test_digest_16mib(benchmark, algorithm):
    data = bytes(range(256)) * (16 * MiB // 256)
    benchmark(lambda: hashlib.new(algorithm, data).digest())
