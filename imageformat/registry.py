"""Talk to an OCI distribution (v2) registry: the only module that speaks its protocol.

`RegistryClient` has a narrow surface: get a manifest, stream a blob, read a byte range of a
blob, and (for a registry used as an image store) upload blobs and manifests, list tags and
ask for referrers. Authentication follows the registry's challenge: anonymous first, then on
a 401 a Bearer token from the realm it names (with the user's credentials when there are
any) or Basic credentials (`registry_config.RegistryOptions`, read once from the
environment). HTTP is stdlib `http.client` on a small pool of
kept-alive connections; every error is one of warmstart's own (NotFound, AccessDenied,
Retryable, ...). When the project's shared storage layer lands, `_send` is the one place to
move onto its data path.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from warmstart.errors import (AccessDenied, DigestMismatch, EndpointUnreachable,
                              ImageFormatError, NotFound, Retryable, RetriesExhausted,
                              SourceError)

from .registry_config import Credentials, RegistryOptions

MANIFEST_ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"))
MAX_MANIFEST = 4 << 20


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


class _Response:
    """A response whose body is read by the caller; its connection goes back to the pool
    only once the body was read to the end."""

    def __init__(self, client: "RegistryClient", conn, resp: http.client.HTTPResponse) -> None:
        self.client, self.conn, self.resp = client, conn, resp
        self.status, self.headers = resp.status, resp.headers

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.resp.read(n if n >= 0 else None)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise Retryable(f"{self.client.host}: body cut short ({exc})") from None
        if not data and n != 0 and self.resp.length:  # closed before its Content-Length
            missing = self.resp.length
            self.close()
            raise Retryable(f"{self.client.host}: body cut short, {missing} bytes missing")
        return data

    def close(self) -> None:
        if self.conn is None:
            return
        conn, self.conn = self.conn, None
        if not self.resp.isclosed() and self.resp.length == 0:
            self.resp.read()  # HEAD, 201 and 204 answers: nothing left to read
        if (self.resp.isclosed() and not self.resp.will_close
                and not isinstance(conn, _OneShot)):
            self.client._release(conn)
        else:
            conn.close()


class RegistryClient:
    def __init__(self, host: str, options: RegistryOptions | None = None) -> None:
        self.host, self.options = host, options or RegistryOptions()
        self.scheme = "http" if self.options.plain_http else "https"
        self.creds = self.options.auths.get(host, Credentials())
        self._pool: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._auth: dict[str, str] = {}  # scope -> Authorization header value
        self._ssl = (ssl.create_default_context(cafile=self.options.ca_file)
                     if not self.options.plain_http else None)

    # --- connections ------------------------------------------------------------------
    def _connect(self, host: str, scheme: str):
        if scheme == "https":
            return http.client.HTTPSConnection(host, timeout=self.options.timeout,
                                               context=self._ssl)
        return http.client.HTTPConnection(host, timeout=self.options.timeout)

    def _acquire(self):
        with self._lock:
            if self._pool:
                return self._pool.pop()
        return self._connect(self.host, self.scheme)

    def _release(self, conn) -> None:
        with self._lock:
            if len(self._pool) < 32:
                self._pool.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, []
        for conn in pool:
            conn.close()

    # --- requests ---------------------------------------------------------------------
    def _send(self, method: str, url: str, headers: dict, body: bytes | None) -> _Response:
        """One request; connection failures become Retryable/EndpointUnreachable."""
        parts = urllib.parse.urlsplit(url)
        own = parts.netloc == self.host and parts.scheme == self.scheme
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        for fresh in (False, True):  # a kept-alive connection may have been closed by then
            c = (self._acquire() if own and not fresh
                 else self._connect(parts.netloc, parts.scheme))
            try:
                c.request(method, target, body=body, headers=headers)
                resp = c.getresponse()
            except (ConnectionRefusedError, socket.gaierror) as exc:
                c.close()
                raise EndpointUnreachable(f"{self.host}: cannot connect ({exc})") from None
            except (OSError, http.client.HTTPException) as exc:
                c.close()
                if not fresh and own:
                    continue
                raise Retryable(f"{self.host}: {method} {parts.path}: {exc}") from None
            return _Response(self, c if own else _OneShot(c), resp)
        raise AssertionError("unreachable")

    def _scope(self, repo: str, write: bool) -> str:
        return f"repository:{repo}:{'pull,push' if write else 'pull'}"

    def _token(self, challenge: str, scope: str) -> str:
        scheme, params = _challenge(challenge)
        if scheme == "basic":
            if self.creds.username is None:
                raise AccessDenied(f"{self.host}: needs credentials (docker login / "
                                   "REGISTRY_AUTH_FILE)")
            raw = f"{self.creds.username}:{self.creds.password or ''}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        if scheme != "bearer" or "realm" not in params:
            raise AccessDenied(f"{self.host}: unsupported auth challenge {challenge[:100]!r}")
        query = {"scope": params.get("scope", scope)}
        if "service" in params:
            query["service"] = params["service"]
        headers = {}
        if self.creds.identity_token:
            raise AccessDenied(f"{self.host}: identity tokens (OAuth2 refresh) are not "
                               "supported; use a username and password")
        if self.creds.username is not None:
            raw = f"{self.creds.username}:{self.creds.password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        url = params["realm"] + ("&" if "?" in params["realm"] else "?") + \
            urllib.parse.urlencode(query)
        resp = self._send("GET", url, headers, None)
        body = resp.read(1 << 20)
        resp.close()
        if resp.status in (401, 403):
            raise AccessDenied(f"{self.host}: token server {params['realm']} refused "
                               f"{'the credentials' if headers else 'anonymous access'} "
                               f"({resp.status})")
        if resp.status != 200:
            raise SourceError(f"{self.host}: token server answered {resp.status}")
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise SourceError(f"{self.host}: token server sent no token")
        return "Bearer " + token

    def request(self, method: str, path: str, *, repo: str, headers: dict | None = None,
                body: bytes | None = None, ok: tuple[int, ...] = (200,),
                what: str = "") -> _Response:
        """Sends `method path`, answering an auth challenge once and retrying transient
        failures of idempotent requests; redirects are followed (without our credentials
        when they leave the registry). Returns the response with its body unread."""
        write = method not in ("GET", "HEAD")
        scope = self._scope(repo, write)
        what = what or f"{method} {path}"
        delay = 0.2
        for attempt in range(self.options.attempts):
            try:
                return self._request_once(method, path, scope, headers or {}, body, ok, what)
            except Retryable as exc:
                if write or attempt == self.options.attempts - 1:
                    if attempt:
                        raise RetriesExhausted(f"{exc} (after {attempt + 1} attempts)") \
                            from None
                    raise
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _request_once(self, method, path, scope, headers, body, ok, what) -> _Response:
        url = f"{self.scheme}://{self.host}{path}"
        challenged = False
        for _hop in range(6):
            h = dict(headers)
            own = urllib.parse.urlsplit(url).netloc == self.host
            if own and scope in self._auth:
                h["Authorization"] = self._auth[scope]
            resp = self._send(method, url, h, body)
            if resp.status == 401 and own and not challenged:
                challenge = resp.headers.get("WWW-Authenticate", "")
                resp.read(1 << 16)
                resp.close()
                self._auth[scope] = self._token(challenge, scope)
                challenged = True
                continue
            if resp.status in (301, 302, 303, 307, 308) and method in ("GET", "HEAD"):
                location = resp.headers.get("Location", "")
                resp.read(1 << 16)
                resp.close()
                url = urllib.parse.urljoin(url, location)
                continue
            if resp.status in ok:
                return resp
            detail = resp.read(2048).decode("utf-8", "replace").strip().replace("\n", " ")
            resp.close()
            msg = f"{self.host}: {what}: HTTP {resp.status} {detail[:300]}".rstrip()
            if resp.status == 404:
                raise NotFound(msg)
            if resp.status in (401, 403):
                raise AccessDenied(msg)
            if resp.status == 429 or resp.status >= 500:
                raise Retryable(msg)
            raise SourceError(msg)
        raise SourceError(f"{self.host}: {what}: too many redirects")

    # --- the narrow interface -------------------------------------------------------------
    def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest or index; a digest ref is verified."""
        resp = self.request("GET", f"/v2/{repo}/manifests/{ref}", repo=repo,
                            headers={"Accept": MANIFEST_ACCEPT}, what=f"manifest {repo}:{ref}")
        data = resp.read(MAX_MANIFEST + 1)
        resp.close()
        if len(data) > MAX_MANIFEST:
            raise ImageFormatError(f"{self.host}/{repo}:{ref}: manifest over {MAX_MANIFEST} B")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        said = resp.headers.get("Docker-Content-Digest")
        if (ref.startswith("sha256:") and digest != ref) or (said and said != digest):
            raise DigestMismatch(f"{self.host}/{repo}: manifest {ref} hashes to {digest}")
        media_type = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
        return data, media_type, digest

    @contextmanager
    def open_blob(self, repo: str, digest: str) -> Iterator[BinaryIO]:
        """The blob's bytes as a stream (the caller verifies them against `digest`); a body
        cut short is picked up again from the next byte with a ranged GET."""
        stream = _BlobStream(self, repo, digest)
        try:
            yield stream  # type: ignore[misc]
        finally:
            stream.close()

    def read_blob(self, repo: str, digest: str, offset: int, length: int) -> bytes:
        """`length` bytes of the blob from `offset`, with one ranged GET (again, with
        backoff, when its body is cut short)."""
        delay = 0.2
        for attempt in range(self.options.attempts):
            resp = self.request("GET", f"/v2/{repo}/blobs/{digest}", repo=repo, ok=(206,),
                                headers={"Range": f"bytes={offset}-{offset + length - 1}"},
                                what=f"blob {digest} [{offset}, +{length})")
            try:
                data = resp.read(length + 1)
                if len(data) != length:
                    raise Retryable(f"{self.host}/{repo}: blob {digest} at {offset}: "
                                    f"{len(data)} of {length} bytes")
                return data
            except Retryable as exc:
                if attempt == self.options.attempts - 1:
                    raise RetriesExhausted(f"{exc} (after {attempt + 1} attempts)") from None
                time.sleep(delay)
                delay *= 2
            finally:
                resp.close()
        raise AssertionError("unreachable")

    def blob_exists(self, repo: str, digest: str) -> bool:
        try:
            resp = self.request("HEAD", f"/v2/{repo}/blobs/{digest}", repo=repo)
        except NotFound:
            return False
        resp.close()
        return True

    def put_blob(self, repo: str, digest: str, data: bytes) -> None:
        """Monolithic upload: POST an upload session, PUT the bytes with their digest."""
        resp = self.request("POST", f"/v2/{repo}/blobs/uploads/", repo=repo, body=b"",
                            ok=(202,), headers={"Content-Length": "0"}, what="upload")
        resp.read(1 << 16)
        resp.close()
        location = resp.headers.get("Location")
        if not location:
            raise SourceError(f"{self.host}/{repo}: upload session has no Location")
        parts = urllib.parse.urlsplit(urllib.parse.urljoin(
            f"{self.scheme}://{self.host}/", location))
        query = parts.query + ("&" if parts.query else "") + \
            urllib.parse.urlencode({"digest": digest})
        resp = self.request("PUT", f"{parts.path}?{query}", repo=repo, body=data, ok=(201,),
                            headers={"Content-Type": "application/octet-stream",
                                     "Content-Length": str(len(data))},
                            what=f"upload of blob {digest}")
        resp.read(1 << 16)
        resp.close()

    def put_manifest(self, repo: str, ref: str, data: bytes, media_type: str) -> dict:
        resp = self.request("PUT", f"/v2/{repo}/manifests/{ref}", repo=repo, body=data,
                            ok=(201,), headers={"Content-Type": media_type,
                                                "Content-Length": str(len(data))},
                            what=f"manifest {repo}:{ref}")
        resp.read(1 << 16)
        resp.close()
        return dict(resp.headers)

    def referrers(self, repo: str, digest: str) -> list[dict] | None:
        """The referrers API's descriptors, or None when the registry has no such API."""
        try:
            resp = self.request("GET", f"/v2/{repo}/referrers/{digest}", repo=repo,
                                headers={"Accept": "application/vnd.oci.image.index.v1+json"},
                                what=f"referrers of {digest}")
        except NotFound:
            return None
        data = resp.read(MAX_MANIFEST + 1)
        resp.close()
        if "application/vnd.oci.image.index.v1+json" not in resp.headers.get(
                "Content-Type", ""):
            return None  # not the API: some registries answer with an HTML or empty page
        try:
            listed = json.loads(data).get("manifests")
        except (ValueError, AttributeError):
            raise ImageFormatError(f"{self.host}/{repo}: referrers of {digest} are not an "
                                   "image index") from None
        return [m for m in listed if isinstance(m, dict)] if isinstance(listed, list) else []

    def tags(self, repo: str) -> list[str]:
        try:
            resp = self.request("GET", f"/v2/{repo}/tags/list", repo=repo, what="tags")
        except NotFound:
            return []
        data = resp.read(MAX_MANIFEST + 1)
        resp.close()
        try:
            tags = json.loads(data).get("tags") or []
        except (ValueError, AttributeError):
            raise ImageFormatError(f"{self.host}/{repo}: tag list is not JSON") from None
        return sorted(t for t in tags if isinstance(t, str))


