"""A Ray node set up by `warmstart ray-node setup`: the podman commands Ray 2.60 builds for
`runtime_env={"image_uri": ...}` (taken from Ray's own image_uri plugin, not retyped), run
as the non-root Ray user, start from the warmstart layer store; and (slow) a whole Serve
deployment with `image_uri` whose replica streams its weights from S3 inside that image."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess

import pytest
from test_podman import PLAIN, LayerStore, _problem

from warmstart.imageformat.convert import convert
from warmstart.imageformat.layerstore import encode_reference
from warmstart.imageformat.registry_store import RegistryStore
from warmstart.imageformat.testimage import SITE

USER = "warmstart-ray"

pytestmark = pytest.mark.skipif(
    _problem() is not None or shutil.which("useradd") is None
    or shutil.which("runuser") is None,
    reason=str(_problem() or "needs useradd and runuser"))


def _ray_commands(image: str, ray_tmp: str) -> tuple[list[str], str]:
    """Ray's own pull command and worker command prefix for `image`."""
    ray = pytest.importorskip("ray")
    del ray
    import inspect
    import logging

    from ray._private.runtime_env import image_uri
    from ray._private.runtime_env.context import RuntimeEnvContext
    ctx = RuntimeEnvContext()
    image_uri._modify_context_impl(image, "/worker.py", [], ctx, logging.getLogger("t"),
                                   ray_tmp)
    src = inspect.getsource(image_uri._create_impl)
    assert '"podman",\n            "run",\n            "--rm",\n            "-v",' in src
    pull = ["podman", "run", "--rm", "-v", f"{ray_tmp}:/shared:Z", image]  # as Ray runs it
    return pull, ctx.py_executable


def _as_user(cmd: str, timeout: float = 180) -> subprocess.CompletedProcess:
    pw = pwd.getpwnam(USER)
    env = {"HOME": pw.pw_dir, "USER": USER, "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin",
           "XDG_RUNTIME_DIR": f"/tmp/warmstart-ray-run-{pw.pw_uid}"}
    os.makedirs(env["XDG_RUNTIME_DIR"], exist_ok=True)
    os.chown(env["XDG_RUNTIME_DIR"], pw.pw_uid, pw.pw_gid)
    os.chmod(env["XDG_RUNTIME_DIR"], 0o700)
    return subprocess.run(["runuser", "-u", USER, "--", "sh", "-c", cmd], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd="/")


def test_ray_image_uri_commands_start_from_the_layer_store(registry_images, tmp_path):
    from warmstart.cli import main
    host = registry_images
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
                    "--dest-tls-verify=false", f"docker://{host}/x:v2",
                    f"docker://{host}/rayimg:v2"], check=True, capture_output=True, timeout=120)
    with RegistryStore.open_registry(f"docker://{host}/rayimg", PLAIN) as s:
        convert(f"docker://{host}/rayimg:v2", s, "v2", registry=PLAIN)
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "-m", USER], check=True)
    import pathlib
    import tempfile
    base = pathlib.Path(tempfile.mkdtemp(prefix="warmstart-ray-", dir="/tmp"))
    os.chmod(base, 0o755)  # the Ray user reaches the layer store and Ray's tmp dir
    store = None
    try:
        assert main(["ray-node", "setup", "--user", USER, "--layer-store", str(base / "layers"),
                     "--insecure-registry", host]) == 0
        store = LayerStore(base, "--map-user", USER)
        ray_tmp = str(base / "raytmp")
        os.makedirs(ray_tmp)
        os.chmod(ray_tmp, 0o777)
        image = f"{host}/rayimg:v2"
        pull, worker = _ray_commands(image, ray_tmp)
        # the image has python3 only; Ray's first command runs `python -c ...` in it
        out = _as_user(" ".join(pull) + " /usr/bin/python3 -c 'print(42)'")
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip() == "42"
        info = _as_user("podman info --format json")
        assert info.returncode == 0, info.stderr[-2000:]
        doc = json.loads(info.stdout)
        assert doc["store"]["graphOptions"]["overlay.additionallayerstore"] == \
            f"{store.dir}:ref"
        layers = _as_user("podman image inspect --format '{{json .RootFS.Layers}}' " + image)
        assert layers.returncode == 0, layers.stderr[-2000:]
        # the worker command Ray builds: keep-id, host network/pid/ipc, python entrypoint
        assert "--userns=keep-id" in worker and "--ipc=host" in worker
        w = _as_user(worker.replace("--entrypoint python", "--entrypoint /usr/bin/python3")
                     + " -c 'import os; print(os.getuid())'")
        assert w.returncode == 0, w.stderr[-3000:]
        assert w.stdout.strip() == str(pwd.getpwnam(USER).pw_uid)
        assert "in use" in store.text()  # podman took the layers from the store
    finally:
        _as_user("podman system reset -f")
        if store is not None:
            store.stop()
        shutil.rmtree(base, ignore_errors=True)


