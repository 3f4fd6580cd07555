"""Convert straight from a real registry (Debian's docker-registry, images pushed by skopeo):
tags, digests, multi-platform indexes, streaming, tampering, errors."""

from __future__ import annotations

import json
import os

import pytest
from imageformat_helpers import BLOB, exact_policy, snapshot

from warmstart.cli import main
from warmstart.errors import DigestMismatch, NotFound
from warmstart.imageformat.convert import convert
from warmstart.imageformat.pull import pull
from warmstart.imageformat.registry import RegistryClient
from warmstart.imageformat.registry_config import RegistryOptions
from warmstart.imageformat.sources import parse_platform
from warmstart.imageformat.store import ImageStore

PLAIN = RegistryOptions(plain_http=True)


def test_convert_by_tag_and_digest_matches_the_oci_layout(registry_images, oci_layout,
                                                          umoci_unpacked, tmp_path):
    host = registry_images
    with ImageStore.open(str(tmp_path / "ref")) as s:
        want = convert(f"{oci_layout}:v2", s, "v2", blob_size=BLOB)
    work = tmp_path / "work"
    work.mkdir()
    seen: set[str] = set()

    def progress(_done: int, _total: int) -> None:  # what lies in the work folder while layers stream
        for dirpath, _, files in os.walk(work):
            seen.update(files)

    with ImageStore.open(str(tmp_path / "store")) as s:
        got = convert(f"docker://{host}/x:v2", s, "v2", blob_size=BLOB, registry=PLAIN,
                      workdir=str(work), progress=progress)
        assert got.toc_digest == want.toc_digest and got.digest == want.digest
        assert seen == {"frames.spool"}  # compressed new chunks only, no layer tar
        pull(s, "v2", str(tmp_path / "out"), policy=exact_policy())
    assert snapshot(str(tmp_path / "out")) == snapshot(umoci_unpacked["v2"])

    _, _, digest = RegistryClient(host, PLAIN).get_manifest("x", "v1")
    with ImageStore.open(str(tmp_path / "store")) as s:
        r = convert(f"docker://{host}/x@{digest}", s, "v1", blob_size=BLOB, registry=PLAIN)
        assert r.new_chunks < r.reused_chunks  # v1 shares most chunks with v2


def test_multi_platform_index_resolves_to_the_platform(registry_images, tmp_path):
    host = registry_images
    client = RegistryClient(host, PLAIN)
    entries = []
    for tag, arch in (("v1", "amd64"), ("v2", "arm64")):
        data, media_type, digest = client.get_manifest("x", tag)
        entries.append({"mediaType": media_type, "digest": digest, "size": len(data),
                        "platform": {"os": "linux", "architecture": arch}})
    index = json.dumps({"schemaVersion": 2, "manifests": entries,
                        "mediaType": "application/vnd.oci.image.index.v1+json"}).encode()
    client.put_manifest("x", "multi", index, "application/vnd.oci.image.index.v1+json")
    with ImageStore.open(str(tmp_path / "s")) as s:
        tocs = {}
        for tag in ("v1", "v2"):
            tocs[tag] = convert(f"docker://{host}/x:{tag}", s, tag, registry=PLAIN).toc_digest
        arm = convert(f"docker://{host}/x:multi", s, "arm", registry=PLAIN,
                      platform=parse_platform("linux/arm64"))
        amd = convert(f"docker://{host}/x:multi", s, "amd", registry=PLAIN,
                      platform=parse_platform("linux/amd64"))
        assert arm.toc_digest == tocs["v2"] and amd.toc_digest == tocs["v1"]
        with pytest.raises(NotFound, match="no linux/riscv64 image"):
            convert(f"docker://{host}/x:multi", s, "r", registry=PLAIN,
                    platform=parse_platform("linux/riscv64"))


