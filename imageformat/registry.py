"""Talk to an OCI distribution (v2) registry: the only module that speaks its protocol.

`RegistryClient` has a narrow surface: get a manifest, stream a blob, read a byte range of a
blob, and (for a registry used as an image store) upload blobs and manifests, list tags and
ask for referrers. What is the registry's own stays here: the API's paths, the auth
challenge (anonymous first, then on a 401 a Bearer token from the realm it names, with the
user's credentials when there are any, or Basic credentials; `registry_config` reads them),
redirects of blob reads to another host (sent without our credentials), and resuming a layer
stream cut short. The transport is warmstart.storage's: ranged blob reads are
`http.ranged_get_into` (received straight into the caller's buffer, http or https), other
requests `request.send` on the same pool; answers map through the one error table
(401/403 AccessDenied, 404 NotFound, 429/5xx Retryable, no connection EndpointUnreachable) and
reads are retried by the one retry policy (`RetryPolicy`, `attempt_blocking`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from warmstart.errors import (AccessDenied, DigestMismatch, ImageFormatError, NotFound,
                              RetriesExhausted, Retryable, SourceError)
from warmstart.storage.http import ConnectionPool, Url, ranged_get_into, tls_context
from warmstart.storage.request import Answer, send
from warmstart.storage.retry import RetryPolicy, attempt_blocking
from warmstart.storage.source import Target

from .registry_config import Credentials, RegistryOptions

MANIFEST_ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"))
MAX_MANIFEST = 4 << 20
REDIRECTS = (301, 302, 303, 307, 308)
MAX_HOPS = 6


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


def _full(url: Url) -> str:
    return f"{url.scheme}://{url.netloc}{url.target}"


class RegistryClient:
    def __init__(self, host: str, options: RegistryOptions | None = None) -> None:
        self.host, self.options = host, options or RegistryOptions()
        self.scheme = "http" if self.options.plain_http else "https"
        self.creds = self.options.auths.get(host, Credentials())
        tls = None if self.options.plain_http else tls_context(self.options.ca_file)
        self.pool = ConnectionPool(self.options.timeout, self.options.timeout, tls)
        self.retry = RetryPolicy(max_attempts=self.options.attempts, base_delay=0.2)
        self._auth: dict[str, str] = {}  # scope -> Authorization header value

    def close(self) -> None:
        self.pool.close()

    def _url(self, path: str) -> Url:
        return Url.parse(f"{self.scheme}://{self.host}{path}")

    # --- auth -------------------------------------------------------------------------
    def _scope(self, repo: str, write: bool) -> str:
        return f"repository:{repo}:{'pull,push' if write else 'pull'}"

    def _basic(self) -> str:
        raw = f"{self.creds.username}:{self.creds.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _token(self, challenge: str, scope: str) -> str:
        scheme, params = _challenge(challenge)
        if scheme == "basic":
            if self.creds.username is None:
                raise AccessDenied(f"{self.host}: needs credentials (docker login / "
                                   "REGISTRY_AUTH_FILE)")
            return self._basic()
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
            headers["Authorization"] = self._basic()
        url = Url.parse(params["realm"] + ("&" if "?" in params["realm"] else "?")
                        + urllib.parse.urlencode(query))
        answer = send(self.pool, url, "GET", f"{self.host}: token from {params['realm']}",
                      headers)
        body = answer.read(1 << 20)
        answer.close()
        if answer.status in (401, 403):
            raise AccessDenied(f"{self.host}: token server {params['realm']} refused "
                               f"{'the credentials' if headers else 'anonymous access'} "
                               f"({answer.status})")
        if answer.status != 200:
            raise SourceError(f"{self.host}: token server answered {answer.status}")
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise SourceError(f"{self.host}: token server sent no token")
        return "Bearer " + token

    # --- requests ---------------------------------------------------------------------
    def request(self, method: str, path: str, *, repo: str, headers: dict | None = None,
                body: bytes | None = None, ok: tuple[int, ...] = (200,),
                what: str = "") -> Answer:
        """Sends `method path`, answering an auth challenge once and following redirects
        (without our credentials when they leave the registry); reads are retried by the
        storage retry policy, writes are tried once. Returns the answer, body unread."""
        write = method not in ("GET", "HEAD")
        scope = self._scope(repo, write)
        what = f"{self.host}: {what or f'{method} {path}'}"

        def once() -> Answer:
            return self._request_once(method, path, scope, headers or {}, body or b"", ok,
                                      what)
        return once() if write else attempt_blocking(self.retry, what, once)

    def _request_once(self, method, path, scope, headers, body, ok, what) -> Answer:
        url = self._url(path)
        challenged = False
        for _hop in range(MAX_HOPS):
            h = dict(headers)
            own = url.netloc == self.host
            if own and scope in self._auth:
                h["Authorization"] = self._auth[scope]
            answer = send(self.pool, url, method, what, h, body)
            if answer.status == 401 and own and not challenged:
                challenge = answer.header("WWW-Authenticate")
                answer.read(1 << 16)
                answer.close()
                self._auth[scope] = self._token(challenge, scope)
                challenged = True
                continue
            if answer.status in REDIRECTS and method in ("GET", "HEAD"):
                location = answer.header("Location")
                answer.read(1 << 16)
                answer.close()
                url = Url.parse(urllib.parse.urljoin(_full(url), location))
                continue
            if answer.status in ok:
                return answer
            detail = answer.read(2048).decode("utf-8", "replace").strip().replace("\n", " ")
            raise answer.error(what, detail[:300])
        raise SourceError(f"{what}: too many redirects")

    def read_blob_into(self, repo: str, digest: str, offset: int, target: Target) -> None:
        """Bytes [offset, offset + target.nbytes) of a blob, received into `target` by one
        ranged GET on the storage data path (retried by its policy)."""
        scope = self._scope(repo, False)
        what = f"{self.host}/{repo}: blob {digest} [{offset}, +{target.nbytes})"

        def once() -> None:
            url = self._url(f"/v2/{repo}/blobs/{digest}")
            challenged = False
            for _hop in range(MAX_HOPS):
                own = url.netloc == self.host
                headers = {"Authorization": self._auth[scope]} \
                    if own and scope in self._auth else None
                try:
                    ranged_get_into(self.pool, url, offset, target, what, headers)
                    return
                except SourceError as exc:
                    status = getattr(exc, "status", None)
                    answer = getattr(exc, "headers", None) or {}
                    if status == 401 and own and not challenged:
                        challenge = answer.get(b"www-authenticate", b"").decode("latin-1")
                        self._auth[scope] = self._token(challenge, scope)
                        challenged = True
                        continue
                    if status in REDIRECTS and answer.get(b"location"):
                        location = answer[b"location"].decode("latin-1")
                        url = Url.parse(urllib.parse.urljoin(_full(url), location))
                        continue
                    raise
            raise SourceError(f"{what}: too many redirects")
        attempt_blocking(self.retry, what, once)

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
        said = resp.header("Docker-Content-Digest") or None
        if (ref.startswith("sha256:") and digest != ref) or (said and said != digest):
            raise DigestMismatch(f"{self.host}/{repo}: manifest {ref} hashes to {digest}")
        media_type = resp.header("Content-Type").split(";")[0].strip()
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
        """`length` bytes of the blob from `offset` (see `read_blob_into`)."""
        buf = bytearray(length)
        if length:
            self.read_blob_into(repo, digest, offset, Target.of(buf))
        return bytes(buf)

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
        location = resp.header("Location")
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
        return {k.decode("latin-1"): v.decode("latin-1") for k, v in resp.headers.items()}

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
        if "application/vnd.oci.image.index.v1+json" not in resp.header("Content-Type"):
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
                data = self.resp.read(n if n >= 0 else 1 << 62)
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
        got = self.resp.header("Content-Range")
        if not got.startswith(f"bytes {self.pos}-"):
            self.resp.close()
            raise SourceError(f"{self.client.host}/{self.repo}: blob {self.digest} resumed "
                              f"at {self.pos} answered Content-Range {got[:80]!r}")

    def close(self) -> None:
        self.resp.close()
