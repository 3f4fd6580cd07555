"""The replica's side of the node byte path: read landed files, waiting piece by piece.

The gateway's `prepare` answers with the local folder of a checkpoint and the pieces already
on the node. The replica loads that folder with warmstart's local-file path; each file still
being filled is wrapped in a `PieceGate`, which before each read asks the gateway (a Ray
actor call, `wait_ready`) until the pieces under it have landed. So copying to the device
starts with the first pieces, and a checkpoint already on the node is read without any gate
(the loader's mapped or O_DIRECT path, at page-cache or local-disk speed).
"""

from __future__ import annotations

import asyncio
import errno

from warmstart.errors import SourceError, WarmstartError
from warmstart.ray_serve.gateway import Prepared
from warmstart.storage.source import Source, Target


class ReadyWaiter:
    """Which pieces of the landed files are on the node; asks the gateway for the others
    (one outstanding call per missing piece, shared by all reads that need it)."""

    def __init__(self, gateway, prepared: Prepared) -> None:
        self._gateway = gateway
        self._files = {path: (size, count, set(ready))
                       for path, (size, count, ready) in prepared.files.items()}
        self._pending: dict[tuple[str, int], asyncio.Future] = {}

    def incomplete(self, path: str) -> bool:
        info = self._files.get(path)
        return info is not None and len(info[2]) < info[1]

    async def wait(self, path: str, offset: int, length: int) -> None:
        info = self._files.get(path)
        if info is None or length <= 0:
            return
        piece_size, count, ready = info
        last = min(count - 1, (offset + length - 1) // piece_size)
        for index in range(offset // piece_size, last + 1):
            if index in ready:
                continue
            key = (path, index)
            fut = self._pending.get(key)
            if fut is None:
                fut = self._pending[key] = asyncio.ensure_future(self._ask(path, index))
            try:
                landed = await asyncio.shield(fut)
            finally:
                if fut.done():
                    self._pending.pop(key, None)
            ready.update(landed)

    async def _ask(self, path: str, index: int) -> tuple[int, ...]:
        import ray

        ref = self._gateway.wait_ready.remote(path, index)
        try:
            return await asyncio.wrap_future(ref.future())
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, WarmstartError):
                raise cause from None
            raise SourceError(errno.EIO, f"{path}: the node gateway could not land piece "
                                         f"{index}: {cause or exc}") from None
        except ray.exceptions.RayActorError as exc:
            raise SourceError(errno.EIO, f"{path}: the node gateway died while landing piece "
                                         f"{index} ({type(exc).__name__})") from None


class PieceGate(Source):
    """A landed file's source whose reads wait until the pieces they cover are on the node."""

    def __init__(self, file: Source, waiter: ReadyWaiter) -> None:
        self._file = file  # not `inner`: the loader must not map a file still being filled
        self._waiter = waiter
        self.name = file.name
        self.backend = file.backend
        self.alignment = file.alignment

    async def size(self) -> int:
        return await self._file.size()

    async def read_into(self, offset: int, target: Target) -> None:
        await self._waiter.wait(self.name, offset, target.nbytes)
        await self._file.read_into(offset, target)

    async def close(self) -> None:
        await self._file.close()


def gate_for(gateway, prepared: Prepared):
    """The loader's `wrap_source` for a prepared checkpoint, or None when it is all landed."""
    if prepared.complete:
        return None
    waiter = ReadyWaiter(gateway, prepared)

    def wrap(source: Source) -> Source:
        return PieceGate(source, waiter) if waiter.incomplete(source.name) else source

    return wrap


def unwrap_ray_error(exc: BaseException) -> BaseException:
    """The warmstart error inside a Ray task error, else the error itself."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, WarmstartError) else exc