class _BlobStream:
    def __init__(self, client: RegistryClient, repo: str, digest: str) -> None:
        self.client, self.repo, self.digest = client, repo, digest
        self.path, self.pos = f"/v2/{repo}/blobs/{digest}", 0
        self.resumes = client.options.attempts - 1
        self.resp = client.request("GET", self.path, repo=repo, what=f"blob {digest}")

    def read(self, n: int = -1) -> bytes:
        while True:
            try:
                data = self.resp.read(n)
            except Retryable as exc:
                if self.resumes <= 0:
                    raise RetriesExhausted(f"{exc} (blob {self.digest}, resumed "
                                           f"{self.client.options.attempts - 1} times)") \
                        from None
                self.resumes -= 1
                self._resume()
                continue
            self.pos += len(data)
            return data

    def _resume(self) -> None:
        self.resp = self.client.request("GET", self.path, repo=self.repo, ok=(206,),
                                        headers={"Range": f"bytes={self.pos}-"},
                                        what=f"blob {self.digest} from {self.pos}")
        got = self.resp.headers.get("Content-Range", "")
        if not got.startswith(f"bytes {self.pos}-"):
            self.resp.close()
            raise SourceError(f"{self.client.host}/{self.repo}: blob {self.digest} resumed "
                              f"at {self.pos} answered Content-Range {got[:80]!r}")

    def close(self) -> None:
        self.resp.close()


class _OneShot:
    """A connection to another host (a redirect's target, a token realm): never pooled."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def close(self) -> None:
        self.conn.close()
