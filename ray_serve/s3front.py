"""The subset of the S3 HTTP API the loader uses, served on 127.0.0.1 from a backend.

HEAD object, GET object (whole or one `Range: bytes=a-b`), and ListObjectsV2. Requests are
not authenticated: the front listens on the loopback interface only, for the replicas of its
node, and reads object storage with the gateway's own credentials (docs/RAY.md says so).
"""

from __future__ import annotations

import logging
import re
import socketserver
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from typing import Iterable, Iterator, Protocol
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

from warmstart.errors import AccessDenied, NotFound, Retryable, WarmstartError
from warmstart.ray_serve.plan import ObjectId

log = logging.getLogger("warmstart.ray_serve")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class Backend(Protocol):
    def head(self, bucket: str, key: str) -> tuple[ObjectId, float]: ...

    def list(self, bucket: str, prefix: str, delimiter: str, token: str | None,
             max_keys: int) -> tuple[list[dict], list[str], str | None]: ...

    def read(self, obj: ObjectId, offset: int, length: int) -> Iterator[memoryview]: ...


class S3Front:
    """Serves `backend` on a free 127.0.0.1 port, one thread per connection."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.backend = backend
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.2,),
                                        name="warmstart-s3front", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    backend: Backend


def _status_of(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, NotFound):
        return 404, "NoSuchKey"
    if isinstance(exc, AccessDenied):
        return 403, "AccessDenied"
    if isinstance(exc, Retryable):
        return 503, "SlowDown"
    return 500, "InternalError"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        return None

    def _path(self) -> tuple[str, str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
        return bucket, key, parse_qs(parts.query, keep_blank_values=True)

    def _error(self, exc: BaseException, head: bool = False) -> None:
        code, s3_code = _status_of(exc)
        if not isinstance(exc, WarmstartError):
            log.exception("warmstart gateway: unexpected error serving %s", self.path)
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{s3_code}</Code>'
                f"<Message>{escape(str(exc))}</Message></Error>").encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(0 if head else len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        bucket, key, _ = self._path()
        try:
            obj, mtime = self.server.backend.head(bucket, key)
        except Exception as exc:  # noqa: BLE001 - answered as an S3 error
            self._error(exc, head=True)
            return
        self.send_response(200)
        self._object_headers(obj, mtime)
        self.send_header("Content-Length", str(obj.size))
        self.end_headers()

    def _object_headers(self, obj: ObjectId, mtime: float) -> None:
        self.send_header("ETag", obj.etag)
        self.send_header("Last-Modified", formatdate(mtime, usegmt=True))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")

    def do_GET(self) -> None:  # noqa: N802
        bucket, key, query = self._path()
        if not key and "list-type" in query:
            self._list(bucket, query)
            return
        try:
            obj, mtime = self.server.backend.head(bucket, key)
            start, end = 0, obj.size - 1
            ranged = "Range" in self.headers
            if ranged:
                match = _RANGE.fullmatch(self.headers["Range"].strip())
                if not match or int(match[1]) >= obj.size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{obj.size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(match[1])
                end = min(int(match[2]) if match[2] else obj.size - 1, obj.size - 1)
            blocks = self.server.backend.read(obj, start, end - start + 1)
            first = next(blocks, None)  # errors before the status line are S3 errors
        except Exception as exc:  # noqa: BLE001
            self._error(exc)
            return
        self.send_response(206 if ranged else 200)
        self._object_headers(obj, mtime)
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{obj.size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        try:
            for block in _chain(first, blocks):
                self.wfile.write(block)
        except Exception:  # noqa: BLE001 - mid-body: the client sees a short body and retries
            log.warning("warmstart gateway: %s bytes %d-%d failed mid-body", obj.name, start,
                        end, exc_info=True)
            self.close_connection = True

    def _list(self, bucket: str, query: dict[str, list[str]]) -> None:
        def one(name: str, default: str = "") -> str:
            return query.get(name, [default])[0]

        prefix, delimiter = one("prefix"), one("delimiter")
        try:
            contents, prefixes, token = self.server.backend.list(
                bucket, prefix, delimiter, one("continuation-token") or None,
                int(one("max-keys", "1000") or 1000))
        except Exception as exc:  # noqa: BLE001
            self._error(exc)
            return
        parts = ['<?xml version="1.0" encoding="UTF-8"?>',
                 '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
                 f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>",
                 f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount><MaxKeys>1000</MaxKeys>",
                 f"<Delimiter>{escape(delimiter)}</Delimiter>" if delimiter else "",
                 f"<IsTruncated>{'true' if token else 'false'}</IsTruncated>"]
        if token:
            parts.append(f"<NextContinuationToken>{escape(token)}</NextContinuationToken>")
        for c in contents:
            parts.append(f"<Contents><Key>{escape(c['Key'])}</Key>"
                         f"<LastModified>{c['LastModified']}</LastModified>"
                         f"<ETag>{escape(c['ETag'])}</ETag><Size>{c['Size']}</Size>"
                         "<StorageClass>STANDARD</StorageClass></Contents>")
        for p in prefixes:
            parts.append(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>")
        parts.append("</ListBucketResult>")
        body = "".join(parts).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _chain(first, rest: Iterable) -> Iterator:
    if first is not None:
        yield first
    yield from rest
