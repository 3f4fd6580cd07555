"""The one progress protocol: `progress(done, total)`, bytes so far and bytes in all.

Every long operation (load, pull, push, convert, a gateway fill) reports cumulative counts,
never deltas, so a report can be dropped or repeated without the bar drifting. `total` is 0
while it is not known ahead (convert streams layers whose sizes are unknown until read). `Counter` turns the
deltas a pipeline naturally has into calls of the protocol, from any thread.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

Progress = Callable[[int, int], None]


class Counter:
    """Adds up byte deltas and reports `(done, total)` to `progress` (when one is given)."""

    def __init__(self, total: int, progress: Optional[Progress] = None) -> None:
        self.total = total
        self.done = 0
        self._progress = progress
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            done = self.done
        if self._progress is not None:
            self._progress(done, self.total)