def test_a_tampered_registry_blob_is_refused(registry, tmp_path):
    import gzip
    import subprocess

    from imageformat_helpers import write_oci_layout
    from test_hostile_layers import tar_bytes
    host, data_root = registry
    layer = gzip.compress(tar_bytes([("f", "file", os.urandom(1 << 20))]))  # its own blob
    source = write_oci_layout(str(tmp_path / "layout"), [layer])
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false",
                    f"oci:{source}", f"docker://{host}/tamper:v1"], check=True,
                   capture_output=True, timeout=120)
    import hashlib
    hexd = hashlib.sha256(layer).hexdigest()
    path = data_root / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    with open(path, "r+b") as f:
        f.seek(len(layer) // 2)
        f.write(b"tampered")
    with ImageStore.open(str(tmp_path / "s")) as s, \
            pytest.raises(DigestMismatch, match="tamper:v1 layer 0"):
        convert(f"docker://{host}/tamper:v1", s, "v1", registry=PLAIN)


def test_cli_convert_from_registry_and_missing_images(registry_images, tmp_path, capsys):
    host = registry_images
    store = str(tmp_path / "s")
    rc = main(["image", "convert", f"docker://{host}/x:v1", "--plain-http", "--store", store,
               "--tag", "v1"])
    out = capsys.readouterr().out
    assert rc == 0 and json.loads(out)["new_chunks"] > 0
    rc = main(["image", "convert", f"docker://{host}/x:nope", "--plain-http", "--store",
               store, "--tag", "x"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "HTTP 404" in err and "x:nope" in err
    rc = main(["image", "convert", f"docker://{host}/x:v1", "--store", store, "--tag", "x"])
    err = capsys.readouterr().err  # https to a plain-http registry: a named error, no hang
    assert rc == 1 and err.count("\n") == 1 and host in err


def _auth_file(path, host, user, password) -> str:
    import base64
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {f"http://{host}": {"auth": auth}}}))
    return str(path)


def test_bearer_token_auth_with_credentials_from_the_auth_file(auth_registry, tmp_path):
    from warmstart.errors import AccessDenied
    host, tokens = auth_registry
    source = f"docker://{host}/x:v1"
    with ImageStore.open(str(tmp_path / "s")) as s:
        with pytest.raises(AccessDenied, match=host):
            convert(source, s, "v1", registry=PLAIN)  # anonymous: the token grants nothing
        bad = _auth_file(tmp_path / "bad.json", host, "alice", "wrong")
        with pytest.raises(AccessDenied, match="refused the credentials"):
            convert(source, s, "v1", registry=RegistryOptions.from_env(
                {"REGISTRY_AUTH_FILE": bad}, plain_http=True))
        before = tokens.issued
        docker = tmp_path / "docker"
        docker.mkdir()
        _auth_file(docker / "config.json", host, "alice", "secret")
        opts = RegistryOptions.from_env({"DOCKER_CONFIG": str(docker)}, plain_http=True)
        r = convert(source, s, "v1", registry=opts)
        assert r.new_chunks > 0 and tokens.issued > before


@pytest.mark.parametrize("fault", ["reset_mid_body", "truncate"])
def test_a_layer_stream_cut_short_resumes_from_the_next_byte(registry_images, tmp_path, fault):
    from warmstart.testing import faultproxy as fp
    host = registry_images
    with ImageStore.open(str(tmp_path / "direct")) as s:
        want = convert(f"docker://{host}/x:v2", s, "v2", registry=PLAIN).toc_digest
    with fp.FaultProxy(f"http://{host}") as proxy:
        rule = proxy.add_rule(getattr(fp, fault)(200_000), method="GET", key="/blobs/",
                              ranged=False, max_count=2)
        via = proxy.endpoint.removeprefix("http://")
        with ImageStore.open(str(tmp_path / "s")) as s:
            got = convert(f"docker://{via}/x:v2", s, "v2", registry=PLAIN)
        assert rule.faulted >= 1 and got.toc_digest == want
        proxy.clear_rules()
        proxy.add_rule(getattr(fp, fault)(200_000), method="GET", key="/blobs/")
        from warmstart.errors import RetriesExhausted
        with ImageStore.open(str(tmp_path / "t")) as s, \
                pytest.raises(RetriesExhausted, match="resumed 3 times"):
            convert(f"docker://{via}/x:v2", s, "v2", registry=PLAIN)


@pytest.mark.parametrize("text", ["docker://x", "docker://host/Repo:v1", "docker://h.io/r:",
                                  "docker://h.io/r@sha256:abc", "docker://h.io/r:" + "t" * 129,
                                  "docker://h.io//r", "docker://noport/r"])
