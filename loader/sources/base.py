"""The loader's storage interface is warmstart.storage's: `Source`, `Target`, `in_thread`."""

from warmstart.storage.source import Source, Target, in_thread

__all__ = ["Source", "Target", "in_thread"]
