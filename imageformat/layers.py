"""Build the final file tree of an image: apply layer tars in order, or walk a rootfs folder.

A `Tree` holds metadata and, for regular files, their content: the chunks it was cut into
while the layer streamed past (`Node.chunks`), or for a rootfs folder where its bytes lie
(`Node.data`). Each layer tar is read once, front to back. Layers are applied as a container
runtime does: `.wh.NAME` deletes NAME from lower layers only (never what its own layer
holds), `.wh..wh..opq` hides everything the lower layers put in its directory, a later entry
replaces an earlier one, and hard links keep the content they had when they were made. Member
names are cleaned by `toc.clean_path`; absolute paths, `..`, escaping symlinks, dangling hard
links and whiteouts that name no entry (`.wh.`, `.wh..`) refuse the whole layer.
"""

from __future__ import annotations

import math
import os
import posixpath
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from warmstart.errors import ImageFormatError, UnsafeEntry

from .model import Chunk
from .toc import check_symlink, clean_path, path_key

Content = Callable[[BinaryIO, int], "tuple[Chunk, ...]"]  # (reader, size) -> the file's chunks

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


@dataclass
class Node:
    type: str
    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    target: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict = field(default_factory=dict)
    data: tuple[str, int] | None = None  # rootfs: (file holding the bytes, offset)
    chunks: tuple[Chunk, ...] | None = None  # layers: the content, cut while streaming


class Tree:
    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {".": Node("dir", 0o755)}
        self.children: dict[str, set[str]] = {".": set()}
        self.links: dict[str, set[str]] = {}  # hardlink target -> paths linking to it

    # --- queries --------------------------------------------------------------------
    def sorted_paths(self) -> list[str]:
        return sorted(self.nodes, key=path_key)

    def subtree(self, path: str) -> list[str]:
        out, stack = [], [path]
        while stack:
            p = stack.pop()
            out.append(p)
            stack.extend(self._join(p, c) for c in self.children.get(p, ()))
        return out

    @staticmethod
    def _join(parent: str, name: str) -> str:
        return name if parent == "." else f"{parent}/{name}"

    # --- edits ----------------------------------------------------------------------
    def remove(self, path: str) -> None:
        """Deletes `path` and everything below it, keeping hard links' content alive."""
        if path not in self.nodes or path == ".":
            return
        doomed = self.subtree(path)
        for p in doomed:
            node = self.nodes[p]
            if node.type == "hardlink":
                self.links.get(node.target, set()).discard(p)
        for p in doomed:
            self._promote_links(p, set(doomed))
        for p in reversed(doomed):
            self.nodes.pop(p, None)
            self.children.pop(p, None)
        parent = posixpath.dirname(path) or "."
        self.children[parent].discard(posixpath.basename(path))

    def _promote_links(self, path: str, doomed: set[str]) -> None:
        survivors = sorted(p for p in self.links.pop(path, ()) if p not in doomed)
        if not survivors:
            return
        heir, old = survivors[0], self.nodes[path]
        self.nodes[heir] = Node("reg", old.mode, old.uid, old.gid, old.mtime_ns, old.size,
                                xattrs=dict(old.xattrs), data=old.data, chunks=old.chunks)
        for p in survivors[1:]:
            self.nodes[p].target = heir
        if survivors[1:]:
            self.links[heir] = set(survivors[1:])

    def add(self, path: str, node: Node) -> None:
        if path == ".":
            if node.type != "dir":
                raise UnsafeEntry("layer entry for the root is not a directory")
            old = self.nodes["."]
            node.xattrs = node.xattrs or old.xattrs
            self.nodes["."] = node
            return
        parent = posixpath.dirname(path) or "."
        self._ensure_dir(parent, path)
        old = self.nodes.get(path)
        if old is not None and old.type == "dir" and node.type == "dir":
            self.nodes[path] = node
            return
        if old is not None:
            self.remove(path)
        if node.type == "hardlink":
            target = self.nodes.get(node.target)
            if target is not None and target.type == "hardlink":
                node.target = target.target
                target = self.nodes[node.target]
            if target is None or target.type != "reg":
                raise UnsafeEntry(f"hard link {path!r} -> {node.target!r}: target is not a "
                                  "regular file already in the image")
            self.links.setdefault(node.target, set()).add(path)
        self.nodes[path] = node
        self.children[parent].add(posixpath.basename(path))
        if node.type == "dir":
            self.children.setdefault(path, set())

    def _ensure_dir(self, path: str, child: str) -> None:
        missing = []  # a loop, not recursion: paths may have ~2000 components
        while (node := self.nodes.get(path)) is None:
            missing.append(path)
            child, path = path, posixpath.dirname(path) or "."
        if node.type != "dir":
            raise UnsafeEntry(f"entry {child!r}: parent {path!r} is a {node.type}, not a "
                              "directory")
        for p in reversed(missing):
            self.add(p, Node("dir", 0o755))

    def whiteout(self, path: str, keep: set[str]) -> None:
        """Deletes lower-layer `path`; what this layer put there (`keep`) stays."""
        if path not in keep:
            self.remove(path)
        elif self.nodes[path].type == "dir":
            self.opaque(path, keep)

    def opaque(self, path: str, keep: set[str]) -> None:
        """Hides lower-layer content under `path`; `keep` holds this layer's paths and their
        ancestors."""
        todo = [path]
        while todo:
            path = todo.pop()
            for name in sorted(self.children.get(path, ())):
                child = self._join(path, name)
                if child not in keep:
                    self.remove(child)
                elif self.nodes[child].type == "dir":
                    todo.append(child)