RAY_PACKAGES = os.environ.get("WARMSTART_TEST_RAY_SITE", "/tmp/ws-raypkgs/site")
IN_IMAGE = f"/{SITE}/"

SERVE_APP = """
import hashlib, json, os, sys
import ray
from ray import serve
from warmstart.ray_serve import preload
image, ray_tmp, port, uri, env = sys.argv[1:6]
ray.init(_temp_dir=ray_tmp, include_dashboard=False, num_cpus=2)
serve.start(http_options={"host": "127.0.0.1", "port": int(port)})

@serve.deployment(ray_actor_options={"runtime_env": {"image_uri": image,
                                                     "env_vars": json.loads(env)}})
@preload(uri, sharing={"mode": "off"})
class InImage:
    def __init__(self, weights):
        self.weights = weights

    def __call__(self):
        import torch
        import warmstart._native
        digests = {}
        for name, t in self.weights.items():
            raw = t.contiguous().view(torch.uint8) if t.numel() else b""
            digests[name] = hashlib.sha256(bytes(raw.numpy()) if t.numel() else raw).hexdigest()
        with open("/etc/os-release") as f:
            return {"uid": os.getuid(), "container": os.path.exists("/run/.containerenv"),
                    "os": f.read().strip(), "torch": torch.__file__,
                    "native": warmstart._native.__file__, "digests": digests}

handle = serve.run(InImage.bind(), name="lazy", route_prefix=None)
print("ANSWER " + json.dumps(handle.remote().result(timeout_s=600)), flush=True)
serve.shutdown()
ray.shutdown()
"""


def build_replica_image(base, host: str, repo: str) -> str:
    """The replica image (`testimage.build_replica_layout`: python3.11 + Ray, then torch +
    warmstart), pushed to `host/repo:v1`."""
    from imageformat_helpers import run

    from warmstart.imageformat.testimage import build_replica_layout
    layout, _ = build_replica_layout(str(base), RAY_PACKAGES)
    image = f"{host}/{repo}:v1"
    run("skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false", f"oci:{layout}:v1",
        f"docker://{image}", timeout=900)
    shutil.rmtree(layout)
    return image


