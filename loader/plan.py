"""Read planning: which byte ranges to read, where each lands, and when a tensor is whole.

Pure functions over validated headers, returning frozen dataclasses; no I/O.

Destination memory is allocated per *group* (consecutive tensors of one file, about
`group_size` bytes). Inside a group, an *extent* is a run of tensors that is contiguous in
the file and is mirrored byte for byte into the group buffer, so one read can cover many
tensors. A new extent starts where the wanted tensors leave a gap wider than `gap_size`, or
where mirroring would misalign a tensor for its dtype (files written with odd offsets).
Each extent is cut into chunks of at most `chunk_size` bytes: the unit of reading, staging
and copying. A tensor is complete when every chunk overlapping it has landed.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable, Sequence

from warmstart.errors import MissingTensor
from warmstart.loader.header import Header, TensorEntry

GROUP_ALIGN = 256  # extents start on this alignment inside a group buffer


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: int
    group: int
    offset: int   # within the group buffer
    nbytes: int
    chunks: int   # how many chunks must land before the tensor is whole


@dataclass(frozen=True)
class Group:
    index: int
    file: int
    nbytes: int
    tensors: tuple[int, ...]  # indexes into ReadPlan.tensors


@dataclass(frozen=True)
class Chunk:
    index: int
    file: int
    offset: int       # absolute offset in the file
    length: int
    group: int
    dest: int         # offset in the group buffer
    tensors: tuple[int, ...]  # tensors this chunk carries bytes of


@dataclass(frozen=True)
class ReadPlan:
    tensors: tuple[PlannedTensor, ...]
    groups: tuple[Group, ...]
    chunks: tuple[Chunk, ...]

    @property
    def read_bytes(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


@dataclass
class _Extent:
    src_start: int  # absolute file offset
    src_end: int
    dest_start: int


def select(headers: Sequence[Header], names: Iterable[str] | None) -> list[list[TensorEntry]]:
    """Per file, the wanted tensors in file order; unknown names raise MissingTensor."""
    if names is None:
        return [list(h.tensors) for h in headers]
    wanted = set(names)
    found = [[t for t in h.tensors if t.name in wanted] for h in headers]
    missing = wanted - {t.name for ts in found for t in ts}
    if missing:
        raise MissingTensor(f"tensor(s) not in the checkpoint: "
                            f"{', '.join(sorted(map(repr, missing))[:10])}")
    return found


def plan_reads(headers: Sequence[Header], names: Iterable[str] | None, *, chunk_size: int,
               group_size: int, gap_size: int,
               read_align: Sequence[int] | None = None) -> ReadPlan:
    """`read_align[f]` > 1 plans file f for reads straight into the destination at that
    alignment (O_DIRECT): each extent sits at a destination offset congruent to its file
    offset, with room before and after for the aligned read's spill-over, and chunks start
    on aligned file offsets. The pipeline widens each read to the alignment."""
    tensors: list[PlannedTensor] = []
    groups: list[Group] = []
    chunks: list[Chunk] = []
    for file_index, (header, wanted) in enumerate(zip(headers, select(headers, names))):
        for members in _split_groups(wanted, group_size):
            group_index = len(groups)
            align = read_align[file_index] if read_align else 1
            extents, offsets = _layout(header, members, gap_size, align)
            first_tensor = len(tensors)
            tensors.extend(
                PlannedTensor(t.name, t.dtype, t.shape, file_index, group_index, off,
                              t.nbytes, 0)
                for t, off in zip(members, offsets))
            group_bytes = _align(max((e.dest_start + e.src_end - e.src_start
                                      for e in extents), default=0), align)
            groups.append(Group(group_index, file_index, group_bytes,
                                tuple(range(first_tensor, len(tensors)))))
            _cut_chunks(extents, file_index, group_index, chunk_size, align, tensors,
                        first_tensor, chunks)
    counts = [0] * len(tensors)
    for c in chunks:
        for t in c.tensors:
            counts[t] += 1
    tensors = [PlannedTensor(**{**t.__dict__, "chunks": n}) for t, n in zip(tensors, counts)]
    return ReadPlan(tuple(tensors), tuple(groups), tuple(chunks))


def direct_readable(header: Header) -> bool:
    """Whether every tensor's file offset suits its dtype, as reads straight into a
    file-congruent destination require (true of files written by safetensors)."""
    return all((header.data_start + t.begin) % t.itemsize == 0 for t in header.tensors)


def _split_groups(wanted: list[TensorEntry], group_size: int) -> list[list[TensorEntry]]:
    out: list[list[TensorEntry]] = []
    current: list[TensorEntry] = []
    span_start = 0
    for t in wanted:
        if current and t.end - span_start > group_size:
            out.append(current)
            current = []
        if not current:
            span_start = t.begin
        current.append(t)
    if current:
        out.append(current)
    return out


def _layout(header: Header, members: list[TensorEntry], gap_size: int,
            align: int) -> tuple[list[_Extent], list[int]]:
    """Extents mirroring the file, and each member's offset in the group buffer."""
    extents: list[_Extent] = []
    offsets: list[int] = []
    for t in members:
        start = header.data_start + t.begin
        end = header.data_start + t.end
        ext = extents[-1] if extents else None
        if ext is not None:
            mirrored = ext.dest_start + (start - ext.src_start)
            gap = start - ext.src_end
            if gap <= gap_size and mirrored % t.itemsize == 0:
                ext.src_end = max(ext.src_end, end)
                offsets.append(mirrored)
                continue
        used = (extents[-1].dest_start + extents[-1].src_end - extents[-1].src_start
                if extents else 0)
        if align > 1:  # congruent to the file offset; the previous spill-over ends at used
            dest = _align(used, align) + start % align
        else:
            dest = _align(used, GROUP_ALIGN)
        extents.append(_Extent(start, end, dest))
        offsets.append(dest)
    return extents, offsets


def _cut_chunks(extents: list[_Extent], file_index: int, group_index: int, chunk_size: int,
                align: int, tensors: list[PlannedTensor], first_tensor: int,
                out: list[Chunk]) -> None:
    members = tensors[first_tensor:]
    starts = [t.offset for t in members]  # ascending: members are in file order
    for ext in extents:
        first = ext.src_start // align * align  # chunk boundaries on aligned file offsets
        for boundary in range(first, ext.src_end, chunk_size):
            src = max(boundary, ext.src_start)
            length = min(boundary + chunk_size, ext.src_end) - src
            dest = ext.dest_start + (src - ext.src_start)
            # tensors whose [offset, offset + nbytes) overlaps [dest, dest + length)
            lo = max(0, bisect.bisect_right(starts, dest) - 1)
            hi = bisect.bisect_left(starts, dest + length)
            carried = tuple(first_tensor + i for i in range(lo, hi)
                            if members[i].nbytes and members[i].offset < dest + length
                            and members[i].offset + members[i].nbytes > dest)
            out.append(Chunk(len(out), file_index, src, length, group_index, dest, carried))
