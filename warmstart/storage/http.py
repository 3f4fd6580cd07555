"""The one ranged-read data path: `GET` with a `Range` header, received straight into the
caller's buffer, over `http://` and `https://` alike.

A worker thread sends the request on a pooled keep-alive connection and receives the body with
`recv_into` directly into the target: one copy, kernel (or, over TLS, OpenSSL's decryption) to
destination. Over TLS the stdlib `ssl` module decrypts into the buffer the same way, with SNI,
certificate and host-name verification on (the CA from `AWS_CA_BUNDLE` when set). Plain HTTP
uses blocking sockets with kernel receive timeouts (`MSG_WAITALL` fills a whole range in one
call); TLS sockets use a socket timeout, since OpenSSL would retry a kernel timeout forever.
Either way, `read_timeout` seconds without progress is a transient failure. Redirects are
refused: a signed request names one host, and following one would send it elsewhere.
"""

from __future__ import annotations

import errno
import re
import socket
import ssl
import struct
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from warmstart.errors import Retryable, SourceError, WarmstartError
from warmstart.storage.errors import error_for_body
from warmstart.storage.source import Target

MAX_HEAD_BYTES = 64 * 1024
MAX_ERROR_BODY = 64 * 1024
_CONTENT_RANGE = re.compile(rb"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class Url:
    scheme: str
    host: str
    port: int
    netloc: str
    target: str  # path + query, as sent on the request line

    @classmethod
    def parse(cls, url: str) -> "Url":
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SourceError(errno.EINVAL, f"not an http(s):// URL: {url[:80]!r}")
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.netloc, target)

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.target.split('?', 1)[0]}"


