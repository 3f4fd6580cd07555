"""Read planning is pure: check coverage, alignment and completion counts without I/O."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from loader_helpers import odd_offset_file, random_tensor
from warmstart.errors import MissingTensor
from warmstart.loader.header import DTYPES, parse_header
from warmstart.loader.plan import plan_reads


def header_of(blob: bytes):
    return parse_header(blob, len(blob), "mem")


def tensors(n=20, size=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {f"t{i}": random_tensor(torch.float32, (size + i,), gen) for i in range(n)}


@pytest.mark.parametrize("chunk", [4096, 10_000, 1 << 20])
def test_chunks_cover_every_wanted_byte_once(chunk):
    h = header_of(save(tensors()))
    plan = plan_reads([h], None, chunk_size=chunk, group_size=1 << 30, gap_size=1 << 20)
    assert plan.read_bytes == h.file_size - h.data_start
    assert all(c.length <= chunk for c in plan.chunks)
    spans = sorted((c.offset, c.offset + c.length) for c in plan.chunks)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for t in plan.tensors:  # chunk count == chunks overlapping the tensor's destination
        overlapping = [c for c in plan.chunks if c.group == t.group and
                       c.dest < t.offset + t.nbytes and c.dest + c.length > t.offset]
        assert t.chunks == len(overlapping)


def test_groups_split_at_tensor_boundaries():
    h = header_of(save(tensors(n=10, size=10_000)))
    plan = plan_reads([h], None, chunk_size=4096, group_size=100_000, gap_size=0)
    assert len(plan.groups) > 1
    for g in plan.groups:
        for i in g.tensors:
            t = plan.tensors[i]
            assert t.group == g.index and t.offset + t.nbytes <= g.nbytes


def test_names_filter_skips_big_gaps_reads_small_ones():
    h = header_of(save(tensors(n=6, size=100_000)))
    wanted = ["t0", "t1", "t5"]
    plan = plan_reads([h], wanted, chunk_size=1 << 20, group_size=1 << 30, gap_size=0)
    assert {t.name for t in plan.tensors} == set(wanted)
    assert plan.read_bytes == plan.tensor_bytes  # no gap read through
    loose = plan_reads([h], wanted, chunk_size=1 << 20, group_size=1 << 30,
                       gap_size=10 << 20)
    assert loose.read_bytes > loose.tensor_bytes
    spans = [(c.offset, c.offset + c.length) for c in loose.chunks]
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # one run, gap read through


def test_unknown_name_is_missing_tensor():
    h = header_of(save(tensors(n=2)))
    with pytest.raises(MissingTensor, match="'nope'"):
        plan_reads([h], ["t0", "nope"], chunk_size=4096, group_size=1 << 30, gap_size=0)


def test_misaligned_tensors_get_aligned_destinations():
    gen = torch.Generator().manual_seed(1)
    blob = odd_offset_file({f"x{i}": random_tensor(torch.float64, (5,), gen) for i in range(6)})
    plan = plan_reads([header_of(blob)], None, chunk_size=4096, group_size=1 << 30,
                      gap_size=1 << 20)
    for t in plan.tensors:
        assert t.offset % DTYPES[t.dtype][1] == 0, t


def test_empty_tensors_need_no_chunks():
    blob = save({"e": torch.empty(0, 4), "s": torch.tensor(1.0)})
    plan = plan_reads([header_of(blob)], None, chunk_size=4096, group_size=1 << 30,
                      gap_size=0)
    counts = {t.name: t.chunks for t in plan.tensors}
    assert counts == {"e": 0, "s": 1}


@pytest.mark.parametrize("names", [None, ["t1", "t4", "t5"]])
def test_aligned_reads_spill_only_into_slack(names):
    """With read_align, a chunk widened to 4 KiB boundaries writes file bytes around its own
    range; those extra bytes must land inside the group buffer and on no tensor's bytes."""
    a = 4096
    h = header_of(save(tensors(n=8, size=3000)))
    plan = plan_reads([h], names, chunk_size=2 * a, group_size=1 << 30, gap_size=0,
                      read_align=[a])
    for c in plan.chunks:
        start = c.offset // a * a
        end = -(-(c.offset + c.length) // a) * a
        lo, hi = c.dest - (c.offset - start), c.dest - (c.offset - start) + (end - start)
        assert lo % a == (start % a) and 0 <= lo and hi <= plan.groups[c.group].nbytes
        for t in plan.tensors:
            if t.group != c.group:
                continue
            for s0, s1 in ((lo, c.dest), (c.dest + c.length, hi)):  # the spill-over
                assert s0 == s1 or s1 <= t.offset or s0 >= t.offset + t.nbytes, (c, t)
    for t in plan.tensors:  # mirrored: destination congruent to the file offset
        src = h.data_start + next(x.begin for x in h.tensors if x.name == t.name)
        assert t.offset % a == src % a
