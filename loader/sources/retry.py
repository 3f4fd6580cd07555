"""Per-read retries: warmstart.storage's one policy, as a wrapper around any source."""

from warmstart.storage.retry import RetryingSource, RetryPolicy

__all__ = ["RetryingSource", "RetryPolicy"]