def tls_context(ca_bundle: str | None = None, verify: bool = True) -> ssl.SSLContext:
    """Verification on by default; `ca_bundle` (AWS_CA_BUNDLE) replaces the system CAs."""
    try:
        ctx = ssl.create_default_context(cafile=ca_bundle or None)
    except (OSError, ssl.SSLError) as exc:
        raise SourceError(errno.EINVAL, f"cannot read the CA bundle {ca_bundle!r}: {exc}") \
            from None
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class ConnectionPool:
    """Idle keep-alive connections per (scheme, host, port); thread-safe."""

    def __init__(self, connect_timeout: float, read_timeout: float,
                 tls: ssl.SSLContext | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._tls = tls
        self._idle: dict[tuple[str, str, int], list[socket.socket]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def tls_context(self) -> ssl.SSLContext:
        with self._lock:
            if self._tls is None:
                self._tls = tls_context()
            return self._tls

    def acquire(self, url: Url, fresh: bool) -> tuple[socket.socket, bool]:
        """Returns (connection, reused)."""
        key = (url.scheme, url.host, url.port)
        if not fresh:
            with self._lock:
                idle = self._idle.get(key)
                if idle:
                    return idle.pop(), True
        sock = socket.create_connection((url.host, url.port), timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if url.tls:
                sock = self.tls_context().wrap_socket(sock, server_hostname=url.host)
                sock.settimeout(self.read_timeout)  # OpenSSL retries kernel timeouts forever
            else:
                sock.settimeout(None)  # blocking: MSG_WAITALL fills a whole range in one call
                tv = struct.pack("ll", int(self.read_timeout),
                                 int((self.read_timeout % 1) * 1e6))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        except BaseException:
            sock.close()
            raise
        return sock, False

    def release(self, url: Url, sock: socket.socket) -> None:
        with self._lock:
            if not self._closed:
                self._idle.setdefault((url.scheme, url.host, url.port), []).append(sock)
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
    pos, n = 0, len(view)
    tls = isinstance(sock, ssl.SSLSocket)
    while pos < n:
        try:
            if tls:  # one TLS record (<= 16 KiB) per call, decrypted into the buffer
                got = sock.recv_into(view[pos:], n - pos)
            else:
                got = sock.recv_into(view[pos:], n - pos, socket.MSG_WAITALL)
        except (BlockingIOError, TimeoutError, ssl.SSLWantReadError) as exc:
            raise Retryable(errno.ETIMEDOUT, f"{what}: no data for the read timeout after "
                                             f"{pos} of {n} bytes") from exc
        if got == 0:
            raise Retryable(errno.EPIPE, f"{what}: body ended after {pos} of {n} bytes")
        pos += got


def _request(url: Url, offset: int, n: int, headers: dict[str, str] | None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()
                    if k.lower() not in {"host", "range"})
    # the Host a signature covered, when the caller signed one
    host = next((v for k, v in (headers or {}).items() if k.lower() == "host"), url.netloc)
    return (f"GET {url.target} HTTP/1.1\r\nHost: {host}\r\n"
            f"Range: bytes={offset}-{offset + n - 1}\r\n{extra}"
            f"Accept-Encoding: identity\r\nUser-Agent: warmstart\r\n\r\n").encode()


def ranged_get_into(pool: ConnectionPool, url: Url, offset: int, target: Target,
                    what: str, headers: dict[str, str] | None = None,
                    total: list[int] | None = None) -> dict[bytes, bytes]:
    """GETs bytes [offset, offset + target.nbytes) of `url` into `target` (blocking).
    Returns the response headers; when `total` is given, the object size from Content-Range
    (or Content-Length of a whole-object 200) is appended to it."""
    request = _request(url, offset, target.nbytes, headers)
    for fresh in (False, True):
        try:
            sock, reused = pool.acquire(url, fresh)
        except ssl.SSLCertVerificationError as exc:  # permanent: a wrong CA stays wrong
            raise SourceError(errno.EPROTO, f"{what}: TLS certificate of {url.netloc} not "
                                            f"trusted ({exc.verify_message}; set "
                                            f"AWS_CA_BUNDLE to its CA)") from None
        except OSError as exc:
            raise Retryable(errno.ECONNREFUSED,
                            f"{what}: cannot connect to {url.netloc}: {exc}") from exc
        keep = False
        try:
            try:
                sock.sendall(request)
                status, answer, rest = _read_head(sock)
            except WarmstartError:
                raise
            except OSError as exc:
                # The server closed an idle connection: try a fresh one at once. A timeout is
                # a slow server, not a stale socket; it counts as this attempt's failure.
                if reused and not isinstance(exc, (TimeoutError, BlockingIOError)):
                    continue
                raise Retryable(exc.errno or errno.ECONNRESET, f"{what}: {exc}") from exc
            keep = _receive(sock, status, answer, rest, offset, target, what, total)
            return answer
        except WarmstartError:
            raise
        except OSError as exc:  # resets, timeouts, unreachable networks mid-request
            raise Retryable(exc.errno or errno.ECONNRESET,
                            f"{what}: connection failed mid-body: {exc}") from exc
        finally:
            if keep:
                pool.release(url, sock)
            else:
                sock.close()
    raise AssertionError("unreachable")


def _receive(sock, status, headers, rest, offset, target: Target, what: str,
             total: list[int] | None) -> bool:
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
        exc = error_for_body(status, body, what)
        exc.status, exc.headers = status, headers  # a caller may answer a challenge or redirect
        raise exc
    if b"transfer-encoding" in headers:  # permanent: retrying gets the same answer
        raise SourceError(errno.EPROTO, f"{what}: chunked responses are not supported")
    if status == 206:
        match = _CONTENT_RANGE.fullmatch(headers.get(b"content-range", b""))
        if not match or (int(match[1]), int(match[2])) != (offset, offset + n - 1):
            raise Retryable(errno.EPROTO, f"{what}: server answered Content-Range "
                                          f"{headers.get(b'content-range')!r}")
        if length != n:
            raise Retryable(errno.EPROTO, f"{what}: Content-Length {length}, expected {n}")
        if total is not None and match[3] != b"*":
            total.append(int(match[3]))
    elif total is not None and offset == 0 and length >= 0:
        total.append(length)  # a size probe the server answered with the whole object
        if length != n:
            return False  # the size is all the caller wanted: do not read the object
    elif offset != 0 or length != n:  # a plain 200 is right only for the whole object
        raise SourceError(errno.EPROTO, f"{what}: server ignored the Range header (HTTP 200 "
                                        f"with {length} bytes)")
    head = min(len(rest), n)
    target.view[:head] = rest[:head]
    if len(rest) > n:
        return False  # more bytes than promised: do not trust this connection again
    _recv_exact(sock, target.view[head:], what)
    return headers.get(b"connection", b"").lower() != b"close"
