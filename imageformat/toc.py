"""Encode and parse the table of contents (TOC): pure functions, paranoid about input.

`parse_toc` accepts only what `encode_toc` can write: canonical entry order (parents before
children, no duplicates), normalized relative paths, link targets that stay inside the root,
file sizes equal to the sum of their chunks, and every field within its cap. Each failure
raises one named `ImageFormatError` subclass that names the entry.
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath

from warmstart.errors import (DuplicateEntry, FieldTooLarge, ImageFormatError, SizeMismatch,
                              UnsafeEntry, UnsupportedVersion)

from .model import (CHUNKER, ENTRY_TYPES, FORMAT_VERSION, MAX_CHUNK, MAX_ENTRIES,
                    MAX_FILE_SIZE, MAX_ID, MAX_NAME, MAX_PATH, MAX_TOC_BYTES, MAX_XATTR_NAME,
                    MAX_XATTR_VALUE, MAX_XATTRS, MT_TOC, TOC, Chunk, Chunking, Entry)

_HEX = frozenset("0123456789abcdef")
_ENTRY_KEYS = {"path", "type", "mode", "uid", "gid", "mtime_ns", "size", "chunks", "target",
               "devmajor", "devminor", "xattrs"}


def canonical_json(obj) -> bytes:
    """The one byte form of a document: sorted keys, no spaces, UTF-8."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError as exc:  # a name that came from undecodable bytes
        raise ImageFormatError(f"document holds text that is not valid UTF-8 "
                               f"({text[max(0, exc.start - 40):exc.end + 40]!r})") from None


def load_json(data: bytes, cap: int, what: str):
    """Parses untrusted JSON bytes with a size cap; any failure is an ImageFormatError."""
    if len(data) > cap:
        raise FieldTooLarge(f"{what}: {len(data)} bytes exceeds the cap of {cap}")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ImageFormatError(f"{what}: not valid UTF-8 JSON ({exc})") from None


def is_hex_digest(s: object) -> bool:
    return isinstance(s, str) and len(s) == 64 and set(s) <= _HEX


def path_key(path: str) -> tuple[str, ...]:
    """Sort key of TOC paths: by components, so a directory precedes everything under it."""
    return () if path == "." else tuple(path.split("/"))


