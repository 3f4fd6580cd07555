"""Requests other than ranged reads, on the data path's own connection pool.

`ranged_get_into` (http.py) is the path for bytes whose range is known. Some protocols also
need an answer whose length is not known up front (a registry manifest, a whole layer
streamed once, a token) or a request with a body (an upload). `send` writes one such request
on a pooled keep-alive connection and returns an `Answer` whose body the caller reads with
`readinto` (`recv_into` straight into the caller's buffer, as the ranged path does) or `read`;
the connection goes back to the pool only once the body has been read to its end.

Statuses are the caller's to judge (a 401 may be a challenge, a 307 a redirect the caller
follows); `Answer.error(what)` maps one through the one error table. Connection failures
follow the same table: no connection at all is `EndpointUnreachable`, anything after the
request went out is `Retryable`.
"""

from __future__ import annotations

import errno
import socket
import ssl

from warmstart.errors import EndpointUnreachable, Retryable, SourceError, WarmstartError
from warmstart.storage.errors import error_for_answer
from warmstart.storage.http import ConnectionPool, Url, _read_head

NO_BODY = frozenset({204, 304})


class Answer:
    """Status, headers (lower-case bytes keys) and a body read on demand."""

    def __init__(self, pool: ConnectionPool, url: Url, sock: socket.socket, status: int,
                 headers: dict[bytes, bytes], rest: bytes, what: str, head: bool) -> None:
        self.pool, self.url, self.sock, self.what = pool, url, sock, what
        self.status, self.headers = status, headers
        self._buf = bytearray(rest)
        self._chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        self._chunk_left = 0
        self._eof = False
        try:
            length = int(headers.get(b"content-length", b"-1"))
        except ValueError:
            raise Retryable(errno.EPROTO, f"{what}: malformed Content-Length") from None
        if head or status in NO_BODY or 100 <= status < 200:
            length = 0
        self.length = length  # -1: chunked, or until the server closes
        self._left = length
        if length == 0:
            self._finish()

    def header(self, name: str) -> str:
        return self.headers.get(name.lower().encode(), b"").decode("latin-1")

    # --- reading ----------------------------------------------------------------------
    def _recv(self, view: memoryview) -> int:
        """Buffered bytes first, then the socket; 0 only at the end of the stream."""
        if self._buf:
            n = min(len(view), len(self._buf))
            view[:n] = self._buf[:n]
            del self._buf[:n]
            return n
        return self._recv_raw(view)

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            if len(self._buf) > 4096:
                raise Retryable(errno.EPROTO, f"{self.what}: bad chunked encoding")
            more = bytearray(4096)
            got = self._recv_raw(memoryview(more))
            if not got:
                raise Retryable(errno.EPIPE, f"{self.what}: body cut short (chunked)")
            self._buf += more[:got]
        line, _, rest = bytes(self._buf).partition(b"\r\n")
        self._buf = bytearray(rest)
        return line

    def _recv_raw(self, view: memoryview) -> int:
        try:
            return self.sock.recv_into(view, len(view))
        except (BlockingIOError, TimeoutError, ssl.SSLWantReadError) as exc:
            raise Retryable(errno.ETIMEDOUT, f"{self.what}: no data for the read timeout") \
                from exc
        except OSError as exc:
            raise Retryable(exc.errno or errno.ECONNRESET,
                            f"{self.what}: connection failed mid-body: {exc}") from exc

    def readinto(self, view: memoryview) -> int:
        """Up to len(view) body bytes into `view`; 0 at the end of the body. A body that ends
        before its Content-Length (or its last chunk) is `Retryable`."""
        if self._eof or not len(view):
            return 0
        if self._chunked:
            if self._chunk_left == 0:
                size = self._line().split(b";", 1)[0].strip()
                try:
                    self._chunk_left = int(size, 16)
                except ValueError:
                    raise Retryable(errno.EPROTO, f"{self.what}: bad chunk size "
                                                  f"{size[:20]!r}") from None
                if self._chunk_left == 0:
                    while self._line():  # trailers, up to the empty line
                        pass
                    self._finish()
                    return 0
            view = view[:self._chunk_left]
        elif self._left >= 0:
            view = view[:self._left]
        got = self._recv(view)
        if got == 0:
            if self._left < 0 and not self._chunked:
                self._eof = True  # a body delimited by the connection's close
                self.close()
                return 0
            missing = self._chunk_left if self._chunked else self._left
            self.close()
            raise Retryable(errno.EPIPE, f"{self.what}: body cut short, {missing} bytes "
                                         f"missing")
        if self._chunked:
            self._chunk_left -= got
            if self._chunk_left == 0:
                self._line()  # the CRLF after a chunk's data
        elif self._left >= 0:
            self._left -= got
            if self._left == 0:
                self._finish()
        return got

    def read(self, limit: int) -> bytes:
        """The rest of the body, at most `limit` bytes (more is left unread)."""
        out = bytearray(min(max(self._left, 0), limit) if self._left >= 0 else
                        min(limit, 1 << 16))
        pos = 0
        while pos < limit:
            if pos == len(out):
                out.extend(bytes(min(len(out) or 1 << 16, limit - pos)))
            got = self.readinto(memoryview(out)[pos:])
            if not got:
                break
            pos += got
        return bytes(out[:pos])

    # --- ending -----------------------------------------------------------------------
    def _finish(self) -> None:
        self._eof = True
        keep = (not self._buf and self.header("connection").lower() != "close"
                and self.sock is not None)
        sock, self.sock = self.sock, None
        if sock is not None:
            if keep:
                self.pool.release(self.url, sock)
            else:
                sock.close()

    def close(self) -> None:
        """Ends the exchange; a body not read to its end closes the connection."""
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()

    def error(self, what: str, detail: str = "") -> SourceError:
        """This answer's status as the error table's exception (the body is closed)."""
        self.close()
        exc = error_for_answer(self.status, "", detail, what)
        exc.status, exc.headers = self.status, self.headers  # type: ignore[attr-defined]
        return exc