def _tar_node(m: tarfile.TarInfo, path: str) -> Node:
    xattrs = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
              for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    mtime = float(m.mtime)
    if not math.isfinite(mtime):  # a pax header may say "inf" or "nan"
        raise ImageFormatError(f"layer entry {path!r}: mtime {m.mtime!r} is not a time")
    common = dict(mode=m.mode & 0o7777, uid=m.uid, gid=m.gid,
                  mtime_ns=int(round(mtime * 1e9)), xattrs=xattrs)
    if m.issparse():
        raise ImageFormatError(f"layer entry {path!r}: sparse files are not supported")
    if m.isreg():
        return Node("reg", size=m.size, **common)
    if m.isdir():
        return Node("dir", **common)
    if m.issym():
        check_symlink(path, m.linkname, f"layer entry {path!r}")
        return Node("symlink", target=m.linkname, **common)
    if m.islnk():
        return Node("hardlink", target=clean_path(m.linkname, f"hard link {path!r}"), **common)
    if m.ischr() or m.isblk():
        return Node("char" if m.ischr() else "block", devmajor=m.devmajor,
                    devminor=m.devminor, **common)
    if m.isfifo():
        return Node("fifo", **common)
    raise ImageFormatError(f"layer entry {path!r}: unsupported tar type {m.type!r}")


def apply_layer(tree: Tree, tar: str | BinaryIO, content: Content | None = None,
                what: str | None = None) -> None:
    """Applies one uncompressed layer tar (a path or a stream) on top of `tree`, reading it
    once. `content(reader, size)` cuts each regular file into chunks as it passes; without
    it only the tree's shape is built (file nodes get no chunks)."""
    what = what or (tar if isinstance(tar, str) else "layer")
    try:
        if isinstance(tar, str):
            with open(tar, "rb") as f:
                _apply_tar(tree, f, content)
        else:
            _apply_tar(tree, tar, content)
    except tarfile.TarError as exc:  # a malformed archive (bad checksum, truncated data)
        raise ImageFormatError(f"{what}: not a readable tar ({exc})") from None


def _apply_tar(tree: Tree, f: BinaryIO, content: Content | None) -> None:
    keep: set[str] = set()
    with tarfile.open(fileobj=f, mode="r|", encoding="utf-8",
                      errors="surrogateescape") as tf:
        while (m := tf.next()) is not None:
            tf.members = []  # a stream: keep no list of every member
            path = clean_path(m.name, f"layer entry {m.name[:200]!r}")
            base = posixpath.basename(path)
            parent = posixpath.dirname(path) or "."
            if base == OPAQUE:
                if tree.nodes.get(parent, Node("reg", 0)).type == "dir":
                    tree.opaque(parent, keep)
                continue
            if base.startswith(WHITEOUT):
                name = base[len(WHITEOUT):]
                if name in ("", ".", ".."):
                    raise UnsafeEntry(f"layer entry {path!r}: whiteout names no entry")
                target = clean_path(f"{parent}/{name}", f"whiteout {path!r}")
                if target in tree.nodes:
                    tree.whiteout(target, keep)
                continue
            node = _tar_node(m, path)
            if node.type == "reg" and content is not None:
                reader = tf.extractfile(m)
                node.chunks = content(reader, m.size)  # type: ignore[arg-type]
            tree.add(path, node)
            p = path
            while p not in keep and p != ".":
                keep.add(p)
                p = posixpath.dirname(p) or "."


def tree_from_dir(root: str) -> Tree:
    """Reads a plain rootfs folder (no whiteout processing); sockets are skipped."""
    tree = Tree()
    first: dict[tuple[int, int], str] = {}
    st = os.lstat(root)
    tree.nodes["."] = _dir_node(root, st)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            path = clean_path(name if rel_dir == "." else f"{rel_dir}/{name}")
            st = os.lstat(full)
            common = dict(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                          mtime_ns=st.st_mtime_ns, xattrs=_xattrs(full))
            if stat.S_ISDIR(st.st_mode):
                node = Node("dir", **common)
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in first:
                    node = Node("hardlink", target=first[key], **common)
                else:
                    first[key] = path
                    node = Node("reg", size=st.st_size, data=(full, 0), **common)
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
                check_symlink(path, target, f"rootfs entry {path!r}")
                node = Node("symlink", target=target, **common)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                node = Node("char" if stat.S_ISCHR(st.st_mode) else "block",
                            devmajor=os.major(st.st_rdev), devminor=os.minor(st.st_rdev),
                            **common)
            elif stat.S_ISFIFO(st.st_mode):
                node = Node("fifo", **common)
            else:
                continue
            tree.add(path, node)
    return tree


def _dir_node(path: str, st: os.stat_result) -> Node:
    return Node("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                xattrs=_xattrs(path))


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
        return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}
    except OSError:
        return {}
