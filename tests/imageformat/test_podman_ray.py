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
