"""The replica's side of the node byte path: land the checkpoint on the node, read the
landed files, waiting piece by piece.

`NodeLanding` starts the landing when the replica starts. On a warm node (the node's gateway
actor is up) the gateway lands it and answers `prepare` with the local folder and the pieces
already on the node. On a cold node the replica does not wait for the gateway's new worker
process: it lands the checkpoint itself, in its own process, with the same `Gateway` logic
(this node's share from object storage with the replica's own credentials, other nodes'
pieces from their gateways over Ray, digests checked, each piece claimed across the node's
processes so it is fetched once per node). The gateway is started at once when other nodes
take part (they ask it for this node's share; it lands alongside the replica), else once the
replica has loaded; either way the replica then hands it what it landed (`prepare` with the
pieces' digests), so the gateway keeps the node copy warm for the next replica without
hashing it again.

The replica loads the folder with warmstart's local-file path; each file still being filled
is wrapped in a `PieceGate`, which before each read waits (`wait_ready`: a Ray actor call to
the gateway, or a call to the replica's own lander) until the pieces under it have landed. So
copying to the device starts with the first pieces, and a checkpoint already on the node is
read without any gate (the loader's mapped or O_DIRECT path, at page-cache or local-disk
speed).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Iterable

from warmstart.errors import SourceError, WarmstartError
from warmstart.ray_serve.gateway import Gateway, Prepared
from warmstart.ray_serve.settings import SharingConfig
from warmstart.storage.source import Source, Target

log = logging.getLogger("ray.serve.warmstart")

# (landed file, piece index) -> every landed index of that file, once that piece is landed
Ask = Callable[[str, int], Awaitable[tuple[int, ...]]]
LOCAL_WAITS = 32  # threads of a replica's own lander that wait for pieces for the loader


class ReadyWaiter:
    """Which pieces of the landed files are on the node; asks the gateway for the others
    (one outstanding call per missing piece, shared by all reads that need it)."""

    def __init__(self, ask: Ask, prepared: Prepared,
                 landed_now: Callable[[str], Iterable[int]] | None = None) -> None:
        self._ask = ask
        self._landed_now = landed_now  # what has landed since `prepared`, without waiting
        self._files = {path: (size, count, set(ready))
                       for path, (size, count, ready) in prepared.files.items()}
        self._pending: dict[tuple[str, int], asyncio.Future] = {}
        self.waits = 0  # reads that found a piece under them not landed yet
        self.wait_seconds = 0.0  # summed over those reads (they overlap)

    def incomplete(self, path: str) -> bool:
        info = self._files.get(path)
        if info is not None and self._landed_now is not None:
            info[2].update(self._landed_now(path))
        return info is not None and len(info[2]) < info[1]

    async def wait(self, path: str, offset: int, length: int) -> None:
        info = self._files.get(path)
        if info is None or length <= 0:
            return
        piece_size, count, ready = info
        last = min(count - 1, (offset + length - 1) // piece_size)
        started = None
        try:
            for index in range(offset // piece_size, last + 1):
                if index in ready:
                    continue
                if started is None:
                    started = time.perf_counter()
                await self._wait_piece(path, index, ready)
        finally:
            if started is not None:
                self.waits += 1
                self.wait_seconds += time.perf_counter() - started

    async def _wait_piece(self, path: str, index: int, ready: set[int]) -> None:
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


def ray_ask(gateway) -> Ask:
    """Waits through the node's gateway actor (`wait_ready.remote`)."""
    async def ask(path: str, index: int) -> tuple[int, ...]:
        import ray

        ref = gateway.wait_ready.remote(path, index)
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

    return ask


def local_ask(lander: Gateway, threads: ThreadPoolExecutor) -> Ask:
    """Waits on a lander in this process (its `wait_ready` blocks: it runs on `threads`, not
    on the I/O loop's small default pool, which the storage layer needs meanwhile)."""
    async def ask(path: str, index: int) -> tuple[int, ...]:
        return await asyncio.get_running_loop().run_in_executor(
            threads, lander.wait_ready, path, index)

    return ask


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


def gate_for(gateway, prepared: Prepared, ask: Ask | None = None,
             landed_now: Callable[[str], Iterable[int]] | None = None):
    """The loader's `wrap_source` for a prepared checkpoint, or None when it is all landed;
    reads wait through the gateway actor `gateway`, or through `ask`. With `landed_now`, a
    file found complete when the loader opens it is not gated: the loader may map it (no
    copy), as on a warm node."""
    if prepared.complete:
        return None
    waiter = ReadyWaiter(ask or ray_ask(gateway), prepared, landed_now)

    def wrap(source: Source) -> Source:
        return PieceGate(source, waiter) if waiter.incomplete(source.name) else source

    wrap.waiter = waiter  # its wait counters
    return wrap


