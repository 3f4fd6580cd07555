"""The node-local landing area: where a node's gateway puts verified pieces of a checkpoint.

Layout under `root` (created 0700; refused if it is not this user's own folder):
  objects/<object>           one file per object version (bucket, key, size, ETag), created
                             at its full size (sparse) and filled piece by piece with
                             positional writes; mode 0600
  objects/.<object>.ready    one line per landed piece: "<index> <sha256 hex>", appended
                             after the piece's bytes were written
  <version>/<name>           hard links to the objects of one version of a checkpoint, named
                             as in object storage: the loader reads the folder as a local
                             checkpoint, and a changed object is a new file, never stale bytes
A peer may ask for pieces of an object before this node's own replica has named its
checkpoint; those land in objects/ and are linked in when the replica asks. Only the job's user (and root) can open
anything here: filesystem permissions are what keep other local users out.
Several processes of a node may land pieces of one file at once (the gateway, and replicas
that land on a node whose gateway is still starting): a lander holds a piece's bytes with an
open-file-description lock (`claim`) while it fetches, writes and records the piece, and
reads the record again once it holds it, so each piece is fetched once per node. The kernel
drops the lock of a process that dies.
Whole versions are evicted, least recently prepared first, beyond the size bound.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import shutil
import stat
import struct
import threading

from warmstart.errors import AccessDenied, IntegrityError

OBJECTS = "objects"
DIR_MODE = 0o700
FILE_MODE = 0o600
# struct flock (Linux, 64-bit): l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
_FLOCK = "hhqqi4x"


def sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def private_dir(path: str) -> str:
    """Creates `path` (and missing parents) 0700; an existing one must be a real folder owned
    by this user with no group/other access, else AccessDenied names it."""
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise AccessDenied(errno.EACCES, f"{path}: node cache folder is not a folder")
    if st.st_uid != os.getuid():
        raise AccessDenied(errno.EACCES, f"{path}: node cache folder belongs to uid "
                                         f"{st.st_uid}, not to this user ({os.getuid()})")
    if st.st_mode & 0o077:
        os.chmod(path, DIR_MODE)  # ours, but made wider (umask, an old version): close it
    return path


class LandedFile:
    """One object's file in a version folder: positional writes and the ready record."""

    def __init__(self, path: str, size: int, piece_size: int) -> None:
        self.path = path
        self.size = size
        self.piece_size = piece_size
        self.ready_path = os.path.join(os.path.dirname(path), "." + os.path.basename(path)
                                       + ".ready")
        self._lock = threading.Lock()
        self._record_offset = 0  # bytes of the record already parsed by `recorded`
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        # a shared mapping: object storage reads land straight in the page cache, no copy
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED) if size else None

    def piece_count(self) -> int:
        return max(-(-self.size // self.piece_size), 1)

    def piece_span(self, index: int) -> tuple[int, int]:
        start = index * self.piece_size
        return start, min(self.piece_size, self.size - start)

    def recorded(self, new_only: bool = False) -> dict[int, str]:
        """Pieces recorded as landed (not re-checked here): all of them, or with `new_only`
        those recorded since the last call (by this or another process of the node)."""
        out: dict[int, str] = {}
        with self._lock:
            start = self._record_offset if new_only else 0
            with contextlib.suppress(FileNotFoundError):
                with open(self.ready_path, "rb") as f:
                    f.seek(start)
                    data = f.read()
                    whole = data[:data.rfind(b"\n") + 1]  # a line being appended: next time
                    self._record_offset = start + len(whole)
                    for line in whole.decode("ascii", "replace").splitlines():
                        index, _, digest = line.strip().partition(" ")
                        if index.isdigit() and len(digest) == 64:
                            out[int(index)] = digest
        return out

    @contextlib.contextmanager
    def claim(self, index: int):
        """Holds piece `index` against the node's other processes while it is landed: an
        open-file-description write lock on the piece's bytes (waits while another process
        holds it). Threads of one process share the lock; they coordinate in memory."""
        start, length = self.piece_span(index)
        if length <= 0 or self._fd < 0:
            yield
            return
        fcntl.fcntl(self._fd, fcntl.F_OFD_SETLKW,
                    struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, start, length, 0))
        try:
            yield
        finally:
            if self._fd >= 0:
                fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK,
                            struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, start, length, 0))

    def read(self, index: int):
        """Piece `index` as a uint8 numpy array (one copy out of the page cache): Ray puts
        an array into its object store as a raw buffer, and a reader on another node gets
        it back as a view of its own store, where bytes would be pickled and unpickled."""
        import numpy as np

        start, length = self.piece_span(index)
        data = np.empty(length, dtype=np.uint8)
        got = os.preadv(self._fd, [data], start) if length else 0
        if got != length:
            raise IntegrityError(f"{self.path}: piece {index} is short ({got} of "
                                 f"{length} bytes)")
        return data

    def check(self, index: int, digest: str) -> bool:
        return self.digest(index) == digest

    def span(self, index: int) -> memoryview:
        """Piece `index` as a writable view of the mapped file (release it when done)."""
        start, length = self.piece_span(index)
        if self._map is None:
            return memoryview(bytearray(0))
        return memoryview(self._map)[start:start + length]

    def digest(self, index: int) -> str:
        with self.span(index) as view:
            return sha256(view)

    def record(self, index: int, digest: str) -> None:
        """Notes piece `index` (whose bytes are in the file, checked against `digest`)."""
        with self._lock:
            fd = os.open(self.ready_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                         | os.O_NOFOLLOW, FILE_MODE)
            try:
                os.write(fd, f"{index} {digest}\n".encode())
            finally:
                os.close(fd)

    def write(self, index: int, data, digest: str) -> None:
        """Writes piece `index` (already verified against `digest`) and records it."""
        start, length = self.piece_span(index)
        if len(data) != length:
            raise IntegrityError(f"{self.path}: piece {index} has {len(data)} bytes, "
                                 f"expected {length}")
        view = memoryview(data)
        done = 0
        while done < length:
            done += os.pwrite(self._fd, view[done:], start + done)
        self.record(index, digest)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def object_name(obj) -> str:
    """The file name of one object version (a `plan.ObjectId`)."""
    ident = f"{obj.bucket}\0{obj.key}\0{obj.size}\0{obj.etag}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def link(existing: str, path: str) -> None:
    """`path` becomes a hard link to `existing` (kept when it already is one)."""
    for _ in range(3):  # another process of the node may link it at the same time
        with contextlib.suppress(FileNotFoundError):
            if os.path.samefile(existing, path):
                return
            os.unlink(path)
        with contextlib.suppress(FileExistsError, FileNotFoundError):
            os.link(existing, path)
            return
    if not os.path.samefile(existing, path):
        raise AccessDenied(errno.EEXIST, f"{path}: could not link the node copy {existing}")


