"""The node-local landing area: where a node's gateway puts verified pieces of a checkpoint.

Layout under `root` (created 0700; refused if it exists with other owner or wider mode):
  <version>/<name>           one file per object, created at its full size (sparse) and
                             filled piece by piece with positional writes; mode 0600
  <version>/.<name>.ready    one line per landed piece: "<index> <sha256 hex>", appended
                             after the piece's bytes were written
`<version>` names one version of a checkpoint (its objects' keys, sizes and ETags), so a
changed object is never served stale, and its files sit side by side as in object storage:
the loader reads the folder as a local checkpoint. Only the job's user (and root) can open
anything here: filesystem permissions are what keep other local users out.
Whole versions are evicted, least recently prepared first, beyond the size bound.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import threading

from warmstart.errors import AccessDenied, IntegrityError

DIR_MODE = 0o700
FILE_MODE = 0o600


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
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def piece_count(self) -> int:
        return max(-(-self.size // self.piece_size), 1)

    def piece_span(self, index: int) -> tuple[int, int]:
        start = index * self.piece_size
        return start, min(self.piece_size, self.size - start)

    def recorded(self) -> dict[int, str]:
        """Pieces a previous writer recorded as landed (not yet re-checked)."""
        out: dict[int, str] = {}
        with contextlib.suppress(FileNotFoundError):
            with open(self.ready_path) as f:
                for line in f:
                    index, _, digest = line.strip().partition(" ")
                    if index.isdigit() and len(digest) == 64:
                        out[int(index)] = digest
        return out

    def read(self, index: int) -> bytes:
        start, length = self.piece_span(index)
        data = os.pread(self._fd, length, start)
        if len(data) != length:
            raise IntegrityError(f"{self.path}: piece {index} is short ({len(data)} of "
                                 f"{length} bytes)")
        return data

    def check(self, index: int, digest: str) -> bool:
        return sha256(self.read(index)) == digest

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
        with self._lock:
            fd = os.open(self.ready_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                         | os.O_NOFOLLOW, FILE_MODE)
            try:
                os.write(fd, f"{index} {digest}\n".encode())
            finally:
                os.close(fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def version_name(objects: list[tuple[str, int, str]]) -> str:
    """A stable folder name for one version of a checkpoint: (name, size, etag) of each."""
    ident = "\0".join(f"{n}\0{s}\0{e}" for n, s, e in sorted(objects))
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def evict(root: str, keep: set[str], need: int, max_bytes: int) -> int:
    """Deletes whole version folders under `root`, least recently used first (mtime), except
    those in `keep`, until their bytes plus `need` fit in `max_bytes`; returns bytes freed.
    A reader that has a file open keeps reading it (unlinked files live until closed)."""
    versions = []
    for entry in os.scandir(root):
        if entry.is_dir(follow_symlinks=False):
            used = sum(os.stat(os.path.join(entry.path, f)).st_blocks * 512
                       for f in os.listdir(entry.path))
            versions.append((entry.stat().st_mtime, entry.name, entry.path, used))
    total = sum(v[3] for v in versions) + need
    freed = 0
    for _, name, path, used in sorted(versions):
        if total <= max_bytes:
            break
        if name in keep:
            continue
        shutil.rmtree(path, ignore_errors=True)
        total -= used
        freed += used
    return freed
