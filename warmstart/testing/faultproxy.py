"""A fault-injecting HTTP/1.1 proxy in front of an S3-compatible server, for tests and benchmarks.

`FaultProxy(upstream)` listens on a free 127.0.0.1 port in a background thread and forwards
every request unchanged (method, target, headers with the client's `Host`, so SigV4 signatures
still verify upstream), streaming bodies both ways in blocks. Rules, which tests may add and
remove while requests run, pick requests (method, key substring, ranged GETs only, every Nth,
a seeded probability, a maximum count) and attach one fault to them:

    with FaultProxy(server.endpoint) as proxy:
        proxy.add_rule(status(503), method="GET", every=4)         # each 4th GET: SlowDown
        proxy.add_rule(reset_mid_body(1 << 20), probability=0.1, seed=7)
        ...                                                        # client uses proxy.endpoint
        proxy.wait_idle()
        assert proxy.stats().bytes_by_key["bucket/model.safetensors"] == expected

Faults that shape timing (`latency`, `bandwidth`) stack. Of the faults that break a response
(`reset_mid_body`, `truncate`, `status`, `stall`, `wrong_content_range`, `flip_bytes`) the first
rule that fires wins, and later breaking rules do not see that request.
"""

from __future__ import annotations

import bisect
import contextlib
import http.client
import random
import re
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from types import MappingProxyType
from typing import Iterator, Mapping
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

