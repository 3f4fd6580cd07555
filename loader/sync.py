"""The loader's sync facade is warmstart.storage.sync (one I/O thread for every part)."""

from warmstart.storage.sync import iterate, loop, run

__all__ = ["iterate", "loop", "run"]
