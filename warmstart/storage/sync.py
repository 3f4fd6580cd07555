"""The one sync facade: the async core runs on one named I/O thread with its own loop.

Never `asyncio.run` inside the library: callers (vLLM, Ray actors, notebooks) may already run a
loop on their thread. Every part (loader, image store, Ray gateway) shares one daemon thread,
`warmstart-loop`. `run(coro, timeout=)` cancels the coroutine when the timeout passes and waits
for it to unwind, so nothing keeps running (or holding a caller's buffer) after it returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Awaitable, Coroutine, Iterator, TypeVar

from warmstart.errors import OperationTimeout, WarmstartError

T = TypeVar("T")
_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
UNWIND_WAIT = 30.0  # seconds a cancelled coroutine gets to unwind before run() gives up on it


def loop() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    with _lock:
        if _loop is None or _thread is None or not _thread.is_alive():
            _loop = asyncio.new_event_loop()
            # asyncio.to_thread on this loop (closing executors) gets named threads
            _loop.set_default_executor(ThreadPoolExecutor(2, thread_name_prefix="warmstart-aux"))
            ready = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(_loop)
                ready.set()
                _loop.run_forever()

            _thread = threading.Thread(target=serve, name="warmstart-loop", daemon=True)
            _thread.start()
            ready.wait()
        return _loop


def on_loop_thread() -> bool:
    return threading.current_thread() is _thread


def _check_thread(coro=None) -> asyncio.AbstractEventLoop:
    the_loop = loop()
    if on_loop_thread():
        if coro is not None and hasattr(coro, "close"):
            coro.close()
        raise WarmstartError("warmstart's sync API was called from its own I/O loop; "
                             "use the async API (aload/astream, the stores' coroutines) there")
    return the_loop


async def _tracked(coro: Awaitable[T], finished: threading.Event) -> T:
    try:
        return await coro
    finally:
        finished.set()


def run(coro: Coroutine[object, object, T] | Awaitable[T], timeout: float | None = None) -> T:
    """Runs `coro` on the I/O thread and waits for its result. After `timeout` seconds it is
    cancelled (and awaited while it unwinds), then `OperationTimeout` is raised."""
    the_loop = _check_thread(coro)
    finished = threading.Event()
    future = asyncio.run_coroutine_threadsafe(_tracked(coro, finished), the_loop)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        finished.wait(UNWIND_WAIT)
        raise OperationTimeout(f"gave up after {timeout:g}s (the operation was cancelled)") \
            from None
    except BaseException:
        future.cancel()
        raise


def iterate(agen: AsyncIterator[T]) -> Iterator[T]:
    """Pulls one item at a time, so the async side never runs ahead of the consumer."""
    the_loop = _check_thread()
    try:
        while True:
            future = asyncio.run_coroutine_threadsafe(agen.__anext__(), the_loop)
            try:
                item = future.result()
            except StopAsyncIteration:
                # The future holds the error, whose traceback holds this frame (and its last
                # item): dropped here, so the frame goes now, not at the next cyclic GC.
                del future
                return
            except BaseException:
                future.cancel()
                raise
            yield item
    finally:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None and on_loop_thread():
            # collected on the loop thread itself: waiting there would deadlock
            the_loop.create_task(aclose())
        elif aclose is not None:
            try:
                asyncio.run_coroutine_threadsafe(aclose(), the_loop).result()
            except RuntimeError:  # still unwinding from a cancellation: it closes itself
                pass
