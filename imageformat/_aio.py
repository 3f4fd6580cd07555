"""The image store's sync facade is warmstart.storage.sync (one I/O thread for every part);
`run_sync(coro, timeout=)` cancels the coroutine when the timeout passes."""

from warmstart.storage.sync import loop as io_loop
from warmstart.storage.sync import run as run_sync

__all__ = ["io_loop", "run_sync"]
