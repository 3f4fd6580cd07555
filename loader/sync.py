"""The one sync facade: run the async core on a named I/O thread with its own loop.

Never `asyncio.run` inside the library: callers (vLLM, Ray actors, notebooks) may already
run a loop on their thread. All sync calls share one daemon thread, `warmstart-loop`.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Awaitable, Iterator, TypeVar

from warmstart.errors import WarmstartError

T = TypeVar("T")
_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def loop() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    with _lock:
        if _loop is None or _thread is None or not _thread.is_alive():
            _loop = asyncio.new_event_loop()
            # asyncio.to_thread on this loop (closing executors) gets named threads
            _loop.set_default_executor(ThreadPoolExecutor(2, thread_name_prefix="warmstart-aux"))
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(_loop)
                ready.set()
                _loop.run_forever()

            _thread = threading.Thread(target=run, name="warmstart-loop", daemon=True)
            _thread.start()
            ready.wait()
        return _loop


def _check_thread() -> asyncio.AbstractEventLoop:
    the_loop = loop()
    if threading.current_thread() is _thread:
        raise WarmstartError("warmstart's sync API was called from its own I/O loop; "
                             "use the async API (aload/astream) there")
    return the_loop


def run(coro: Awaitable[T]) -> T:
    future = asyncio.run_coroutine_threadsafe(coro, _check_thread())
    try:
        return future.result()
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
                return
            except BaseException:
                future.cancel()
                raise
            yield item
    finally:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None and threading.current_thread() is _thread:
            # collected on the loop thread itself: waiting there would deadlock
            the_loop.create_task(aclose())
        elif aclose is not None:
            try:
                asyncio.run_coroutine_threadsafe(aclose(), the_loop).result()
            except RuntimeError:  # still unwinding from a cancellation: it closes itself
                pass