def _request_bytes(url: Url, method: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {url.target} HTTP/1.1", f"Host: {url.netloc}"]
    names = {k.lower() for k in headers}
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() != "host"]
    if body or method in ("POST", "PUT", "PATCH"):
        if "content-length" not in names:
            lines.append(f"Content-Length: {len(body)}")
    if "user-agent" not in names:
        lines.append("User-Agent: warmstart")
    if "accept-encoding" not in names:
        lines.append("Accept-Encoding: identity")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def send(pool: ConnectionPool, url: Url, method: str, what: str,
         headers: dict[str, str] | None = None, body: bytes = b"") -> Answer:
    """One request; returns the answer with its body unread (any status)."""
    request = _request_bytes(url, method, headers or {}, body)
    for fresh in (False, True):
        try:
            sock, reused = pool.acquire(url, fresh)
        except ssl.SSLCertVerificationError as exc:
            raise SourceError(errno.EPROTO, f"{what}: TLS certificate of {url.netloc} not "
                                            f"trusted ({exc.verify_message})") from None
        except (ConnectionRefusedError, socket.gaierror) as exc:
            raise EndpointUnreachable(errno.ECONNREFUSED,
                                      f"{what}: cannot connect to {url.netloc}: {exc}") \
                from None
        except OSError as exc:
            raise Retryable(exc.errno or errno.ECONNREFUSED,
                            f"{what}: cannot connect to {url.netloc}: {exc}") from exc
        try:
            sock.sendall(request)
            if body:
                sock.sendall(body)
            status, answer, rest = _read_head(sock)
        except WarmstartError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            # an idle kept-alive connection the server closed: one fresh try at once
            if reused and not isinstance(exc, (TimeoutError, BlockingIOError)):
                continue
            raise Retryable(exc.errno or errno.ECONNRESET, f"{what}: {exc}") from exc
        return Answer(pool, url, sock, status, answer, rest, what, method == "HEAD")
    raise AssertionError("unreachable")