BLOCK = 256 << 10
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                         "transfer-encoding", "upgrade"})
_SHAPING = frozenset({"latency", "bandwidth"})
_S3_ERRORS = {
    301: ("PermanentRedirect", "The bucket you are attempting to access must be addressed "
                               "using the specified endpoint."),
    307: ("TemporaryRedirect", "Please re-send this request to the specified temporary "
                               "endpoint."),
    400: ("BadRequest", "The request is not valid."),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    429: ("TooManyRequests", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    502: ("BadGateway", "The proxy could not reach the upstream server."),
    503: ("SlowDown", "Please reduce your request rate."),
}


# --- faults ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """What to do to a request a rule picked; build one with the functions below."""

    kind: str
    after_bytes: int | None = None
    seconds: float = 0.0
    code: int = 0
    s3_code: str = ""
    message: str = ""
    bytes_per_second: float = 0.0
    per_connection: bool = False
    count: int = 0
    shift: int = 0


def _at_least(value, low, what):
    if value < low:
        raise ValueError(f"{what} must be >= {low}, got {value!r}")
    return value


def reset_mid_body(after_bytes: int) -> Fault:
    """Send the headers and `after_bytes` of the body (or all of a shorter one), then RST."""
    return Fault("reset_mid_body", after_bytes=_at_least(int(after_bytes), 0, "after_bytes"))


def truncate(after_bytes: int) -> Fault:
    """Promise the full Content-Length, send `after_bytes` of the body, close normally.
    A body no longer than `after_bytes` is sent whole and the connection stays open."""
    return Fault("truncate", after_bytes=_at_least(int(after_bytes), 0, "after_bytes"))


def status(code: int, s3_error_code: str | None = None, message: str | None = None) -> Fault:
    """Answer `code` with an S3 XML error body, without contacting upstream (3xx answers
    carry a `Location` pointing elsewhere, as S3's redirects do)."""
    default_code, default_message = _S3_ERRORS.get(code, ("InternalError", "Injected error."))
    _at_least(code, 300, "status code")
    return Fault("status", code=code, s3_code=s3_error_code or default_code,
                 message=message or default_message)


def stall(seconds: float, after_bytes: int | None = None) -> Fault:
    """Send nothing for `seconds` (before the response, or after `after_bytes` of the body),
    then carry on as if nothing happened (a client with a shorter timeout has given up)."""
    if after_bytes is not None:
        _at_least(int(after_bytes), 0, "after_bytes")
    return Fault("stall", seconds=_at_least(float(seconds), 0.0, "seconds"),
                 after_bytes=after_bytes)


def latency(seconds: float) -> Fault:
    """Wait `seconds` before forwarding the request (added time to first byte)."""
    return Fault("latency", seconds=_at_least(float(seconds), 0.0, "seconds"))


def bandwidth(bytes_per_second: float, per_connection: bool = False) -> Fault:
    """Cap response bodies with a token bucket: one bucket shared by every request the rule
    picks, or (`per_connection`) one per client connection."""
    if bytes_per_second <= 0:
        raise ValueError(f"bytes_per_second must be > 0, got {bytes_per_second!r}")
    return Fault("bandwidth", bytes_per_second=float(bytes_per_second),
                 per_connection=per_connection)


def wrong_content_range(shift: int = 1) -> Fault:
    """Move the reported Content-Range by `shift` bytes (added if missing); body unchanged."""
    if shift == 0:
        raise ValueError("shift must not be 0")
    return Fault("wrong_content_range", shift=int(shift))


def flip_bytes(count: int) -> Fault:
    """Invert all bits of `count` body bytes at seeded positions (every byte if fewer)."""
    return Fault("flip_bytes", count=_at_least(int(count), 1, "count"))


# --- rules ----------------------------------------------------------------------------


class Rule:
    """A fault and the requests it picks. `seen`/`faulted` are live; the proxy's lock guards
    them. `key`/`query` are substrings of the unquoted path ("bucket/key") and query string;
    `ranged` True/False picks only requests with/without a Range header."""

    def __init__(self, fault: Fault, *, method: str | None = None, key: str | None = None,
                 query: str | None = None, ranged: bool | None = None, every: int | None = None,
                 probability: float | None = None, max_count: int | None = None,
                 seed: int = 0, name: str | None = None):
        if every is not None:
            _at_least(every, 1, "every")
        if probability is not None and not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability!r}")
        if max_count is not None:
            _at_least(max_count, 0, "max_count")
        self.fault = fault
        self.method = method.upper() if method else None
        self.key, self.query, self.ranged = key, query, ranged
        self.every, self.probability, self.max_count = every, probability, max_count
        self.name = name or fault.kind
        self.seen = 0
        self.faulted = 0
        self._rng = random.Random(seed)  # which requests fire: exactly Random(seed).random()
        self._fault_rng = random.Random(f"{seed}/fault")  # what a fault does (flip positions)
        shared = fault.kind == "bandwidth" and not fault.per_connection
        self._bucket = _TokenBucket(fault.bytes_per_second) if shared else None
        self._buckets: list[_TokenBucket] = [self._bucket] if shared else []
        self._buckets_lock = threading.Lock()

    def bucket_bytes(self) -> list[int]:
        """A bandwidth rule's body bytes per token bucket, in the order the buckets were made:
        one entry for a shared bucket, one per connection otherwise."""
        with self._buckets_lock:
            return [b.taken for b in self._buckets]

    def _connection_bucket(self) -> "_TokenBucket":
        bucket = _TokenBucket(self.fault.bytes_per_second)
        with self._buckets_lock:
            self._buckets.append(bucket)
        return bucket

    def _fires(self, method: str, key: str, query: str, ranged: bool) -> bool:
        if ((self.method and method != self.method) or (self.key and self.key not in key)
                or (self.query and self.query not in query)
                or (self.ranged is not None and ranged != self.ranged)):
            return False
        self.seen += 1
        if self.every and self.seen % self.every:
            return False
        if self.max_count is not None and self.faulted >= self.max_count:
            return False
        if self.probability is not None and self._rng.random() >= self.probability:
            return False
        self.faulted += 1
        return True

    def __repr__(self) -> str:
        return f"Rule({self.name!r}, {self.fault}, seen={self.seen}, faulted={self.faulted})"


class _TokenBucket:
    """Bytes per second with a 50 ms burst; `take` returns how long the caller must wait.
    `clock` is injectable so the arithmetic is testable without waiting."""

    def __init__(self, rate: float, clock=time.monotonic):
        self.rate = rate
        self.burst = rate / 20
        self.taken = 0
        self._clock = clock
        self._tokens = 0.0
        self._last = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> float:
        with self._lock:
            self.taken += n
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate) - n
            self._last = now
            return max(0.0, -self._tokens / self.rate)


@dataclass(frozen=True)
class _Plan:
    key: str
    shaping: tuple[Rule, ...]
    failure: Fault | None
    seed: int


