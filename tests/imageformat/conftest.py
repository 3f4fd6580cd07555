"""Session fixtures for the image-format tests: test rootfs folders, umoci-built OCI
layouts, a docker-archive made by skopeo, and local S3 servers."""

from __future__ import annotations

import os
import shutil

import pytest
from imageformat_helpers import run

from warmstart.imageformat.testimage import build_python_rootfs, have_system_python, make_v2

@pytest.fixture(scope="session")
def py_rootfs(tmp_path_factory):
    if not have_system_python():
        pytest.skip("needs Debian's /usr/bin/python3.11 and /usr/lib/python3.11 to build "
                    "the test rootfs")
    root = str(tmp_path_factory.mktemp("rootfs") / "v1")
    build_python_rootfs(root)
    return root


@pytest.fixture(scope="session")
def py_rootfs_v2(py_rootfs, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("rootfs") / "v2")
    shutil.copytree(py_rootfs, root, symlinks=True)
    make_v2(root)
    return root


@pytest.fixture(scope="session")
def oci_layout(py_rootfs, tmp_path_factory):
    """An OCI layout built by umoci: tag v1 (one layer) and v2 (v1 + a layer with changes
    and whiteouts)."""
    if shutil.which("umoci") is None:
        pytest.skip("umoci is not installed (Debian package 'umoci')")
    base = tmp_path_factory.mktemp("oci")
    layout, b1, b2 = str(base / "layout"), str(base / "b1"), str(base / "b2")
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:v1")
    run("umoci", "unpack", "--image", f"{layout}:v1", b1)
    run("cp", "-a", f"{py_rootfs}/.", f"{b1}/rootfs/")
    run("umoci", "repack", "--image", f"{layout}:v1", b1)
    run("umoci", "unpack", "--image", f"{layout}:v1", b2)
    make_v2(f"{b2}/rootfs")
    run("umoci", "repack", "--image", f"{layout}:v2", b2)
    shutil.rmtree(b1)
    shutil.rmtree(b2)
    return layout


@pytest.fixture(scope="session")
def umoci_unpacked(oci_layout, tmp_path_factory):
    """`umoci unpack` of each tag: the reference tree a runtime would see."""
    out = {}
    for tag in ("v1", "v2"):
        bundle = str(tmp_path_factory.mktemp("ref") / tag)
        run("umoci", "unpack", "--image", f"{oci_layout}:{tag}", bundle)
        out[tag] = os.path.join(bundle, "rootfs")
    return out


@pytest.fixture(scope="session")
def docker_archive(oci_layout, tmp_path_factory):
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed (Debian package 'skopeo')")
    path = str(tmp_path_factory.mktemp("docker") / "image.tar")
    run("skopeo", "--insecure-policy", "copy", f"oci:{oci_layout}:v2",
        f"docker-archive:{path}:test/image:v2")
    return path


@pytest.fixture(scope="session")
def s3_servers():
    from warmstart.testing.s3server import start_server
    servers = {}
    try:
        for kind in ("localbucket", "nanio"):
            servers[kind] = start_server(kind)
            servers[kind].create_bucket("images")
        yield servers
    finally:
        for s in servers.values():
            s.stop()


@pytest.fixture(params=["local", "localbucket", "nanio"])
def store_uri(request, tmp_path, s3_servers):
    """A fresh store on each backend; every store test runs against all of them."""
    from warmstart.imageformat.backends import S3Config
    if request.param == "local":
        return str(tmp_path / "store"), None
    s = s3_servers[request.param]
    cfg = S3Config(s.endpoint, s.access_key, s.secret_key, s.region)
    return f"s3://images/{request.node.name.replace('[', '-').rstrip(']')}-{os.getpid()}", cfg


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_registry(root, extra: str = "") -> tuple:
    """Debian's docker-registry (distribution 2.8) on 127.0.0.1 at a free port, storing
    under `root`; returns (process, "127.0.0.1:PORT")."""
    import subprocess
    import time
    import urllib.error
    import urllib.request
    port = _free_port()
    config = root / "config.yml"
    config.write_text(f"""version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root / 'data'}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
{extra}""")
    # Its log goes to a file, never to a pipe nobody drains: once 64 KiB of error lines
    # (unknown blobs, refused pushes) filled a pipe, the request logging the next line
    # blocked forever while other requests were still answered.
    log_path = root / "registry.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                                stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2).close()
            break
        except urllib.error.HTTPError:
            break  # it answers (401 with auth configured)
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                err = log_path.read_text(errors="replace")[-2000:]
                pytest.fail(f"docker-registry did not start: {err}")
            time.sleep(0.05)
    return proc, f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """A plain-http docker-registry on 127.0.0.1; yields (host:port, storage root)."""
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (Debian package 'docker-registry')")
    root = tmp_path_factory.mktemp("registry")
    proc, host = start_registry(root)
    yield host, root / "data"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def registry_images(registry, oci_layout):
    """The OCI test images v1 and v2, pushed by skopeo as x:v1 and x:v2."""
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed (Debian package 'skopeo')")
    host, _ = registry
    for tag in ("v1", "v2"):
        run("skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false",
            f"oci:{oci_layout}:{tag}", f"docker://{host}/x:{tag}")
    return host


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory, oci_layout):
    """docker-registry with token auth: Bearer challenges answered by tests' token server,
    user alice/secret; x:v1 pushed by skopeo with those credentials. Yields (host, server)."""
    if shutil.which("docker-registry") is None or shutil.which("skopeo") is None:
        pytest.skip("needs docker-registry and skopeo (Debian packages)")
    pytest.importorskip("cryptography", reason="the test token server signs with it")
    from tokenserver import TokenServer
    root = tmp_path_factory.mktemp("auth-registry")
    tokens = TokenServer(root, {"alice": "secret"})
    proc, host = start_registry(root, tokens.registry_config())
    try:
        run("skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false",
            "--dest-creds", "alice:secret", f"oci:{oci_layout}:v1", f"docker://{host}/x:v1")
        yield host, tokens
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        tokens.stop()
