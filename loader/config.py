"""Typed, validated loader configuration.

`LoaderConfig` is a frozen dataclass. `from_mapping` takes plain dicts (vLLM's
`model_loader_extra_config`, CLI options) and rejects unknown keys by name;
`from_env` reads the `WARMSTART_*` variables, once, in one place (docs/CONFIG.md lists them).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

from warmstart.errors import ConfigError
from warmstart.storage.units import parse_size  # noqa: F401 - the one size parser

MiB = 1 << 20
GiB = 1 << 30


DEFAULT_CHUNK = 16 * MiB
SLOT_MARGIN = 2 * 4096
"""Bytes a ring slot holds beyond its chunk: a chunk widened to 4 KiB on both ends."""


def auto_chunk_size(memory_budget: int) -> int:
    """The chunk size used when none is set: the default when two default chunks fit in
    `memory_budget`, else the largest multiple of 4 KiB that lets two slots (chunk plus
    margins) fit."""
    if memory_budget >= 2 * DEFAULT_CHUNK:
        return DEFAULT_CHUNK
    return max(4096, (memory_budget // 2 - SLOT_MARGIN) // 4096 * 4096)


def _parse_bool(value: Any, key: str) -> bool | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


@dataclass(frozen=True)
class LoaderConfig:
    """How the loader reads, stages and copies. Sizes are bytes."""

    chunk_size: int = 0
    """Bytes per read request and per ring slot. 0 (auto): 16 MiB, or less when
    `memory_budget` is too small for two such slots (two slots and their alignment margins
    then fill the budget). GPU loads of local files: from `gpu_defaults` (docs/CONFIG.md)."""
    memory_budget: int = 256 * MiB
    """Host memory the loader may use beyond the tensors it returns (ring slots)."""
    concurrency: int = 0
    """Reads in flight; 0 picks a default per backend (local 8, S3 16; GPU loads of local
    files: from `gpu_defaults`)."""
    direct_io: bool | None = None
    """Read local files with O_DIRECT, staged through the ring. None (auto): per file, only
    when most of it is not in the page cache (a cold read from disk)."""
    staged: bool = False
    """Force the host ring even for `device='cpu'` (normally reads land in place)."""
    mmap: bool | None = None
    """`device='cpu'`, local files only: map each file (private, copy-on-write) and hand out
    tensors that view the mapping, its pages made resident before a tensor is handed out; no
    copy at all. None (auto): when nearly all of every file is already in the page cache."""
    verify: bool = False
    """Check every block read against the shard's `.sums` sidecar (CRC32 per 1 MiB block,
    written by `warmstart sums`); a mismatch is re-read, then fails naming object and range."""
    group_size: int = 1 * GiB
    """Destination memory is allocated per group of consecutive tensors of about this size."""
    gap_size: int = 1 * MiB
    """With a `names` filter, unwanted bytes up to this size are read through, not skipped."""
    max_attempts: int = 5
    """Tries per chunk for transient storage errors (5xx, throttling, resets, short bodies)."""
    retry_base_delay: float = 0.1
    """Seconds; the n-th retry waits a random time up to min(max, base * 2**n)."""
    retry_max_delay: float = 5.0
    """Seconds; the cap on one backoff pause."""
    connect_timeout: float = 10.0
    """Seconds to open a connection to the storage endpoint."""
    read_timeout: float = 60.0
    """Seconds without progress on one request before it counts as a transient failure."""
    s3_endpoint_url: str | None = None
    """Overrides AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / the AWS default endpoint."""
    s3_region: str | None = None
    """Overrides AWS_DEFAULT_REGION / the profile's region."""
    s3_addressing_style: str = "auto"
    """'path', 'virtual' or 'auto' (path style when a custom endpoint is set)."""
    s3_data_path: str = "auto"
    """'raw' (SigV4-signed ranged GETs received with recv_into straight into the buffer),
    over http:// and https:// alike; 'botocore' (aiobotocore's streaming body, one more copy);
    'auto' is raw."""
    cuda_runtime: str | None = None
    """Path of the CUDA runtime library (libcudart) to load. Unset: the one already in the
    process (torch's), else pip's wheel or the system's, torch's CUDA major version first."""

    def __post_init__(self) -> None:
        # The budget is the user's promise, the chunk size ours: an unset chunk size shrinks
        # to fit; an explicit one that cannot fit is an error naming both (validate).
        auto = self.chunk_size == 0
        object.__setattr__(self, "_auto_chunk", auto)
        if auto:
            object.__setattr__(self, "chunk_size", auto_chunk_size(self.memory_budget))
        self.validate()

    def validate(self) -> None:
        if self.chunk_size < 4096 or self.chunk_size % 4096:
            raise ConfigError(f"chunk_size must be a multiple of 4096 bytes, got "
                              f"{self.chunk_size}")
        if self.memory_budget < 2 * self.chunk_size:
            if getattr(self, "_auto_chunk", False):
                raise ConfigError(f"memory_budget ({self.memory_budget} bytes) is too small: "
                                  f"it must hold two chunks of at least 4 KiB (8192 bytes)")
            raise ConfigError(
                f"memory_budget ({self.memory_budget}) must hold at least two chunks of "
                f"chunk_size ({self.chunk_size}); lower chunk_size or leave it unset to "
                f"have it derived from the budget")
        if self.concurrency < 0 or self.concurrency > 1024:
            raise ConfigError(f"concurrency must be 0 (auto) or 1..1024, got {self.concurrency}")
        if self.group_size < self.chunk_size:
            raise ConfigError("group_size must be at least chunk_size")
        if self.gap_size < 0:
            raise ConfigError("gap_size must be >= 0")
        if self.max_attempts < 1:
            raise ConfigError("max_attempts must be >= 1")
        for key in ("retry_base_delay", "retry_max_delay", "connect_timeout", "read_timeout"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be > 0")
        if self.s3_addressing_style not in {"auto", "path", "virtual"}:
            raise ConfigError("s3_addressing_style must be 'auto', 'path' or 'virtual'")
        if self.s3_data_path not in {"auto", "raw", "botocore"}:
            raise ConfigError("s3_data_path must be 'auto', 'raw' or 'botocore'")

    def read_concurrency(self, backend: str) -> int:
        return self.concurrency or {"local": 8, "s3": 16}.get(backend, 8)

    def replace(self, **changes: Any) -> "LoaderConfig":
        values = dataclasses.asdict(self)
        if getattr(self, "_auto_chunk", False):
            values["chunk_size"] = 0  # still derived from whatever the budget becomes
        return self.from_mapping({**values, **changes})

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> "LoaderConfig":
        """Builds a config from plain values; unknown keys raise ConfigError naming them."""
        mapping = dict(mapping or {})
        valid = cls.keys()
        unknown = sorted(k for k in mapping if k not in valid)
        if unknown:
            raise ConfigError(
                f"unknown warmstart option(s) {', '.join(map(repr, unknown))}; "
                f"valid options are: {', '.join(valid)}")
        kwargs: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}
        for key, value in mapping.items():
            kind = types[key]
            try:
                if key in {"chunk_size", "memory_budget", "group_size", "gap_size"}:
                    kwargs[key] = parse_size(value, key)
                elif kind in {"bool", "bool | None"}:
                    kwargs[key] = _parse_bool(value, key)
                    if kwargs[key] is None and kind == "bool":
                        raise ConfigError(f"{key}: expected true or false, got {value!r}")
                elif kind == "int":
                    if isinstance(value, bool):
                        raise ValueError(value)
                    kwargs[key] = int(value)
                elif kind == "float":
                    kwargs[key] = float(value)
                else:
                    kwargs[key] = None if value is None else str(value)
            except (TypeError, ValueError) as exc:
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(f"{key}: invalid value {value!r} ({kind} expected)") from None
        return cls(**kwargs)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 **overrides: Any) -> "LoaderConfig":
        """Reads WARMSTART_<KEY> for every field (e.g. WARMSTART_CHUNK_SIZE=8MiB)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for key in cls.keys():
            env_key = "WARMSTART_" + key.upper()
            if env_key in environ:
                values[key] = environ[env_key]
        values.update(overrides)
        return cls.from_mapping(values)
