"""Ranged HTTP GETs received straight into a caller's buffer.

The data path for S3 over plain HTTP: botocore signs (SigV4 headers), and a worker thread sends
`GET` with a `Range` header on a pooled keep-alive socket and receives the body with
`recv_into` directly into the target (one copy, kernel to destination; measured here at
several times aiobotocore's own body reads). Blocking sockets with kernel receive timeouts:
a stall longer than `read_timeout` without progress is a transient failure.
"""

from __future__ import annotations

import errno
import re
import socket
import struct
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import urlsplit

from warmstart.errors import AccessDenied, NotFound, Retryable, SourceError, WarmstartError
from warmstart.loader.sources.base import Target

MAX_HEAD_BYTES = 64 * 1024
MAX_ERROR_BODY = 64 * 1024
_CONTENT_RANGE = re.compile(rb"bytes (\d+)-(\d+)/(\d+|\*)")
NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                "InvalidToken", "AllAccessDisabled", "403", "RequestTimeTooSkewed"}
RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
               "InternalError", "ServiceUnavailable", "RequestLimitExceeded"}


@dataclass(frozen=True)
class Url:
    host: str
    port: int
    netloc: str
    target: str  # path + query, as sent on the request line

    @classmethod
    def parse(cls, url: str) -> "Url":
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"raw data path needs an http:// URL, got {url[:80]!r}")
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        return cls(parts.hostname, parts.port or 80, parts.netloc, target)


def error_for_status(status: int, body: bytes, what: str) -> SourceError:
    """Maps an HTTP error answer (with an S3 XML body when there is one) to our exceptions."""
    code = message = ""
    try:
        root = ET.fromstring(body) if body.strip() else None
        if root is not None:
            code = root.findtext("Code") or ""
            message = root.findtext("Message") or ""
    except ET.ParseError:
        pass
    detail = f"HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    if code in NOT_FOUND_CODES or (not code and status == 404):
        return NotFound(errno.ENOENT, f"{what}: not found ({detail})")
    if code in DENIED_CODES or (not code and status in (401, 403)):
        return AccessDenied(errno.EACCES, f"{what}: access denied ({detail})")
    if status >= 500 or status == 429 or code in RETRY_CODES:
        return Retryable(errno.EAGAIN, f"{what}: transient server error ({detail})")
    return SourceError(errno.EIO, f"{what}: request failed ({detail})")