def unwrap_ray_error(exc: BaseException) -> BaseException:
    """The warmstart error inside a Ray task error, else the error itself."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, WarmstartError) else exc


class NodeLanding:
    """Lands `uri` on this replica's node, starting at once (see the module docstring):
    `prepared()` is the local copy to load, `gate(prepared)` the loader's `wrap_source`,
    `close()` ends this process's part once the load is done."""

    def __init__(self, uri: str, sharing: SharingConfig,
                 mark: Callable[[str], None] | None = None) -> None:
        import ray

        from warmstart.ray_serve.node_actor import (
            bytes_metric, ensure_gateway, gateway_running, participant_nodes, peer_fetch)

        mark = mark or (lambda hop: None)
        self.waiter: ReadyWaiter | None = None
        self.uri, self.sharing = uri, sharing
        self.node_id = ray.get_runtime_context().get_node_id()
        self.local = not gateway_running(self.node_id)  # cold node: land here meanwhile
        mark("gateway_looked_up")
        self.gateway, self._ref, self.lander = None, None, None
        nodes = participant_nodes(sharing.node_resource) if sharing.mode == "cluster" else ()
        mark("nodes_listed")
        if not self.local or len(set(nodes) - {self.node_id}):  # needed now: peers ask it
            self.gateway = ensure_gateway(self.node_id, sharing)
            if not self.local:
                self._ref = self.gateway.prepare.remote(uri)
            # on a cold node the gateway only answers peers while this replica lands (a
            # second lander of the whole checkpoint in its process would only compete for
            # the claims and the CPU); it is handed the node copy after the load (`close`)
            mark("gateway_asked")
        if self.local:
            self.lander = Gateway(sharing, self.node_id,
                                  nodes=lambda: participant_nodes(sharing.node_resource),
                                  peer_fetch=peer_fetch(sharing), on_bytes=bytes_metric(),
                                  mark=mark)
            self._threads = ThreadPoolExecutor(LOCAL_WAITS, thread_name_prefix="warmstart-wait")
            # the S3 client (botocore's import and service model), the listing and the small
            # objects are Python work that holds the GIL, as the replica's torch import
            # does next: side by side each took twice as long and the first GET waited for
            # both. Done first (~0.5 s), the pieces then flow while torch imports
            try:
                self._prepared = self.lander.prepare(uri, False)
            except BaseException:
                self.lander.close()
                self._threads.shutdown(wait=False, cancel_futures=True)
                raise

    def prepared(self) -> Prepared:
        if self.lander is not None:
            return self._prepared
        import ray

        for attempt in range(2):
            try:
                return ray.get(self._ref)
            except ray.exceptions.RayActorError:  # a gateway being stopped held the name
                if attempt:
                    raise
                time.sleep(1.0)
                from warmstart.ray_serve.node_actor import ensure_gateway

                self.gateway = ensure_gateway(self.node_id, self.sharing)
                self._ref = self.gateway.prepare.remote(self.uri)
            except ray.exceptions.RayTaskError as exc:
                raise unwrap_ray_error(exc) from None
        raise AssertionError("unreachable")

    def gate(self, prepared: Prepared):
        if self.lander is not None:
            wrap = gate_for(None, prepared, local_ask(self.lander, self._threads),
                            self.lander.ready_now)
        else:
            wrap = gate_for(self.gateway, prepared)
        self.waiter = getattr(wrap, "waiter", None)
        return wrap

    def wait_all(self, prepared: Prepared) -> None:
        """Waits until every piece of the checkpoint is on the node."""
        for path, (_, count, ready) in prepared.files.items():
            landed = set(ready)
            for index in range(count):
                if index in landed:
                    continue
                if self.lander is not None:
                    landed.update(self.lander.wait_ready(path, index))
                    continue
                import ray

                try:
                    landed.update(ray.get(self.gateway.wait_ready.remote(path, index)))
                except ray.exceptions.RayTaskError as exc:
                    raise unwrap_ray_error(exc) from None

    def stats(self) -> dict:
        return self.lander.stats() if self.lander is not None else {}

    def close(self) -> None:
        """Stops this process's lander and hands what it landed to the node's gateway
        (started now if it was not needed before), which keeps the node copy for the next
        replica and lands what this replica did not read."""
        if self.lander is None:
            return
        landed = self.lander.landed()
        self.lander.close()
        self._threads.shutdown(wait=False, cancel_futures=True)
        if self.gateway is None and not any(landed.values()):
            return  # nothing landed (the load failed early): nothing to keep
        from warmstart.ray_serve.node_actor import ensure_gateway

        try:
            self.gateway = self.gateway or ensure_gateway(self.node_id, self.sharing)
            self.gateway.prepare.remote(self.uri, landed)  # not waited for
        except Exception as exc:  # noqa: BLE001 - the load is done; the next replica lands
            log.warning("warmstart: could not hand the node copy of %s to the node's "
                        "gateway: %s", self.uri, exc)
