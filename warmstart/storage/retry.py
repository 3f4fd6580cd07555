"""The one retry policy: jittered exponential backoff, bounded, per request.

Every object-store call (HEAD, LIST, ranged GET, PUT, multipart part) goes through `attempt`
(or `attempt_blocking`, its twin for callers on blocking threads)
with botocore's own retries switched off, so one request is tried at most `max_attempts`
times in total: no retry loop is nested inside another. Only `Retryable` errors are retried
(a class, never a message match); the last one is wrapped in `RetriesExhausted`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

from warmstart.errors import ConfigError, RetriesExhausted, Retryable
from warmstart.storage.source import Source, Target

log = logging.getLogger("warmstart.storage")
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    """Tries per request in total (1 = no retries)."""
    base_delay: float = 0.1
    max_delay: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base_delay <= 0 or self.max_delay <= 0:
            raise ConfigError(f"bad retry policy {self}: attempts >= 1, delays > 0")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """'Full jitter': uniform in [0, min(max_delay, base * 2**attempt)]."""
        return rng.uniform(0.0, min(self.max_delay, self.base_delay * (2 ** attempt)))


def _pause_after(policy: RetryPolicy, what: str, n: int, exc: Retryable, rng,
                 on_retry: Callable[[BaseException], None] | None) -> float:
    """After attempt `n` failed with `exc`: raises (no retries asked for: the original, which
    the caller may retry; the last attempt: RetriesExhausted), else the pause before the next.
    Shared by `attempt` and `attempt_blocking`. Must be called inside the `except`."""
    if policy.max_attempts == 1:
        raise exc
    if n + 1 >= policy.max_attempts:
        raise RetriesExhausted(f"{what}: gave up after {policy.max_attempts} attempts; last "
                               f"error: {exc}") from exc
    if on_retry is not None:
        on_retry(exc)
    pause = policy.delay(n, rng)
    log.debug("%s failed (%s); retry %d in %.2fs", what, exc, n + 1, pause)
    return pause


async def attempt(policy: RetryPolicy, what: str, call: Callable[[], Awaitable[T]],
                  rng: random.Random | None = None,
                  on_retry: Callable[[BaseException], None] | None = None) -> T:
    """`await call()`, retried on `Retryable` per `policy`."""
    rng = rng or random
    for n in range(policy.max_attempts):
        try:
            return await call()
        except Retryable as exc:
            await asyncio.sleep(_pause_after(policy, what, n, exc, rng, on_retry))
    raise AssertionError("unreachable")


def attempt_blocking(policy: RetryPolicy, what: str, call: Callable[[], T],
                     rng: random.Random | None = None,
                     on_retry: Callable[[BaseException], None] | None = None,
                     sleep: Callable[[float], None] = time.sleep) -> T:
    """`call()` on a thread that may block (a FUSE handler, a registry upload): the same
    policy, backoff and final error as `attempt`."""
    rng = rng or random
    for n in range(policy.max_attempts):
        try:
            return call()
        except Retryable as exc:
            sleep(_pause_after(policy, what, n, exc, rng, on_retry))
    raise AssertionError("unreachable")


class RetryingSource(Source):
    """Retries `Retryable` failures of the wrapped source; anything else passes through."""

    def __init__(self, inner: Source, policy: RetryPolicy, rng: random.Random | None = None):
        self.inner = inner
        self.name = inner.name
        self.backend = inner.backend
        self.alignment = inner.alignment
        self.policy = policy
        self.retries = 0  # how many retries this source needed, for reports
        self._rng = rng or random.Random()

    def _count(self, _exc: BaseException) -> None:
        self.retries += 1

    async def size(self) -> int:
        return await attempt(self.policy, f"{self.name}: size", self.inner.size, self._rng,
                             self._count)

    async def read_into(self, offset: int, target: Target) -> None:
        what = f"{self.name}: bytes {offset}-{offset + target.nbytes - 1}"
        await attempt(self.policy, what, lambda: self.inner.read_into(offset, target),
                      self._rng, self._count)

    async def close(self) -> None:
        await self.inner.close()
