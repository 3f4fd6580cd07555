"""`SharingConfig`: how replicas share fetched bytes on a node and across the cluster."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping

from warmstart.errors import ConfigError
from warmstart.storage.units import parse_size

MiB = 1 << 20

MODES = ("cluster", "node", "off")


@dataclass(frozen=True)
class SharingConfig:
    """Options of the node gateway. Sizes are bytes; times are seconds."""

    mode: str = "cluster"
    """'cluster': each node reads a disjoint share of every s3:// object and gets the rest from
    peer nodes; 'node': replicas on a node share one read and one cache, no peers; 'off': each
    replica reads object storage itself."""
    cache_dir: str = "/tmp/warmstart-ray-{uid}/{node_id}"
    """Node-local folder the gateway lands checkpoints in (created 0700, files 0600);
    `{node_id}` is replaced by the Ray node id, `{uid}` by the user id."""
    cache_size: int = 64 << 30
    """Bytes the node cache may hold; least recently used checkpoint versions are evicted
    beyond it."""
    piece_size: int = 16 * MiB
    """Bytes per piece: the unit of sharing, caching and digest checks."""
    peer_timeout: float = 30.0
    """Seconds to wait for a piece from a peer before reading it from object storage."""
    node_resource: str = "CPU"
    """Only alive nodes with this resource (> 0) take part in 'cluster' mode."""
    prefetch: int = 4
    """Pieces a gateway lands in parallel (in file order), from object storage or peers."""
    s3_endpoint_url: str | None = None
    """The gateway's object storage endpoint; None: that of the `config=` passed to
    `load_in_replica`, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.piece_size < 4096 or self.piece_size % 4096:
            raise ConfigError(f"piece_size must be a multiple of 4096, got {self.piece_size}")
        if self.cache_size < self.piece_size:
            raise ConfigError("cache_size must hold at least one piece")
        if self.peer_timeout <= 0:
            raise ConfigError("peer_timeout must be > 0")
        if self.prefetch < 1:
            raise ConfigError("prefetch must be >= 1")
        if not self.cache_dir:
            raise ConfigError("cache_dir must not be empty")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> "SharingConfig":
        """From plain values (sizes may be '16MiB'); unknown keys raise ConfigError."""
        values = dict(mapping or {})
        unknown = sorted(k for k in values if k not in cls.keys())
        if unknown:
            raise ConfigError(f"unknown sharing option(s) {', '.join(map(repr, unknown))}; "
                              f"valid options are: {', '.join(cls.keys())}")
        for key in ("cache_size", "piece_size"):
            if isinstance(values.get(key), str):
                values[key] = parse_size(values[key], key)
        for key in ("peer_timeout",):
            if key in values:
                values[key] = float(values[key])
        if "prefetch" in values:
            values["prefetch"] = int(values["prefetch"])
        return cls(**values)

    def replace(self, **changes: Any) -> "SharingConfig":
        return dataclasses.replace(self, **changes)
