"""Parse sharded-checkpoint indexes (`model.safetensors.index.json`): pure, no I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from warmstart.errors import ShardIndexError

MAX_INDEX_BYTES = 64 * 1000 * 1000
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class ShardIndex:
    source: str
    weight_map: Mapping[str, str]  # tensor name -> shard file name (relative to the index)
    shards: tuple[str, ...]        # distinct shard names, in first-seen order
    metadata: Mapping[str, object] | None


def _pairs_no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ShardIndexError(f"key {key!r} is listed twice")
        out[key] = value
    return out


def check_shard_name(name: object, source: str) -> str:
    """Shard names are plain relative file names: no absolute paths, no '..', no backslashes."""
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise ShardIndexError(f"{source}: shard name must be a non-empty string, got {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape: no file has that name
        raise ShardIndexError(f"{source}: shard name {name!r} is not valid UTF-8") from None
    parts = name.split("/")
    if (name.startswith("/") or "\\" in name or "\x00" in name
            or any(p in ("", ".", "..") for p in parts)):
        raise ShardIndexError(f"{source}: shard name {name!r} must be a relative path inside "
                              f"the checkpoint (no '..', no absolute paths)")
    return name


def parse_index(raw: bytes, source: str) -> ShardIndex:
    if len(raw) > MAX_INDEX_BYTES:
        raise ShardIndexError(f"{source}: index of {len(raw)} bytes exceeds the cap of "
                              f"{MAX_INDEX_BYTES}")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_pairs_no_duplicates)
    except ShardIndexError as exc:
        raise ShardIndexError(f"{source}: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ShardIndexError(f"{source}: not valid UTF-8 JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise ShardIndexError(f"{source}: index must be an object with a 'weight_map' object")
    metadata = doc.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ShardIndexError(f"{source}: 'metadata' must be an object")
    weight_map: dict[str, str] = {}
    shards: dict[str, None] = {}
    for tensor, shard in doc["weight_map"].items():
        weight_map[tensor] = check_shard_name(shard, source)
        shards.setdefault(shard, None)
    if not weight_map:
        raise ShardIndexError(f"{source}: weight_map is empty")
    return ShardIndex(source=source, weight_map=MappingProxyType(weight_map),
                      shards=tuple(shards),
                      metadata=MappingProxyType(metadata) if metadata is not None else None)