@pytest.mark.slow
def test_serve_replica_in_image_uri_streams_its_weights(registry, localbucket, tmp_path):
    """A Serve replica with `image_uri` whose class is wrapped in `@preload`: Ray (run as the
    set-up user) has podman start it in an image pulled through the layer store, holding
    Debian's python3.11, Ray 2.60, torch and warmstart; inside the container `preload` streams
    a sharded checkpoint from the S3 server on 127.0.0.1 (host networking) before the
    replica's `__init__`. The replica answers with a digest of every tensor: bit-identical to
    safetensors' own read of the checkpoint. The image is built offline from this machine's
    Debian python and the PyPI wheels pip put in RAY_PACKAGES (`pip install --target DIR
    "ray[serve]==2.60.0"`)."""
    import hashlib
    import pathlib
    import socket
    import tempfile

    from warmstart.cli import main
    from warmstart.imageformat.testimage import add_warmstart, have_system_python
    from warmstart.testing.checkpoints import make_checkpoint
    from warmstart.testing.faultproxy import FaultProxy
    if not have_system_python() or not os.path.isdir(os.path.join(RAY_PACKAGES, "ray")):
        pytest.skip(f"needs Debian's python3.11 and ray[serve] installed in {RAY_PACKAGES}")
    if any(shutil.which(b) is None for b in ("umoci", "chroot", "unshare")):
        pytest.skip("umoci, chroot and unshare are needed to build the image")
    if shutil.which("fuse-overlayfs") is None:
        pytest.skip("fuse-overlayfs is not installed (Debian package fuse-overlayfs): without "
                    "it podman copies the whole lazy image for Ray's --userns=keep-id")
    safetensors = pytest.importorskip("safetensors.torch")
    import torch
    host, _ = registry
    ckpt = make_checkpoint(tmp_path / "ckpt", 24 << 20, shards=2)
    localbucket.create_bucket("serve-image")
    localbucket.upload_tree(ckpt, "serve-image", "ckpt")
    want = {}
    for path in sorted(ckpt.glob("*.safetensors")):
        for name, t in safetensors.load_file(path).items():
            raw = bytes(t.contiguous().view(torch.uint8).numpy()) if t.numel() else b""
            want[name] = hashlib.sha256(raw).hexdigest()
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "-m", USER], check=True)
    base = pathlib.Path(tempfile.mkdtemp(prefix="warmstart-serve-", dir="/tmp"))
    os.chmod(base, 0o755)  # the Ray user reaches the layer store, its tmp dir, the driver
    store = None
    try:
        image = build_replica_image(base, host, "rayserve")
        with RegistryStore.open_registry(f"docker://{host}/rayserve", PLAIN) as s:
            convert(f"docker://{image}", s, "v1", registry=PLAIN)
        assert main(["ray-node", "setup", "--user", USER, "--layer-store",
                     str(base / "layers"), "--insecure-registry", host]) == 0
        store = LayerStore(base, "--map-user", USER)
        app = base / "app.py"
        app.write_text(SERVE_APP)
        ray_tmp = base / "ray"
        ray_tmp.mkdir()
        os.chown(ray_tmp, pwd.getpwnam(USER).pw_uid, pwd.getpwnam(USER).pw_gid)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        # the driver needs warmstart's torch-free `preload` too: the same copy, on the host
        add_warmstart(str(base / "driver"))
        with FaultProxy(localbucket.endpoint) as s3:
            env = {**localbucket.env(), "AWS_ENDPOINT_URL": s3.endpoint}
            # Ray kills a worker not registered within 60 s and starts it again (image pull
            # included); a cold lazy start of Ray + torch on two busy cores can take longer
            out = _as_user(
                "RAY_worker_register_timeout_seconds=600 "
                "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S=300 "
                "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S=300 "
                f"PYTHONPATH={RAY_PACKAGES}:{base / 'driver' / SITE} /usr/bin/python3.11 "
                f"{app} {image} {ray_tmp} {port} s3://serve-image/ckpt/ '{json.dumps(env)}'",
                timeout=900)
            s3.wait_idle(60)
            read = sum(n for key, n in s3.stats().bytes_by_key.items()
                       if key.endswith(".safetensors"))
        answer = [ln for ln in out.stdout.splitlines() if ln.startswith("ANSWER ")]
        assert out.returncode == 0 and answer, (out.stdout[-3000:], out.stderr[-5000:])
        got = json.loads(answer[0][len("ANSWER "):])
        assert got["container"] and got["uid"] == pwd.getpwnam(USER).pw_uid
        assert got["torch"].startswith(IN_IMAGE) and got["native"].startswith(IN_IMAGE)
        assert got["digests"] == want  # every tensor bit-identical to safetensors' read
        assert ckpt_bytes * 0.9 <= read <= ckpt_bytes * 1.5, \
            f"the replica read {read} bytes of a {ckpt_bytes}-byte checkpoint from S3"
        # every layer of the image is the layer store's: the user's podman storage links
        # each layer's diff to the store, and holds no layer of its own (nothing was
        # downloaded or unpacked, and no copy with owners shifted for keep-id was made)
        with RegistryStore.open_registry(f"docker://{host}/rayserve", PLAIN) as s:
            layers = [d["digest"] for d in
                      json.loads(s.client.get_manifest("rayserve", "v1")[0])["layers"]]
        assert len(layers) == 2
        overlay = pathlib.Path(pwd.getpwnam(USER).pw_dir) / ".local/share/containers/storage" \
            / "overlay"
        diffs = [overlay / n / "diff" for n in os.listdir(overlay)
                 if (overlay / n / "diff").exists()]
        prefix = os.path.join(store.dir, encode_reference(image))
        assert sorted(os.readlink(d) for d in diffs if d.is_symlink()) == \
            sorted(f"{prefix}/{d}/diff" for d in layers)
        # the other layers are the containers' own writable ones (Ray's worker containers
        # are not started with --rm), one each
        containers = _as_user("podman ps -aq").stdout.split()
        assert len([d for d in diffs if not d.is_symlink()]) == len(containers)
        assert "in use" in store.text()  # the container ran on the store's lazy mount
    finally:
        _as_user("podman rm -af; podman system reset -f")
        if store is not None:
            store.stop()
        shutil.rmtree(base, ignore_errors=True)
