"""Waiting for "eventually" conditions without making a test's verdict depend on how busy
the machine is: poll until the condition holds, failing only past a generous deadline."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

DEADLINE_S = 60.0

T = TypeVar("T")


def wait_until(condition: Callable[[], object], what: str,
               deadline_s: float = DEADLINE_S) -> None:
    """Returns as soon as `condition()` is true; AssertionError naming `what` past the deadline."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {deadline_s:.0f} s in vain until {what}"
        time.sleep(0.01)


def settled(sample: Callable[[], T], clean: Callable[[T], bool],
            deadline_s: float = DEADLINE_S) -> T:
    """`sample()` once it is `clean` (threads ended, connections closed), or the last sample
    at the deadline, for the caller's assertion to report."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = sample()
        if clean(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.02)
