"""`warmstart image layer-store DIR`: the additional layer store podman and CRI-O read.

A read-only FUSE file system (pyfuse3) at DIR with the layout `layerstore.py` describes:

    DIR/<base64 reference>/<layer digest>/info   JSON layer record
                                         /blob   the registry's layer blob (ranged GETs)
                                         /diff   top layer: symlink to the lazy mount of the
                                                 whole warmstart image; below it: empty

An image is looked up the first time containers-storage asks for its directory (answers are
kept for `ttl` seconds, so a twin pushed later is seen). The top layer's lazy mount is a
`warmstart image mount` child process started at that first look-up, under `mounts_dir`,
reading chunks through the shared chunk cache with the mount's verification; it is unmounted
when the layer store stops. `blob` bytes are passed through from the registry and checked
against the layer digest when a reader has read the whole blob in order (EIO if not equal);
other read patterns are left to the reader's own digest check, as podman does on push.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
import trio

from warmstart.errors import WarmstartError

from .layerstore import LazyImage, decode_reference, layer_info

log = logging.getLogger("warmstart.imageformat.layerstore")

# not "ro": containers-storage tells the store it uses (and releases) a layer by creating
# a `use` file in the layer's folder and rmdir-ing the folder (`create`, `rmdir`); every other
# write is refused
OPTIONS = ("fsname=warmstart-layers", "subtype=warmstart", "nosuid", "nodev")
FOUND_TIMEOUT = 3600.0


@dataclass
class _Node:
    kind: str  # "root" | "ref" | "layer" | "diff" | "info" | "blob"
    name: bytes
    parent: int
    image: LazyImage | None = None
    digest: str = ""
    data: bytes = b""


class _BlobCheck:
    """Hashes a blob read from offset 0 in order; a gap ends the check."""

    def __init__(self) -> None:
        self.h, self.pos, self.lock = hashlib.sha256(), 0, threading.Lock()


class LayerStoreFS(pyfuse3.Operations):
    supports_dot_lookup = True

    def __init__(self, find: Callable[[str], LazyImage | None],
                 mount_top: Callable[[LazyImage], str],
                 read_blob: Callable[[LazyImage, str, int, int], bytes],
                 ttl: float = 30.0, threads: int = 8) -> None:
        super().__init__()
        self.find, self.mount_top, self.read_blob = find, mount_top, read_blob
        self.ttl = ttl
        self.limiter = trio.CapacityLimiter(threads)
        self.lock = threading.Lock()
        self.nodes: dict[int, _Node] = {pyfuse3.ROOT_INODE: _Node("root", b"", 1)}
        self.by_name: dict[tuple[int, bytes], int] = {}
        self.looked_up: dict[str, tuple[float, LazyImage | None]] = {}
        self.checks: dict[int, _BlobCheck] = {}
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.uses: dict[tuple[str, str], int] = {}  # (reference, layer) -> podman's uses
        self.now = time.monotonic

    # --- the tree -------------------------------------------------------------------
    def _child(self, parent: int, name: bytes, **kw) -> int:
        with self.lock:
            ino = self.by_name.get((parent, name))
            if ino is None:
                ino, self.next_ino = self.next_ino, self.next_ino + 1
                self.nodes[ino] = _Node(name=name, parent=parent, **kw)
                self.by_name[(parent, name)] = ino
            return ino

    def _image(self, reference: str) -> LazyImage | None:
        with self.lock:
            hit = self.looked_up.get(reference)
        if hit is not None and self.now() - hit[0] < self.ttl:
            return hit[1]
        image = self.find(reference)
        with self.lock:
            self.looked_up[reference] = (self.now(), image)
        return image

    def _resolve(self, parent: int, name: bytes) -> int | None:
        node = self.nodes.get(parent)
        if node is None:
            return None
        if node.kind == "root":
            try:
                reference = decode_reference(name)
            except WarmstartError:
                return None
            image = self._image(reference)
            return None if image is None else self._child(parent, name, kind="ref",
                                                          image=image)
        if node.kind == "ref":
            image = node.image
            if image is None or image.layer(name.decode(errors="replace")) is None:
                # the reference may have moved: look again once the answer is old
                image = self._image(image.reference) if image is not None else None
                if image is None or image.layer(name.decode(errors="replace")) is None:
                    return None
                node.image = image
            # the top's lazy mount first: if it cannot be made, no layer of the image is
            # claimed (podman must not take empty placeholders and then fetch the top)
            self.mount_top(image)
            return self._child(parent, name, kind="layer", image=image, digest=name.decode())
        if node.kind == "layer":
            image = node.image
            assert image is not None
            layer = image.layer(node.digest)
            assert layer is not None
            if name == b"info":
                return self._child(parent, name, kind="info", image=image, digest=node.digest,
                                   data=layer_info(image, layer))
            if name == b"blob":
                return self._child(parent, name, kind="blob", image=image, digest=node.digest)
            if name == b"diff":
                target = os.fsencode(self.mount_top(image)) if layer.top else b""
                return self._child(parent, name, kind="diff", image=image, digest=node.digest,
                                   data=target)
        return None

    def attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        n = self.nodes[ino]
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = FOUND_TIMEOUT
        a.st_uid = a.st_gid = 0
        if n.kind in ("root", "ref", "layer") or (n.kind == "diff" and not n.data):
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o555, 2
        elif n.kind == "diff":
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFLNK | 0o777, 1, len(n.data)
        else:
            size = len(n.data)
            if n.kind == "blob":
                assert n.image is not None
                layer = n.image.layer(n.digest)
                size = layer.size if layer is not None else 0
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o444, 1, size
        a.st_blksize = 1 << 17
        a.st_blocks = (a.st_size + 511) // 512
        return a

    # --- metadata -------------------------------------------------------------------
    async def lookup(self, parent_inode, name, ctx=None):
        if name == b".":
            return self.attrs(parent_inode)
        if name == b"..":
            return self.attrs(self.nodes[parent_inode].parent)
        ino = await trio.to_thread.run_sync(self._resolve_logged, parent_inode, name,
                                            limiter=self.limiter)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs(ino)

    def _resolve_logged(self, parent: int, name: bytes) -> int | None:
        try:
            return self._resolve(parent, name)
        except WarmstartError as exc:
            log.warning("%s: %s", name[:120], exc)
            return None

    async def getattr(self, inode, ctx=None):
        if inode not in self.nodes:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs(inode)

    async def readlink(self, inode, ctx):
        n = self.nodes[inode]
        if n.kind != "diff" or not n.data:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return n.data

    async def opendir(self, inode, ctx):
        n = self.nodes.get(inode)
        if n is None or n.kind in ("info", "blob") or (n.kind == "diff" and n.data):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        n = self.nodes[fh]
        if n.kind == "layer":  # the three entries of a layer are always there
            for name in (b"diff", b"info", b"blob"):
                await trio.to_thread.run_sync(self._resolve_logged, fh, name,
                                              limiter=self.limiter)
        with self.lock:
            kids = sorted((name, ino) for (p, name), ino in self.by_name.items() if p == fh)
        for i in range(start_id, len(kids)):
            if not pyfuse3.readdir_reply(token, kids[i][0], self.attrs(kids[i][1]), i + 1):
                break

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    # --- use / release notices ------------------------------------------------------
    def _count(self, layer_ino: int | None, delta: int) -> None:
        n = self.nodes.get(layer_ino) if layer_ino is not None else None
        if n is None or n.kind != "layer" or n.image is None:
            raise pyfuse3.FUSEError(errno.EROFS)
        key = (n.image.reference, n.digest)
        with self.lock:
            self.uses[key] = max(self.uses.get(key, 0) + delta, 0)
            count = self.uses[key]
        log.info("%s %s: %s (in use %d)", n.image.reference, n.digest,
                 "use" if delta > 0 else "release", count)

    async def create(self, parent_inode, name, mode, flags, ctx):
        """containers-storage says it uses a layer by creating `use` in the layer's folder,
        and that it stops by rmdir-ing the folder; a store that counts these answers ENOENT
        to both (anything else makes podman warn that the store does not collect garbage)."""
        if name != b"use":
            raise pyfuse3.FUSEError(errno.EROFS)
        self._count(parent_inode, +1)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def rmdir(self, parent_inode, name, ctx):
        with self.lock:
            ino = self.by_name.get((parent_inode, name))
        self._count(ino, -1)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    # --- data -----------------------------------------------------------------------
    async def open(self, inode, flags, ctx):
        n = self.nodes.get(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if n is None or n.kind not in ("info", "blob"):
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        n = self.nodes[fh]
        if n.kind == "info":
            return n.data[off:off + size]
        return await trio.to_thread.run_sync(self._read_blob, fh, off, size,
                                             limiter=self.limiter)

    def _read_blob(self, ino: int, off: int, size: int) -> bytes:
        n = self.nodes[ino]
        assert n.image is not None
        layer = n.image.layer(n.digest)
        assert layer is not None
        end = min(off + size, layer.size)
        if off >= end:
            return b""
        try:
            data = self.read_blob(n.image, n.digest, off, end - off)
        except WarmstartError as exc:
            log.error("EIO reading blob %s at %d: %s", n.digest, off, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        with self.lock:
            check = self.checks.setdefault(ino, _BlobCheck())
        with check.lock:
            if check.pos == off:
                check.h.update(data)
                check.pos = end
                if end == layer.size:
                    del self.checks[ino]
                    if "sha256:" + check.h.hexdigest() != n.digest:
                        log.error("EIO: blob %s of %s does not match its digest", n.digest,
                                  n.image.reference)
                        raise pyfuse3.FUSEError(errno.EIO)
        return data


def serve(fs: LayerStoreFS, mountpoint: str, on_exit: Callable[[], None]) -> None:
    """Mounts `fs` at `mountpoint` and serves until unmounted, SIGINT or SIGTERM."""
    options = set(OPTIONS)
    if os.geteuid() == 0:
        options.add("allow_other")
    pyfuse3.init(fs, mountpoint, options)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return
            nursery.start_soon(watch_signals)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    log.info("layer store serving at %s", mountpoint)
    try:
        trio.run(main)
    finally:
        try:
            pyfuse3.close(unmount=True)
        except Exception as exc:  # noqa: BLE001 - already unmounted from outside
            log.info("close: %s", exc)
        on_exit()


class TopMounts:
    """One lazy mount (a `warmstart image mount` child) per warmstart image, started once."""

    def __init__(self, mounts_dir: str, cache_dir: str, mount_args: tuple[str, ...]) -> None:
        self.dir, self.cache, self.args = mounts_dir, cache_dir, mount_args
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()

    def __call__(self, image: LazyImage) -> str:
        from .mount import spawn_mount
        mnt = os.path.join(self.dir, image.image_digest.split(":", 1)[1])
        with self.lock:
            if image.image_digest in self.procs and os.path.ismount(mnt):
                return mnt
            os.makedirs(mnt, exist_ok=True)
            with open(mnt + ".log", "ab") as err:
                self.procs[image.image_digest] = spawn_mount(
                    image.store_uri, image.image_digest, mnt, self.cache, *self.args,
                    stderr=err)
        return mnt

    def close(self) -> None:
        from .mount import unmount
        with self.lock:
            for digest, proc in sorted(self.procs.items()):
                unmount(os.path.join(self.dir, digest.split(":", 1)[1]), proc)
            self.procs.clear()


def run(args, options, mount_args: tuple[str, ...]) -> int:
    """`warmstart image layer-store` (see `cli.py` for the flags)."""
    from .layerstore import try_find_image
    from .registry import RegistryClient
    from .sources import parse_platform
    platform = parse_platform(args.platform)
    store = None
    if args.store:
        from .cli import _open
        store = _open(args.store, args)
    mounts_dir = args.mounts or os.path.join(os.path.abspath(args.cache) + "-mounts")
    os.makedirs(args.dir, exist_ok=True)
    tops = TopMounts(mounts_dir, args.cache, mount_args)
    clients: dict[str, RegistryClient] = {}
    clients_lock = threading.Lock()

    def read_blob(image: LazyImage, digest: str, off: int, length: int) -> bytes:
        with clients_lock:
            client = clients.get(image.host)
            if client is None:
                client = clients[image.host] = RegistryClient(image.host, options)
        return client.read_blob(image.repo, digest, off, length)

    fs = LayerStoreFS(lambda ref: try_find_image(ref, options, platform, store, args.store),
                      tops, read_blob, ttl=args.ttl)

    def on_exit() -> None:
        tops.close()
        for c in clients.values():
            c.close()
        if store is not None:
            store.close()
    serve(fs, args.dir, on_exit)
    return 0
