"""A Ray node set up by `warmstart ray-node setup`: the podman commands Ray 2.60 builds for
`runtime_env={"image_uri": ...}` (taken from Ray's own image_uri plugin, not retyped), run
as the non-root Ray user, start from the warmstart layer store."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess

import pytest
from test_podman import PLAIN, LayerStore, _problem

from warmstart.imageformat.convert import convert
from warmstart.imageformat.registry_store import RegistryStore

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

SERVE_APP = """
import json, os, sys
import ray
from ray import serve
ray.init(_temp_dir=sys.argv[2], include_dashboard=False, num_cpus=2)
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[3])})

@serve.deployment(ray_actor_options={"runtime_env": {"image_uri": sys.argv[1]}})
class InImage:
    def __call__(self):
        with open("/etc/os-release") as f:
            return {"uid": os.getuid(), "container": os.path.exists("/run/.containerenv"),
                    "os": f.read().strip()}

handle = serve.run(InImage.bind(), name="lazy", route_prefix=None)
print("ANSWER " + json.dumps(handle.remote().result(timeout_s=600)), flush=True)
serve.shutdown()
ray.shutdown()
"""


def _add_stdlib_libs(root: str) -> None:
    """The system libraries the stdlib's extension modules link against (libffi for ctypes,
    which Ray imports, libssl, ...), copied from this machine when the image lacks them."""
    from warmstart.imageformat.testimage import _libs
    dynload = os.path.join(root, "usr/lib/python3.11/lib-dynload")
    for name in sorted(os.listdir(dynload)):
        try:
            libs = _libs(os.path.join(dynload, name))
        except subprocess.CalledProcessError:
            continue
        for lib in libs:
            if not lib.startswith(("/lib/", "/usr/lib/", "/lib64/")):
                continue
            rel = lib.lstrip("/")
            rel = "usr/" + rel if rel.startswith(("lib/", "lib64/")) else rel
            dest = os.path.join(root, rel)
            if not os.path.exists(dest):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copy2(os.path.realpath(lib), dest)


@pytest.mark.slow
def test_serve_deployment_with_image_uri_starts_from_the_layer_store(registry, tmp_path):
    """A Serve replica with `image_uri`: Ray (run as the set-up user) has podman start it in
    an image holding Debian's python3.11 and Ray 2.60 from PyPI, pulled through the layer
    store. The image is built offline from this machine's Debian python and the PyPI wheels
    pip put in RAY_PACKAGES (`pip install --target DIR "ray[serve]==2.60.0"`)."""
    import pathlib
    import socket
    import tempfile

    from warmstart.cli import main
    from warmstart.imageformat.testimage import (add_full_stdlib, add_shared_libs,
                                                 build_python_rootfs, have_system_python)
    if not have_system_python() or not os.path.isdir(os.path.join(RAY_PACKAGES, "ray")):
        pytest.skip(f"needs Debian's python3.11 and ray[serve] installed in {RAY_PACKAGES}")
    if shutil.which("umoci") is None:
        pytest.skip("umoci is not installed")
    host, _ = registry
    base = pathlib.Path(tempfile.mkdtemp(prefix="warmstart-serve-", dir="/tmp"))
    os.chmod(base, 0o755)
    root = str(base / "rootfs")
    build_python_rootfs(root)
    add_full_stdlib(root)
    os.symlink("python3.11", os.path.join(root, "usr/bin/python"))
    shutil.copytree(RAY_PACKAGES, os.path.join(root, "usr/lib/python3/dist-packages"),
                    symlinks=True, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    add_shared_libs(root)
    _add_stdlib_libs(root)
    os.makedirs(os.path.join(root, "tmp"), exist_ok=True)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    layout = str(base / "layout")
    from imageformat_helpers import run
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:v1")
    run("umoci", "unpack", "--image", f"{layout}:v1", str(base / "bundle"))
    run("cp", "-a", f"{root}/.", str(base / "bundle" / "rootfs"))
    run("umoci", "repack", "--image", f"{layout}:v1", str(base / "bundle"), timeout=600)
    image = f"{host}/rayserve:v1"
    run("skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false", f"oci:{layout}:v1",
        f"docker://{image}", timeout=600)
    with RegistryStore.open_registry(f"docker://{host}/rayserve", PLAIN) as s:
        convert(f"docker://{image}", s, "v1", registry=PLAIN)
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "-m", USER], check=True)
    store = None
    try:
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
        out = _as_user(f"PYTHONPATH={RAY_PACKAGES} /usr/bin/python3.11 {app} {image} "
                       f"{ray_tmp} {port}", timeout=900)
        answer = [ln for ln in out.stdout.splitlines() if ln.startswith("ANSWER ")]
        assert out.returncode == 0 and answer, (out.stdout[-3000:], out.stderr[-5000:])
        got = json.loads(answer[0][len("ANSWER "):])
        assert got["container"] and got["uid"] == pwd.getpwnam(USER).pw_uid
        assert "in use" in store.text()  # podman took the image's layers from the store
    finally:
        _as_user("podman rm -af; podman system reset -f")
        if store is not None:
            store.stop()
        shutil.rmtree(base, ignore_errors=True)