def version_name(objects: list[tuple[str, int, str]]) -> str:
    """A stable folder name for one version of a checkpoint: (name, size, etag) of each."""
    ident = "\0".join(f"{n}\0{s}\0{e}" for n, s, e in sorted(objects))
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def evict(root: str, keep: set[str], need: int, max_bytes: int) -> int:
    """Frees room for `need` more bytes within `max_bytes`: deletes whole version folders,
    least recently used first (mtime), then every object file no version links to any more,
    except the objects named in `keep`; returns bytes freed. A reader that has a file open
    keeps reading it (an unlinked file lives until it is closed)."""
    objects = os.path.join(root, OBJECTS)

    def used() -> int:
        with contextlib.suppress(FileNotFoundError):
            return sum(e.stat().st_blocks * 512 for e in os.scandir(objects)
                       if not e.name.startswith("."))
        return 0
    before = total = used()
    if total + need <= max_bytes:
        return 0
    versions = sorted((e.stat().st_mtime, e.path) for e in os.scandir(root)
                      if e.is_dir(follow_symlinks=False) and e.name != OBJECTS)
    for _, path in versions:
        if total + need <= max_bytes:
            break
        names = set(os.listdir(path))
        if any(_same_as_kept(os.path.join(path, n), objects, keep) for n in names):
            continue
        shutil.rmtree(path, ignore_errors=True)
        for entry in os.scandir(objects):
            if not entry.name.startswith(".") and entry.name not in keep and \
                    entry.stat().st_nlink == 1:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    os.unlink(os.path.join(objects, "." + entry.name + ".ready"))
        total = used()
    return before - total


def _same_as_kept(path: str, objects: str, keep: set[str]) -> bool:
    for name in keep:
        with contextlib.suppress(FileNotFoundError):
            if os.path.samefile(path, os.path.join(objects, name)):
                return True
    return False
