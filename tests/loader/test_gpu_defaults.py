"""The GPU defaults model (loader/gpu_defaults.py): pure, so each choice is checked here."""

from __future__ import annotations

import pytest

from warmstart.loader.config import MiB, LoaderConfig
from warmstart.loader.gpu_defaults import COPY_DEPTH, HostFacts, gpu_defaults

H200 = HostFacts(cores=16)  # PCIe Gen5 host, page cache faster than the link


def check_invariants(d, config: LoaderConfig, unit: int = 1) -> None:
    assert d.ring_bytes == d.slots * d.slot_bytes <= max(config.memory_budget,
                                                         2 * d.slot_bytes)
    assert d.slots >= 2 and d.chunk_size % max(unit, 4096) == 0
    assert d.slot_bytes == d.chunk_size + 2 * max(4096, unit)


def test_an_h200_host_gets_enough_readers_for_the_link_and_a_slot_for_each():
    d = gpu_defaults(H200, LoaderConfig())
    # 55 GB/s at 7 GB/s per reader: 8 readers, and 2 copies queued on the stream
    assert d.readers == 8 and d.rate_gbps == 55.0
    assert d.slots >= d.readers + COPY_DEPTH
    # large enough that 30 us per chunk stays under 5% at 55 GB/s (33 MB), but the budget
    # must hold the depth: 256 MiB / 10 slots, rounded down to 4 MiB
    assert d.chunk_size == 24 * MiB
    check_invariants(d, LoaderConfig())


def test_a_small_host_leaves_cores_for_the_reaper_and_python():
    assert gpu_defaults(HostFacts(cores=2), LoaderConfig()).readers == 2
    assert gpu_defaults(HostFacts(cores=6), LoaderConfig()).readers == 4


def test_slow_storage_needs_fewer_readers_smaller_chunks_and_pins_less():
    slow = HostFacts(cores=16, storage_gbps=3.0)
    d = gpu_defaults(slow, LoaderConfig())
    assert d.readers == 2 and d.rate_gbps == 3.0
    assert d.chunk_size < 2 * MiB  # 30 us is 5% of 600 us, 1.8 MB at 3 GB/s
    assert d.slots == 2 * (d.readers + COPY_DEPTH)  # no more pinned than the depth uses
    assert d.ring_bytes < 16 * MiB
    check_invariants(d, LoaderConfig())


@pytest.mark.parametrize("budget", [32 << 10, 1 << 20, 64 << 20, 1 << 30])
def test_the_budget_is_never_exceeded(budget):
    config = LoaderConfig(memory_budget=budget)
    d = gpu_defaults(H200, config)
    assert d.ring_bytes <= budget
    check_invariants(d, config)
    if budget >= 1 << 20:  # room for the depth: a slot per reader and the copies queued
        assert d.slots >= d.readers + COPY_DEPTH


def test_explicit_settings_are_kept():
    config = LoaderConfig(chunk_size=1 * MiB, concurrency=3)
    d = gpu_defaults(H200, config)
    assert d.chunk_size == 1 * MiB and d.readers == 3
    assert d.slots == 2 * (3 + COPY_DEPTH)


def test_chunks_are_whole_alignment_units():
    d = gpu_defaults(H200, LoaderConfig(), unit=1 << 20)  # verify: 1 MiB blocks
    assert d.chunk_size % (1 << 20) == 0 and d.slot_bytes == d.chunk_size + (2 << 20)
    check_invariants(d, LoaderConfig(), unit=1 << 20)


def test_an_idle_pinned_ring_is_reused_when_it_holds_the_depth():
    fresh = gpu_defaults(H200, LoaderConfig())
    # the ring of an earlier load with the same settings: the same choice, pinned already
    assert gpu_defaults(HostFacts(cores=16, pinned_idle=fresh.ring_bytes),
                        LoaderConfig()) == fresh
    # a smaller idle block that still holds the depth with chunks of 4 MiB or more: used
    d = gpu_defaults(HostFacts(cores=16, pinned_idle=128 * MiB), LoaderConfig())
    assert d.ring_bytes <= 128 * MiB and d.slots >= d.readers + COPY_DEPTH
    assert d.chunk_size >= 4 * MiB
    # one too small for that: a new ring from the budget
    assert gpu_defaults(HostFacts(cores=16, pinned_idle=8 * MiB), LoaderConfig()) == fresh


def test_the_host_is_read_once():
    facts = HostFacts.here(pinned_idle=5)
    assert facts.cores >= 1 and facts.pinned_idle == 5


@pytest.mark.parametrize("cores", [1, 2, 16, 64])
@pytest.mark.parametrize("budget", [32 << 10, 8 << 20, 256 << 20, 4 << 30])
@pytest.mark.parametrize("unit", [1, 4096, 1 << 20])
def test_every_host_size_and_budget_gets_a_ring_within_the_budget_or_the_two_slot_floor(
        cores, budget, unit):
    """1 to 64 cores, 32 KiB to 4 GiB: at least 2 readers and never more than the cores
    leave (beyond the 2-reader floor); the ring within the budget, except the documented
    floor of two slots (verify's 1 MiB blocks: 6 MiB) when the budget holds fewer."""
    config = LoaderConfig(memory_budget=budget)
    d = gpu_defaults(HostFacts(cores=cores), config, unit=unit)
    check_invariants(d, config, unit)
    assert 2 <= d.readers <= max(2, cores - 2)
    if d.ring_bytes > budget:
        assert d.slots == 2 and budget < 2 * d.slot_bytes
        assert d.chunk_size == max(4096, unit)  # the smallest chunk: the floor is the least