@dataclass(frozen=True)
class ProxyStats:
    """Counters since start or `reset_stats()`. Byte counts are response body bytes the proxy
    handed to client sockets (headers and chunk framing excluded); `bytes_by_key` is keyed by
    the unquoted path without its leading slash ("bucket/key")."""

    connections: int
    requests: int
    faulted: Mapping[str, int]
    bytes_to_client: int
    bytes_by_key: Mapping[str, int]
    bytes_from_client: int


# --- the proxy ------------------------------------------------------------------------


class FaultProxy:
    """See the module docstring. Thread-safe: rules may change while requests run."""

    def __init__(self, upstream: str, *, host: str = "127.0.0.1", port: int = 0,
                 upstream_timeout: float = 60.0, block_size: int = BLOCK):
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host[:port], got {upstream!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.host, self.port = host, port
        self.upstream_timeout = upstream_timeout
        self.block_size = _at_least(block_size, 4096, "block_size")
        self.errors: list[BaseException] = []  # unexpected handler errors (not disconnects)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._rules: list[Rule] = []
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._in_flight = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.reset_stats()

    # lifecycle
    def start(self) -> FaultProxy:
        if self._server is not None:
            raise RuntimeError("FaultProxy is already running")
        self._stopping.clear()
        self._server = _Server(self, (self.host, self.port))
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name=f"faultproxy {self.endpoint}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops accepting, wakes sleeping faults, closes every connection, joins threads."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        self._thread.join()
        server.server_close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("FaultProxy is not running")
        return f"http://{self.host}:{self._server.server_address[1]}"

    # rules
    def add_rule(self, fault: Fault, **match) -> Rule:
        """Appends `Rule(fault, **match)`; rules are tried in the order they were added."""
        rule = Rule(fault, **match)
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove_rule(self, rule: Rule) -> None:
        with self._lock:
            self._rules.remove(rule)

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    @contextlib.contextmanager
    def injecting(self, fault: Fault, **match) -> Iterator[Rule]:
        """`add_rule` for the duration of a with-block."""
        rule = self.add_rule(fault, **match)
        try:
            yield rule
        finally:
            with contextlib.suppress(ValueError):
                self.remove_rule(rule)

    @property
    def rules(self) -> tuple[Rule, ...]:
        with self._lock:
            return tuple(self._rules)

    # counters
    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(self._connections, self._requests,
                              MappingProxyType(dict(self._faulted)), self._bytes_to_client,
                              MappingProxyType(dict(self._bytes_by_key)),
                              self._bytes_from_client)

    def reset_stats(self) -> None:
        with self._lock:
            self._connections = self._requests = 0
            self._bytes_to_client = self._bytes_from_client = 0
            self._faulted: dict[str, int] = {}
            self._bytes_by_key: dict[str, int] = {}

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Waits until no request is being served, so counters include every response."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._in_flight == 0, timeout):
                raise TimeoutError(f"{self._in_flight} requests still in flight")

    # called by handler threads
    def _begin(self, method: str, key: str, query: str, ranged: bool) -> _Plan:
        shaping: list[Rule] = []
        failure, seed = None, 0
        with self._lock:
            self._requests += 1
            self._in_flight += 1
            for rule in self._rules:
                breaking = rule.fault.kind not in _SHAPING
                if (breaking and failure) or not rule._fires(method, key, query, ranged):
                    continue
                self._faulted[rule.name] = self._faulted.get(rule.name, 0) + 1
                if breaking:
                    failure, seed = rule.fault, rule._fault_rng.getrandbits(64)
                else:
                    shaping.append(rule)
        return _Plan(key, tuple(shaping), failure, seed)

    def _end(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.notify_all()

    def _sent(self, key: str, n: int) -> None:
        with self._lock:
            self._bytes_to_client += n
            self._bytes_by_key[key] = self._bytes_by_key.get(key, 0) + n

    def _received(self, n: int) -> None:
        with self._lock:
            self._bytes_from_client += n

    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and self._stopping.wait(seconds):
            raise ConnectionAbortedError("faultproxy is stopping")

    def _track(self, sock: socket.socket, thread: threading.Thread | None = None) -> None:
        with self._lock:
            self._sockets.add(sock)
            if thread is not None:
                self._connections += 1
                self._threads.add(thread)
        if self._stopping.is_set():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _untrack(self, sock: socket.socket, thread: threading.Thread | None = None) -> None:
        with self._lock:
            self._sockets.discard(sock)
            self._threads.discard(thread)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, proxy: FaultProxy, address: tuple[str, int]):
        self.proxy = proxy
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address) -> None:
        import sys

        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError):  # a client that hung up is no error
            self.proxy.errors.append(error)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.proxy = self.server.proxy
        self.buckets: dict[int, _TokenBucket] = {}  # per-connection bandwidth, by rule id
        self.proxy._track(self.connection, threading.current_thread())

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.proxy._untrack(self.connection, threading.current_thread())

    def log_message(self, format, *args) -> None:
        pass

    def forward(self) -> None:
        path, _, query = self.path.partition("?")
        key = unquote(path).lstrip("/")
        plan = self.proxy._begin(self.command, key, query, "Range" in self.headers)
        try:
            self._serve(plan)
        except OSError:  # the client or upstream went away, or a reset we made ourselves
            self.close_connection = True
        finally:
            self.proxy._end()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = forward

    def _serve(self, plan: _Plan) -> None:
        fault = plan.failure
        for rule in plan.shaping:
            if rule.fault.kind == "latency":
                self.proxy._sleep(rule.fault.seconds)
        if fault and fault.kind == "status":
            self._copy_request_body(None)
            return self._send_error(fault.code, fault.s3_code, fault.message)
        if fault and fault.kind == "stall" and fault.after_bytes is None:
            self.proxy._sleep(fault.seconds)
        conn = http.client.HTTPConnection(*self.proxy.upstream,
                                          timeout=self.proxy.upstream_timeout)
        try:
            try:
                conn.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
                for name, value in self.headers.items():
                    conn.putheader(name, value)
                conn.endheaders()
                self.proxy._track(conn.sock)
                self._copy_request_body(conn.sock)
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                self.close_connection = True
                return self._send_error(502, "BadGateway", f"faultproxy: upstream failed: {exc}")
            self._relay_response(response, plan)
        finally:
            if conn.sock is not None:
                self.proxy._untrack(conn.sock)
            conn.close()

    # request side
    def _copy_request_body(self, upstream: socket.socket | None) -> None:
        """Streams the client's body upstream (or drops it when `upstream` is None), keeping
        chunked framing byte for byte."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while size := int(self._line(upstream).split(b";", 1)[0], 16):
                self._copy(upstream, size)
                self._line(upstream)  # the CRLF after the chunk's data
            while self._line(upstream).strip():
                pass  # trailers, up to the empty line that ends the body
            return
        self._copy(upstream, int(self.headers.get("Content-Length") or 0))

    def _line(self, upstream: socket.socket | None) -> bytes:
        line = self.rfile.readline(65537)
        if not line.endswith(b"\n"):
            raise ConnectionError("client closed inside a chunked body")
        if upstream is not None:
            upstream.sendall(line)
        return line

    def _copy(self, upstream: socket.socket | None, n: int) -> None:
        view = memoryview(bytearray(min(n, self.proxy.block_size)))
        while n:
            got = self.rfile.readinto(view[:min(n, len(view))])
            if not got:
                raise ConnectionError("client closed inside the request body")
            if upstream is not None:
                upstream.sendall(view[:got])
                self.proxy._received(got)
            n -= got

    # response side
    def _send_error(self, code: int, s3_code: str, message: str) -> None:
        request_id = f"faultproxy{time.monotonic_ns():x}"
        body = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error>"
                f"<Code>{escape(s3_code)}</Code><Message>{escape(message)}</Message>"
                f"<Resource>{escape(self.path.partition('?')[0])}</Resource>"
                f"<RequestId>{request_id}</RequestId></Error>").encode()
        reason = http.client.responses.get(code, "Error")
        head = [f"HTTP/1.1 {code} {reason}", "Content-Type: application/xml",
                f"Content-Length: {len(body)}", f"x-amz-request-id: {request_id}"]
        if 300 <= code < 400:
            head.append(f"Location: http://elsewhere.invalid{self.path}")
        if self.close_connection:
            head.append("Connection: close")
        self._write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
                    + (b"" if self.command == "HEAD" else body))

    def _relay_response(self, response: http.client.HTTPResponse, plan: _Plan) -> None:
        fault = plan.failure
        no_body = (self.command == "HEAD" or response.status in (204, 304)
                   or response.status < 200)
        length = None if response.chunked else response.length
        chunked = not no_body and length is None
        head = [f"HTTP/1.1 {response.status} {response.reason}"]
        content_range = None
        for name, value in response.getheaders():
            lower = name.lower()
            if lower in _HOP_BY_HOP:
                continue
            if lower == "content-range" and fault and fault.kind == "wrong_content_range":
                value = content_range = _shift_range(value, fault.shift)
            head.append(f"{name}: {value}")
        if fault and fault.kind == "wrong_content_range" and content_range is None:
            size = length or 0
            head.append(f"Content-Range: bytes {fault.shift}-{fault.shift + size - 1}/{size}")
        if chunked:
            head.append("Transfer-Encoding: chunked")
        if self.close_connection:
            head.append("Connection: close")
        self._write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if not no_body:
            self._relay_body(response, plan, length, chunked)

    def _relay_body(self, response, plan: _Plan, length: int | None, chunked: bool) -> None:
        fault = plan.failure
        kind = fault.kind if fault else None
        cut = fault.after_bytes if kind in ("reset_mid_body", "truncate", "stall") else None
        flips = _flip_positions(fault.count, length, plan.seed) if kind == "flip_bytes" else []
        buckets = [self._bucket(rule) for rule in plan.shaping if rule.fault.kind == "bandwidth"]
        block = self.proxy.block_size
        if buckets:  # small blocks keep a capped stream smooth
            block = max(4096, min(block, int(min(b.rate for b in buckets) / 20)))
        view = memoryview(bytearray(block))
        sent, ended = 0, False
        while True:
            want = block
            if cut is not None:
                if sent >= cut and kind == "stall":
                    self.proxy._sleep(fault.seconds)
                    cut = None
                    continue
                if sent >= cut:
                    break
                want = min(want, cut - sent)
            n = response.readinto(view[:want])
            if not n:
                ended = True
                break
            if flips:
                _flip(view, sent, n, flips)
            for bucket in buckets:
                self.proxy._sleep(bucket.take(n))
            self._send_body(view[:n], chunked, plan.key)
            sent += n
        if kind == "reset_mid_body":
            return self._reset()
        complete = ended if length is None else sent >= length
        if not complete:  # cut short (truncate) or upstream ended early: FIN, no more
            self.close_connection = True
            return
        if chunked:
            self._write(b"0\r\n\r\n")

    def _bucket(self, rule: Rule) -> _TokenBucket:
        if rule._bucket is not None:
            return rule._bucket
        if id(rule) not in self.buckets:
            self.buckets[id(rule)] = rule._connection_bucket()
        return self.buckets[id(rule)]

    def _send_body(self, data: memoryview, chunked: bool, key: str) -> None:
        if chunked:
            self._write(b"%x\r\n" % len(data))
        sock, sent = self.connection, 0
        try:
            while sent < len(data):
                sent += sock.send(data[sent:])
        finally:
            self.proxy._sent(key, sent)
        if chunked:
            self._write(b"\r\n")

    def _write(self, data: bytes) -> None:
        self.connection.sendall(data)

    def _reset(self) -> None:
        """Closes the client connection with RST once the bytes sent so far are delivered."""
        sock = self.connection
        deadline = time.monotonic() + 2.0
        while _unsent(sock) and time.monotonic() < deadline:
            time.sleep(0.001)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.rfile.close()  # drops makefile's reference, so close() below really closes
        sock.close()


def _unsent(sock: socket.socket) -> int:
    """Bytes in the socket's send queue not yet acknowledged by the peer (Linux), else 0."""
    try:
        import fcntl
        import termios

        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except (ImportError, AttributeError, OSError):
        return 0


def _shift_range(value: str, shift: int) -> str:
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value)
    if not match:
        return f"bytes {shift}-{shift}/*"
    return f"bytes {int(match[1]) + shift}-{int(match[2]) + shift}/{match[3]}"


def _flip_positions(count: int, length: int | None, seed: int) -> list[int]:
    span = BLOCK if length is None else length
    return sorted(random.Random(seed).sample(range(span), min(count, span)))


def _flip(view: memoryview, offset: int, n: int, positions: list[int]) -> None:
    for i in range(bisect.bisect_left(positions, offset),
                   bisect.bisect_left(positions, offset + n)):
        view[positions[i] - offset] ^= 0xFF