class ConnectionPool:
    """Idle keep-alive sockets per (host, port); thread-safe."""

    def __init__(self, connect_timeout: float, read_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[tuple[str, int], list[socket.socket]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self, host: str, port: int, fresh: bool) -> tuple[socket.socket, bool]:
        """Returns (socket, reused)."""
        if not fresh:
            with self._lock:
                idle = self._idle.get((host, port))
                if idle:
                    return idle.pop(), True
        sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        sock.settimeout(None)  # blocking: MSG_WAITALL then fills a whole range in one call
        tv = struct.pack("ll", int(self.read_timeout), int((self.read_timeout % 1) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, False

    def release(self, host: str, port: int, sock: socket.socket) -> None:
        with self._lock:
            if not self._closed:
                self._idle.setdefault((host, port), []).append(sock)
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for socks in idle.values():
            for sock in socks:
                sock.close()


def _read_head(sock: socket.socket) -> tuple[int, dict[bytes, bytes], bytes]:
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD_BYTES:
            raise Retryable(errno.EPROTO, "response headers too large")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "connection closed before headers")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise Retryable(errno.EPROTO, f"bad HTTP status line {lines[0][:80]!r}")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers, rest


def _recv_exact(sock: socket.socket, view: memoryview, what: str) -> None:
    pos = 0
    while pos < len(view):
        try:
            got = sock.recv_into(view[pos:], len(view) - pos, socket.MSG_WAITALL)
        except (BlockingIOError, TimeoutError) as exc:
            raise Retryable(errno.ETIMEDOUT, f"{what}: no data for the read timeout after "
                                             f"{pos} of {len(view)} bytes") from exc
        if got == 0:
            raise Retryable(errno.EPIPE, f"{what}: body ended after {pos} of {len(view)} "
                                         f"bytes")
        pos += got


def ranged_get_into(pool: ConnectionPool, url: Url, offset: int, target: Target,
                    what: str, headers: dict[str, str] | None = None) -> None:
    """GETs bytes [offset, offset + target.nbytes) of `url` into `target` (blocking)."""
    n = target.nbytes
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()
                    if k.lower() not in {"host", "range"})
    # the Host a signature covered, when the caller signed one
    host = next((v for k, v in (headers or {}).items() if k.lower() == "host"), url.netloc)
    request = (f"GET {url.target} HTTP/1.1\r\nHost: {host}\r\n"
               f"Range: bytes={offset}-{offset + n - 1}\r\n{extra}"
               f"Accept-Encoding: identity\r\nUser-Agent: warmstart\r\n\r\n").encode()
    for fresh in (False, True):
        try:
            sock, reused = pool.acquire(url.host, url.port, fresh)
        except OSError as exc:
            raise Retryable(errno.ECONNREFUSED,
                            f"{what}: cannot connect to {url.netloc}: {exc}") from exc
        keep = False
        try:
            try:
                sock.sendall(request)
                status, headers, rest = _read_head(sock)
            except WarmstartError:
                raise
            except OSError as exc:
                # The server closed an idle connection: try a fresh one at once. A timeout is
                # a slow server, not a stale socket; it counts as this attempt's failure.
                if reused and not isinstance(exc, (TimeoutError, BlockingIOError)):
                    continue
                raise Retryable(exc.errno or errno.ECONNRESET, f"{what}: {exc}") from exc
            keep = _receive(sock, status, headers, rest, offset, target, what)
            return
        except WarmstartError:
            raise
        except OSError as exc:  # resets, timeouts, unreachable networks mid-request
            raise Retryable(exc.errno or errno.ECONNRESET,
                            f"{what}: connection failed mid-body: {exc}") from exc
        finally:
            if keep:
                pool.release(url.host, url.port, sock)
            else:
                sock.close()
    raise AssertionError("unreachable")


def _receive(sock, status, headers, rest, offset, target: Target, what: str) -> bool:
    """Receives the body; returns whether the connection may be reused."""
    n = target.nbytes
    try:
        length = int(headers.get(b"content-length", b"-1"))
    except ValueError:
        raise Retryable(errno.EPROTO, f"{what}: malformed Content-Length "
                                      f"{headers.get(b'content-length')!r}") from None
    if status not in (200, 206):
        body = rest
        try:  # whatever of the error body arrives; its status is the answer either way
            while 0 <= length <= MAX_ERROR_BODY and len(body) < length:
                more = sock.recv(length - len(body))
                if not more:
                    break
                body += more
        except OSError:
            pass
        raise error_for_status(status, body, what)
    if b"transfer-encoding" in headers:  # permanent: retrying gets the same answer
        raise SourceError(errno.EPROTO, f"{what}: chunked responses are not supported")
    if status == 206:
        match = _CONTENT_RANGE.fullmatch(headers.get(b"content-range", b""))
        if not match or (int(match[1]), int(match[2])) != (offset, offset + n - 1):
            raise Retryable(errno.EPROTO, f"{what}: server answered Content-Range "
                                          f"{headers.get(b'content-range')!r}")
    elif offset != 0:  # a plain 200 is only right when the range was the whole object
        raise SourceError(errno.EPROTO, f"{what}: server ignored the Range header")
    if length != n:
        raise Retryable(errno.EPROTO, f"{what}: Content-Length {length}, expected {n}")
    head = min(len(rest), n)
    target.view[:head] = rest[:head]
    if len(rest) > n:
        return False  # more bytes than promised: do not trust this connection again
    _recv_exact(sock, target.view[head:], what)
    return headers.get(b"connection", b"").lower() != b"close"
