"""One named I/O thread with its own asyncio loop: the sync facade over the async stores.

The library never calls `asyncio.run` (it would break inside a caller's running loop);
synchronous callers hand coroutines to this thread and wait for the result.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def io_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            t = threading.Thread(target=loop.run_forever, name="warmstart-image-io",
                                 daemon=True)
            t.start()
            _loop = loop
        return _loop


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Runs `coro` on the I/O thread and waits for it (from any thread but that one)."""
    loop = io_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise RuntimeError("run_sync called from the warmstart I/O thread itself")
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)