def test_bad_references_are_one_clear_error(text):
    from warmstart.errors import ConfigError
    from warmstart.imageformat.registry_config import Reference
    with pytest.raises(ConfigError, match="docker://|not valid|digest"):
        Reference.parse(text)


def test_references_and_auth_files_parse(tmp_path):
    from warmstart.errors import ConfigError
    from warmstart.imageformat.registry_config import Reference, load_auth_file
    r = Reference.parse("docker://127.0.0.1:5000/a/b-c:v1.2@sha256:" + "0" * 64)
    assert (r.host, r.repo, r.tag, r.digest) == ("127.0.0.1:5000", "a/b-c", "v1.2",
                                                 "sha256:" + "0" * 64)
    assert Reference.parse("localhost/x").ref == "latest"
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": "dTpw"},  # u:p
        "reg.example:5000": {"username": "a", "password": "b"}, "bad": "no"}}))
    auths = load_auth_file(str(path))
    hub = auths["registry-1.docker.io"]  # the host Docker Hub answers on
    assert (hub.username, hub.password) == ("u", "p")
    assert auths["reg.example:5000"].password == "b" and "bad" not in auths
    path.write_text('{"auths": {"h": {"auth": "%%%"}}}')
    with pytest.raises(ConfigError, match="not base64"):
        load_auth_file(str(path))
    path.write_text("{nope")
    with pytest.raises(ConfigError, match="not a readable auth file"):
        load_auth_file(str(path))


def test_docker_hub_names_map_to_its_api_host():
    from warmstart.imageformat.registry_config import Reference
    r = Reference.parse("docker://docker.io/python:3.11")
    assert (r.host, r.repo, r.tag) == ("registry-1.docker.io", "library/python", "3.11")


class _Front:
    """A front for the registry on another port, as CDNs and object stores sit behind real
    registries: blob GETs are redirected (307) to the registry itself, and every other answer
    is relayed with chunked transfer encoding."""

    def __init__(self, upstream: str) -> None:
        import http.server
        import threading
        import urllib.request
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a) -> None:
                pass

            def do_GET(self) -> None:
                if "/blobs/" in self.path:
                    front.redirected += 1
                    self.send_response(307)
                    self.send_header("Location", f"http://{upstream}{self.path}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                req = urllib.request.Request(f"http://{upstream}{self.path}",
                                             headers={"Accept": self.headers.get("Accept", "")})
                try:
                    with urllib.request.urlopen(req) as r:
                        status, headers, body = r.status, r.headers, r.read()
                except urllib.error.HTTPError as e:
                    status, headers, body = e.code, e.headers, e.read()
                self.send_response(status)
                for k in ("Content-Type", "Docker-Content-Digest"):
                    if headers.get(k):
                        self.send_header(k, headers[k])
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(0, len(body), 100):  # many small chunks
                    part = body[i:i + 100]
                    self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
                front.chunked += 1

        self.redirected = self.chunked = 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_redirected_blobs_and_chunked_answers_go_through_the_storage_data_path(
        registry_images, tmp_path):
    """Blob reads (streamed layers and ranged reads) follow a registry's redirect to another
    host, and manifests sent with chunked transfer encoding are read whole."""
    host = registry_images
    with ImageStore.open(str(tmp_path / "direct")) as s:
        want = convert(f"docker://{host}/x:v2", s, "v2", registry=PLAIN).toc_digest
    front = _Front(host)
    try:
        with ImageStore.open(str(tmp_path / "s")) as s:
            got = convert(f"docker://{front.host}/x:v2", s, "v2", registry=PLAIN)
        assert got.toc_digest == want and front.redirected >= 1 and front.chunked >= 1
        direct, via = RegistryClient(host, PLAIN), RegistryClient(front.host, PLAIN)
        data, _, digest = via.get_manifest("x", "v2")
        assert data == direct.get_manifest("x", "v2")[0]
        layer = json.loads(data)["layers"][0]["digest"]
        before = front.redirected
        assert via.read_blob("x", layer, 7, 1000) == direct.read_blob("x", layer, 7, 1000)
        assert front.redirected == before + 1
        direct.close()
        via.close()
    finally:
        front.close()
