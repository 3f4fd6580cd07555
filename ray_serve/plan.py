"""Which bytes of an object each node fetches: pure functions, no I/O.

An object is cut into fixed-size *pieces*. With N participating nodes, piece i of an object is
owned by node `(i + offset) mod N`, where `offset` comes from a hash of the object's identity,
so the shares are disjoint, cover the object exactly, and different objects (shards) start on
different nodes. The owner reads its pieces from object storage; every other node asks the
owner for them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectId:
    """One version of one object: a changed object (size or ETag) is a different ObjectId."""

    bucket: str
    key: str
    size: int
    etag: str

    @property
    def name(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class Piece:
    index: int
    offset: int
    length: int


def pieces(size: int, piece_size: int) -> tuple[Piece, ...]:
    """The pieces of an object of `size` bytes, in order; the last one may be shorter."""
    if piece_size <= 0:
        raise ValueError(f"piece_size must be > 0, got {piece_size}")
    return tuple(Piece(i, off, min(piece_size, size - off))
                 for i, off in enumerate(range(0, size, piece_size)))


def pieces_in_range(offset: int, length: int, size: int, piece_size: int) -> range:
    """Indexes of the pieces that hold bytes [offset, offset + length) of the object."""
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"range {offset}+{length} is outside an object of {size} bytes")
    if length == 0:
        return range(0)
    return range(offset // piece_size, (offset + length - 1) // piece_size + 1)


def piece_key(obj: ObjectId, piece_size: int, index: int) -> str:
    """A stable name for one piece of one object version (what the cache index is keyed by)."""
    ident = f"{obj.bucket}\0{obj.key}\0{obj.size}\0{obj.etag}\0{piece_size}\0{index}"
    return hashlib.sha256(ident.encode()).hexdigest()


def owner(obj: ObjectId, index: int, nodes: tuple[str, ...]) -> str:
    """The node (from the sorted participant list `nodes`) that reads piece `index`."""
    if not nodes:
        raise ValueError("no participating nodes")
    start = int(hashlib.sha256(f"{obj.bucket}/{obj.key}".encode()).hexdigest()[:8], 16)
    return nodes[(start + index) % len(nodes)]


def share(obj: ObjectId, piece_size: int, nodes: tuple[str, ...], node: str) -> tuple[int, ...]:
    """The piece indexes `node` reads from object storage."""
    return tuple(p.index for p in pieces(obj.size, piece_size)
                 if owner(obj, p.index, nodes) == node)
