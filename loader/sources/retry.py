"""Per-read retries with jittered exponential backoff, as a wrapper around any source."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

from warmstart.errors import Retryable, RetriesExhausted
from warmstart.loader.sources.base import Source, Target

log = logging.getLogger("warmstart.loader")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base_delay: float = 0.1
    max_delay: float = 5.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """'Full jitter': uniform in [0, min(max_delay, base * 2**attempt)]."""
        return rng.uniform(0.0, min(self.max_delay, self.base_delay * (2 ** attempt)))


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

    async def _attempt(self, what: str, call):
        for attempt in range(self.policy.max_attempts):
            try:
                return await call()
            except Retryable as exc:
                if attempt + 1 >= self.policy.max_attempts:
                    raise RetriesExhausted(
                        f"{self.name}: {what}: gave up after {self.policy.max_attempts} "
                        f"attempts; last error: {exc}") from exc
                self.retries += 1
                pause = self.policy.delay(attempt, self._rng)
                log.debug("%s: %s failed (%s); retry %d in %.2fs", self.name, what, exc,
                          attempt + 1, pause)
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def size(self) -> int:
        return await self._attempt("size", self.inner.size)

    async def read_into(self, offset: int, target: Target) -> None:
        what = f"bytes {offset}-{offset + target.nbytes - 1}"
        await self._attempt(what, lambda: self.inner.read_into(offset, target))

    async def close(self) -> None:
        await self.inner.close()