def clean_path(name: str, where: str = "entry") -> str:
    """Normalizes a tar member name or relative path; refuses absolute paths and `..`."""
    if "\x00" in name:
        raise UnsafeEntry(f"{where}: path {name!r} contains NUL")
    if name.startswith("/"):
        raise UnsafeEntry(f"{where}: absolute path {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeEntry(f"{where}: path {name!r} contains '..'")
    path = "/".join(parts) or "."
    check_path(path, where)
    return path


def utf8_size(text: str, where: str) -> int:
    """Bytes of `text` in UTF-8; names that are not UTF-8 (undecodable bytes from a tar or a
    folder, lone surrogates from JSON escapes) cannot be written in a TOC (SPEC: UTF-8)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise UnsafeEntry(f"{where}: name {text[:200]!r} is not valid UTF-8") from None


def check_path(path: str, where: str = "entry") -> None:
    """Refuses anything that is not already a normalized relative path (or "." for root)."""
    if not isinstance(path, str) or not path:
        raise UnsafeEntry(f"{where}: path must be a non-empty string")
    if utf8_size(path, where) > MAX_PATH:
        raise FieldTooLarge(f"{where}: path longer than {MAX_PATH} bytes")
    if path == ".":
        return
    if "\x00" in path or path.startswith("/"):
        raise UnsafeEntry(f"{where}: path {path!r} is absolute or contains NUL")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise UnsafeEntry(f"{where}: path {path!r} is not normalized (empty, '.' or '..')")
        if len(part.encode("utf-8")) > MAX_NAME:
            raise FieldTooLarge(f"{where}: component of {path!r} longer than {MAX_NAME} bytes")


def check_symlink(path: str, target: str, where: str = "entry") -> None:
    """A symlink may not climb above the image root; absolute targets resolve from the root."""
    if not isinstance(target, str) or not target or "\x00" in target:
        raise UnsafeEntry(f"{where}: symlink {path!r} has an empty or NUL target")
    if utf8_size(target, where) > MAX_PATH:
        raise FieldTooLarge(f"{where}: symlink target of {path!r} longer than {MAX_PATH}")
    if target.startswith("/"):
        depth, parts = 0, target.split("/")
    else:
        parent = posixpath.dirname(path) if path != "." else ""
        depth = len(parent.split("/")) if parent else 0
        parts = target.split("/")
    for part in parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                raise UnsafeEntry(f"{where}: symlink {path!r} -> {target!r} escapes the root")
        elif part not in ("", "."):
            depth += 1


def entry_to_json(e: Entry) -> dict:
    out: dict = {"path": e.path, "type": e.type, "mode": e.mode, "uid": e.uid, "gid": e.gid,
                 "mtime_ns": e.mtime_ns}
    if e.type == "reg":
        out["size"] = e.size
        out["chunks"] = [[c.digest, c.size] for c in e.chunks]
    if e.type in ("symlink", "hardlink"):
        out["target"] = e.target
    if e.type in ("char", "block"):
        out["devmajor"], out["devminor"] = e.devmajor, e.devminor
    if e.xattrs:
        out["xattrs"] = {k: base64.b64encode(v).decode() for k, v in e.xattrs}
    return out


def encode_toc(toc: TOC) -> bytes:
    doc = {"mediaType": MT_TOC, "version": FORMAT_VERSION,
           "chunking": {"algorithm": toc.chunking.algorithm, "min": toc.chunking.min,
                        "avg": toc.chunking.avg, "max": toc.chunking.max},
           "entries": [entry_to_json(e) for e in toc.entries]}
    return canonical_json(doc)


def encode_checked_toc(toc: TOC) -> bytes:
    """`encode_toc`, refusing with the parser's own named error anything `parse_toc` would
    refuse (an xattr over its cap, an id out of range): an image is never written that no
    reader can open."""
    data = encode_toc(toc)
    parse_toc(data)
    return data


def _int(obj: dict, key: str, lo: int, hi: int, where: str, default: int | None = None) -> int:
    if key not in obj:
        if default is None:
            raise ImageFormatError(f"{where}: missing field {key!r}")
        return default
    v = obj[key]
    if not isinstance(v, int) or isinstance(v, bool):
        raise ImageFormatError(f"{where}: field {key!r} must be an integer")
    if not lo <= v <= hi:
        raise FieldTooLarge(f"{where}: field {key!r}={v} outside [{lo}, {hi}]")
    return v


def _chunking(obj: object) -> Chunking:
    if not isinstance(obj, dict) or set(obj) != {"algorithm", "min", "avg", "max"}:
        raise ImageFormatError("TOC: 'chunking' must have exactly algorithm/min/avg/max")
    if obj["algorithm"] != CHUNKER:
        raise UnsupportedVersion(f"TOC: unknown chunking algorithm {obj['algorithm']!r}")
    mn = _int(obj, "min", 1, MAX_CHUNK, "TOC chunking")
    avg = _int(obj, "avg", mn, MAX_CHUNK, "TOC chunking")
    mx = _int(obj, "max", avg, MAX_CHUNK, "TOC chunking")
    return Chunking(CHUNKER, mn, avg, mx)


def _xattrs(obj: object, where: str) -> tuple[tuple[str, bytes], ...]:
    if not isinstance(obj, dict) or len(obj) > MAX_XATTRS:
        raise FieldTooLarge(f"{where}: xattrs must be an object of at most {MAX_XATTRS} keys")
    out = []
    for k in sorted(obj):
        v = obj[k]
        if not k or utf8_size(k, where) > MAX_XATTR_NAME or "\x00" in k \
                or not isinstance(v, str):
            raise ImageFormatError(f"{where}: bad xattr {k[:64]!r}")
        if len(v) > (MAX_XATTR_VALUE * 4) // 3 + 4:
            raise FieldTooLarge(f"{where}: xattr {k!r} value over {MAX_XATTR_VALUE} bytes")
        try:
            out.append((k, base64.b64decode(v, validate=True)))
        except (binascii.Error, ValueError):
            raise ImageFormatError(f"{where}: xattr {k!r} is not base64") from None
    return tuple(out)


def _chunks(obj: object, size: int, max_chunk: int, where: str) -> tuple[Chunk, ...]:
    if not isinstance(obj, list):
        raise ImageFormatError(f"{where}: 'chunks' must be a list")
    out, total = [], 0
    for i, c in enumerate(obj):
        if (not isinstance(c, list) or len(c) != 2 or not is_hex_digest(c[0])
                or not isinstance(c[1], int) or isinstance(c[1], bool)):
            raise ImageFormatError(f"{where}: chunk {i} must be [sha256 hex, size]")
        if not 1 <= c[1] <= max_chunk:
            raise SizeMismatch(f"{where}: chunk {i} ({c[0][:16]}) has size {c[1]} outside "
                               f"[1, {max_chunk}]")
        total += c[1]
        out.append(Chunk(c[0], c[1]))
    if total != size:
        raise SizeMismatch(f"{where}: size {size} but its chunks add up to {total}")
    return tuple(out)


def _entry(obj: object, max_chunk: int, index: int) -> Entry:
    if not isinstance(obj, dict):
        raise ImageFormatError(f"TOC entry {index}: not an object")
    path = obj.get("path")
    where = f"TOC entry {index} ({path!r})" if isinstance(path, str) else f"TOC entry {index}"
    extra = set(obj) - _ENTRY_KEYS
    if extra:
        raise ImageFormatError(f"{where}: unknown fields {sorted(extra)}")
    check_path(path, where)
    kind = obj.get("type")
    if kind not in ENTRY_TYPES:
        raise ImageFormatError(f"{where}: unknown type {kind!r}")
    allowed = {"path", "type", "mode", "uid", "gid", "mtime_ns", "xattrs"}
    allowed |= {"reg": {"size", "chunks"}, "symlink": {"target"}, "hardlink": {"target"},
                "char": {"devmajor", "devminor"}, "block": {"devmajor", "devminor"}}.get(kind,
                                                                                       set())
    if set(obj) - allowed:
        raise ImageFormatError(f"{where}: fields {sorted(set(obj) - allowed)} not allowed "
                               f"for type {kind}")
    kw = dict(path=path, type=kind, mode=_int(obj, "mode", 0, 0o7777, where),
              uid=_int(obj, "uid", 0, MAX_ID, where), gid=_int(obj, "gid", 0, MAX_ID, where),
              mtime_ns=_int(obj, "mtime_ns", -(1 << 63), (1 << 63) - 1, where))
    if "xattrs" in obj:
        kw["xattrs"] = _xattrs(obj["xattrs"], where)
    if kind == "reg":
        kw["size"] = _int(obj, "size", 0, MAX_FILE_SIZE, where)
        kw["chunks"] = _chunks(obj.get("chunks"), kw["size"], max_chunk, where)
    elif kind == "symlink":
        check_symlink(path, obj.get("target"), where)
        kw["target"] = obj["target"]
    elif kind == "hardlink":
        target = obj.get("target")
        check_path(target, where + " hardlink target")
        kw["target"] = target
    elif kind in ("char", "block"):
        kw["devmajor"] = _int(obj, "devmajor", 0, MAX_ID, where)
        kw["devminor"] = _int(obj, "devminor", 0, MAX_ID, where)
    return Entry(**kw)


def check_tree(entries: tuple[Entry, ...] | list[Entry]) -> None:
    """Order, duplicates, parents and hardlink targets of a whole entry list."""
    if not entries or entries[0].path != "." or entries[0].type != "dir":
        raise ImageFormatError("TOC: the first entry must be the root directory '.'")
    kinds: dict[str, str] = {}
    prev: tuple[str, ...] | None = None
    for i, e in enumerate(entries):
        key = path_key(e.path)
        if prev is not None and key <= prev:
            raise DuplicateEntry(f"TOC entry {i} ({e.path!r}): duplicate or out of order")
        prev = key
        if e.path != ".":
            parent = posixpath.dirname(e.path) or "."
            if kinds.get(parent) != "dir":
                raise UnsafeEntry(f"TOC entry {i} ({e.path!r}): parent {parent!r} is not a "
                                  "directory listed before it")
        kinds[e.path] = e.type
    for i, e in enumerate(entries):
        if e.type == "hardlink" and kinds.get(e.target) != "reg":
            raise UnsafeEntry(f"TOC entry {i} ({e.path!r}): hardlink target {e.target!r} is "
                              "not a regular file in the image")


def parse_toc(data: bytes) -> TOC:
    """Parses and validates TOC bytes (already verified against their digest by the caller)."""
    doc = load_json(data, MAX_TOC_BYTES, "TOC")
    if not isinstance(doc, dict):
        raise ImageFormatError("TOC: top level must be an object")
    if set(doc) != {"mediaType", "version", "chunking", "entries"}:
        raise ImageFormatError(f"TOC: expected mediaType/version/chunking/entries, got "
                               f"{sorted(doc)[:8]}")
    if doc["mediaType"] != MT_TOC or doc["version"] != FORMAT_VERSION:
        raise UnsupportedVersion(f"TOC: unsupported mediaType/version {doc['mediaType']!r} "
                                 f"{doc['version']!r}")
    chunking = _chunking(doc["chunking"])
    raw = doc["entries"]
    if not isinstance(raw, list):
        raise ImageFormatError("TOC: 'entries' must be a list")
    if len(raw) > MAX_ENTRIES:
        raise FieldTooLarge(f"TOC: {len(raw)} entries exceeds the cap of {MAX_ENTRIES}")
    entries = tuple(_entry(obj, chunking.max, i) for i, obj in enumerate(raw))
    check_tree(entries)
    return TOC(entries, chunking)
