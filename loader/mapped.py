"""`device='cpu'` from local files: tensors that view the file.

Copying a cached file into fresh anonymous memory costs a page fault and a copy per page
(2-3 GB/s on these 2-core VMs), while mapping it costs only the page-table entries: the page
cache already holds the bytes. A file that is not cached is read fastest the same way: the
kernel's readahead fills the page cache in large requests (3-4 GB/s here against 1.2-2.0 GB/s
for parallel O_DIRECT reads of the same cold file, see benchmarks/RESULTS.md), and the bytes
are then in memory once, not in the page cache and a copy. So when every file of the checkpoint
is local, batches of about `group_size` bytes are mapped private and copy-on-write (writes to a
tensor never reach the file, nor other processes) and made resident with `MADV_POPULATE_READ`
by `POPULATE_THREADS` worker threads, each on its own part of the batch, in file order (the next
batch is made resident while the consumer takes the current one, from the moment it has taken
the current one's first tensor); each tensor is handed out as a view once its batch is resident,
and a batch's mapping goes away with the last of its tensors.

What the caller gives up: the tensors share the page cache's pages, so a file truncated while
its tensors are alive makes access to the lost pages fail with SIGBUS, as with any mapping
(safetensors' own `load_file` works the same way). `LoaderConfig(mmap=False)` always copies.
"""

from __future__ import annotations

import asyncio
import mmap
from concurrent.futures import Executor
from typing import AsyncIterator, Callable, Iterable, Sequence

import torch

from warmstart.errors import TruncatedFile
from warmstart.loader.config import LoaderConfig
from warmstart.loader.header import Header, TensorEntry
from warmstart.loader.plan import _split_groups, direct_readable, select
from warmstart.loader.sources.base import Source
from warmstart.loader.sources.local import FileMapping, LocalFileSource

POPULATE_THREADS = 4  # parts of a batch made resident at once (queue depth for cold files)
POPULATE_MIN_PART = 16 << 20  # smaller batches are made resident by one thread


def mappable(sources: Sequence[Source], headers: Sequence[Header], device: torch.device,
             config: LoaderConfig) -> list[LocalFileSource] | None:
    """The local sources to map, or None when this load must copy (any file not suited).

    Cached or not: a cold file opened for O_DIRECT by the auto policy is still mapped (through
    its buffered descriptor) unless O_DIRECT was asked for (`direct_io=True`)."""
    if device.type != "cpu" or config.staged or config.mmap is False or config.direct_io or \
            config.verify:  # verified bytes must pass through a source
        return None
    out = []
    for source, header in zip(sources, headers):
        local = getattr(source, "inner", source)  # beneath the retry wrapper
        if type(local) is not LocalFileSource or not direct_readable(header):
            return None
        out.append(local)
    return out or None


def populate_parts(length: int, threads: int = POPULATE_THREADS,
                   min_part: int = POPULATE_MIN_PART) -> list[tuple[int, int]]:
    """(start, length) parts of a mapping of `length` bytes to make resident in parallel:
    page-aligned, covering it exactly, at most `threads`, none below `min_part` (but one).
    Pure."""
    page = mmap.PAGESIZE
    count = max(1, min(threads, length // max(min_part, 1)))
    step = -(-length // count // page) * page or page
    return [(start, min(step, length - start)) for start in range(0, length, step)]


async def stream_mapped(sources: Sequence[LocalFileSource], headers: Sequence[Header],
                        names: Iterable[str] | None, group_size: int, executor: Executor,
                        progress: Callable[[int, int], None] | None = None
                        ) -> AsyncIterator[tuple[TensorEntry, torch.Tensor]]:
    """Yields `(entry, uint8 view of its bytes)` in file order, each once it is resident;
    `progress(done, total)` counts the bytes made resident."""
    wanted = select(headers, names)
    batches = [(f, members) for f, entries in enumerate(wanted)
               for members in _split_groups(entries, group_size) if members]

    def span(batch: tuple[int, list[TensorEntry]]) -> tuple[int, int]:
        f, members = batch
        base = headers[f].data_start
        return base + members[0].begin, base + max(t.end for t in members)

    loop = asyncio.get_running_loop()

    async def prepare(k: int) -> FileMapping:
        mapping = sources[batches[k][0]].map_private(*span(batches[k]))  # no I/O yet
        parts = [loop.run_in_executor(executor, mapping.populate, start, length)
                 for start, length in populate_parts(len(mapping.buffer))]
        # every part touches only this mapping: wait for all before the first error is raised
        results = await asyncio.gather(*parts, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return mapping

    total = sum(end - start for start, end in map(span, batches))
    done = 0
    pending = loop.create_task(prepare(0)) if batches else None
    try:
        for k, (f, members) in enumerate(batches):
            mapping = await pending
            pending = None
            start, end = span(batches[k])
            done += end - start
            if progress is not None:
                progress(done, total)
            # Each batch has its own mapping, kept alive by its tensors' views only, so a
            # consumer that drops tensors holds about two batches.
            view = torch.frombuffer(mapping.buffer, dtype=torch.uint8)
            base = headers[f].data_start - mapping.offset
            del mapping
            for t in members:
                # A page cut off by a truncation would fault (SIGBUS) when read: check the
                # size before each hand-over, so a file that shrinks is a named error.
                if sources[f].current_size() < headers[f].data_start + t.end:
                    raise TruncatedFile(f"{sources[f].name}: the file shrank below "
                                        f"{headers[f].data_start + t.end} bytes while it was "
                                        f"being loaded (tensor {t.name!r})")
                yield t, view[base + t.begin:base + t.end]
                if pending is None and k + 1 < len(batches):
                    # Back after a tensor of this batch: the consumer holds none of the
                    # previous batch any more, so mapping the next keeps it at two batches.
                    pending = loop.create_task(prepare(k + 1))
            del view
    finally:
        if pending is not None:  # it touches only its own mapping; let it finish
            await asyncio.gather(pending, return_exceptions=True)

