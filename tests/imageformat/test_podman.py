"""The podman/CRI-O additional layer store end to end: real podman 4.3 with runc, a private
storage root whose storage.conf names the warmstart layer store, images in docker-registry.
`podman pull` takes every layer from the store (nothing is downloaded), `podman run` starts
from the lazy mount, and the container's root file system equals podman's own pull."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from imageformat_helpers import snapshot

from warmstart.imageformat.convert import convert
from warmstart.imageformat.layerstore import encode_reference, layer_diff_digest
from warmstart.imageformat.registry_config import RegistryOptions
from warmstart.imageformat.registry_store import RegistryStore

PLAIN = RegistryOptions(plain_http=True)
NEEDS = ("podman", "runc", "fusermount3", "skopeo", "docker-registry")


def _problem() -> str | None:
    if os.geteuid() != 0:
        return "the test runs podman as root (overlay mounts of a private storage root)"
    missing = [b for b in NEEDS if shutil.which(b) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (Debian: podman, runc, fuse3, skopeo, " \
               "docker-registry)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    import importlib.util
    if importlib.util.find_spec("pyfuse3") is None:
        return "pyfuse3 is not installed (the layer store serves FUSE: pip install -e '.[image]')"
    return None


pytestmark = pytest.mark.skipif(_problem() is not None, reason=str(_problem()))


class Podman:
    """podman with its own root, run root, storage.conf and (optionally) the layer store."""

    def __init__(self, base, layer_store: str | None) -> None:
        import tempfile
        self.base = base
        (base / "tmp").mkdir(parents=True)
        self.runroot = tempfile.mkdtemp(prefix="ws-podman-", dir="/tmp")  # podman: <= 50 chars
        conf = base / "storage.conf"
        extra = f'additionallayerstores = ["{layer_store}:ref"]' if layer_store else ""
        conf.write_text(f"""[storage]
driver = "overlay"
graphroot = "{base}/root"
runroot = "{self.runroot}"
[storage.options]
{extra}
""")
        self.env = dict(os.environ, CONTAINERS_STORAGE_CONF=str(conf), TMPDIR=str(base))

    def __call__(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        # the roots come from storage.conf: podman drops its storage options on --root
        cmd = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs",
               "--events-backend", "file", "--tmpdir", f"{self.base}/tmp", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             env=self.env)
        assert out.returncode == 0, f"{cmd}: {out.stderr[-3000:]}"
        return out

    def run(self, ref: str, *cmd: str) -> str:
        return self("run", "--rm", "--ulimit", "nofile=20000:20000", "--ulimit",
                    "nproc=4096:4096", ref, *cmd).stdout

    def rootfs(self, ref: str) -> dict:
        """The created container's merged root file system, as a snapshot."""
        cid = self("create", ref, "/bin/true").stdout.strip()
        merged = self("mount", cid).stdout.strip()
        try:
            return snapshot(merged)
        finally:
            self("umount", cid)
            self("rm", cid)

    def reset(self) -> None:
        subprocess.run(["podman", "--runtime", "runc", "system", "reset", "-f"],
                       capture_output=True, env=self.env, timeout=120)
        shutil.rmtree(self.runroot, ignore_errors=True)


class LayerStore:
    def __init__(self, base, *extra: str) -> None:
        self.dir = str(base / "layers")
        self.cache = str(base / "cache")
        self.log = open(base / "layer-store.log", "w+b")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "warmstart.imageformat.cli", "layer-store", self.dir,
             "--cache", self.cache, "--plain-http", *extra], stdout=self.log, stderr=self.log,
            env=dict(os.environ, WARMSTART_LOG="INFO"))
        deadline = time.monotonic() + 60
        while not os.path.ismount(self.dir):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"layer store did not mount: {self.text()[-3000:]}")
            time.sleep(0.05)

    def text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=60) == 0, self.text()[-3000:]


@pytest.fixture(scope="module")
def twin_v2(registry_images):
    host = registry_images
    with RegistryStore.open_registry(f"docker://{host}/x", PLAIN) as s:
        res = convert(f"docker://{host}/x:v2", s, "v2", registry=PLAIN)
        manifest = json.loads(s.client.get_manifest("x", "v2")[0])
    return f"{host}/x:v2", res.digest, [d["digest"] for d in manifest["layers"]]


def _layer_diffs(base) -> list[str]:
    """Where podman's overlay layers' diff folders point (a symlink for a store layer)."""
    root = base / "root" / "overlay"
    out = []
    for name in sorted(os.listdir(root)):
        diff = root / name / "diff"
        if name != "l" and os.path.lexists(diff):
            out.append(os.readlink(diff) if os.path.islink(diff) else "")
    return out


def test_podman_pulls_nothing_and_runs_from_the_layer_store(twin_v2, tmp_path):
    ref, twin, layers = twin_v2
    store = LayerStore(tmp_path)
    try:
        lazy, plain = Podman(tmp_path / "lazy", store.dir), Podman(tmp_path / "plain", None)
    except BaseException:
        store.stop()
        raise
    try:
        pulled = lazy("pull", "--tls-verify=false", ref)
        assert "Additional Layer Store" not in pulled.stderr  # use/release notices taken
        # every layer of the pulled image is the layer store's (nothing was unpacked)
        diffs = _layer_diffs(tmp_path / "lazy")
        prefix = os.path.join(store.dir, encode_reference(ref))
        assert sorted(diffs) == sorted(f"{prefix}/{d}/diff" for d in layers)
        top = os.path.realpath(f"{prefix}/{layers[-1]}/diff")
        assert os.path.ismount(top) and top != f"{prefix}/{layers[-1]}/diff"
        assert os.listdir(f"{prefix}/{layers[0]}/diff") == []  # the placeholder below
        info = json.loads(open(f"{prefix}/{layers[0]}/info").read())
        assert info["compressed-diff-digest"] == layers[0]
        assert info["diff-digest"].startswith("sha256:") and info["diff-digest"] != layers[0]
        import hashlib
        with open(f"{prefix}/{layers[0]}/blob", "rb") as f:  # the registry's blob, verified
            assert "sha256:" + hashlib.sha256(f.read()).hexdigest() == layers[0]
        out = lazy.run(ref, "/usr/bin/python3", "-c",
                       "print(open('/etc/os-release').read().strip())")
        assert 'VERSION="2"' in out
        plain("pull", "--tls-verify=false", ref)
        got, want = lazy.rootfs(ref), plain.rootfs(ref)
        # the image's layers have no entry for "/" itself, so its mode is the runtime's
        # choice: podman gives an unpacked layer 0555, the twin keeps 0755 (as umoci and
        # containerd do); every entry below it is identical, content, owners, modes, times
        root_got, root_want = got.pop("."), want.pop(".")
        assert root_got[:1] + root_got[2:] == root_want[:1] + root_want[2:]
        assert got == want
    finally:
        lazy.reset()
        plain.reset()
        store.stop()
    assert not os.path.ismount(store.dir)
    assert not os.path.ismount(top)  # the lazy mount went with the store


def test_an_image_without_a_twin_is_not_in_the_store(registry, oci_layout, tmp_path):
    host, _ = registry
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false",
                    f"oci:{oci_layout}:v1", f"docker://{host}/podman-plain:v1"], check=True,
                   capture_output=True, timeout=120)
    store = LayerStore(tmp_path)
    try:
        assert not os.path.exists(os.path.join(store.dir, encode_reference(
            f"{host}/podman-plain:v1")))
        assert not os.path.exists(os.path.join(store.dir, "not base64!"))
        assert os.listdir(store.dir) == []
    finally:
        store.stop()
    assert "no lazy layers" in store.text()


def test_layer_diff_digests_are_the_twins_own():
    from warmstart.imageformat.layerstore import Layer
    a = Layer("sha256:" + "1" * 64, 10, "application/vnd.oci.image.layer.v1.tar+gzip", 0, False)
    d1 = layer_diff_digest("sha256:" + "a" * 64, a)
    assert d1 == layer_diff_digest("sha256:" + "a" * 64, a)
    assert d1 != layer_diff_digest("sha256:" + "b" * 64, a)


PODMAN_GLOBAL = ["--podman-arg=--runtime=runc", "--podman-arg=--cgroup-manager=cgroupfs",
                 "--podman-arg=--events-backend=file"]
PODMAN_RUN = ["--podman-run-arg=--ulimit=nofile=20000:20000",
              "--podman-run-arg=--ulimit=nproc=4096:4096"]


def test_a_profile_recorded_by_podman_is_prefetched_when_podman_pulls(
        registry_images, tmp_path, capsys, monkeypatch):
    """`record --podman`: the start-up runs as a podman container over the recording mount;
    a fresh layer store's lazy mount then fetches the profile's chunks as soon as podman
    pulls, before any container reads a byte."""
    from warmstart.cli import main
    host = registry_images
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
                    "--dest-tls-verify=false", f"docker://{host}/x:v2",
                    f"docker://{host}/podrec:v2"], check=True, capture_output=True, timeout=120)
    uri = f"docker://{host}/podrec"
    with RegistryStore.open_registry(uri, PLAIN) as s:
        convert(f"docker://{host}/podrec:v2", s, "v2", registry=PLAIN)
    recorder = Podman(tmp_path / "recorder", None)  # its own storage, not the machine's
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", recorder.env["CONTAINERS_STORAGE_CONF"])
    try:
        rc = main(["image", "record", "v2", "--store", uri, "--plain-http", "--podman",
                   *PODMAN_GLOBAL, *PODMAN_RUN, "--", "/usr/bin/python3", "-c",
                   "import json; print(json.dumps(1))"])
    finally:
        recorder.reset()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["chunks"] > 0
    with RegistryStore.open_registry(uri, PLAIN) as s:
        image = s.open_image("v2")
    assert image.profile is not None and image.digest == out["digest"]
    by_path = {c.digest: e.path for e in image.toc.entries for c in e.chunks}
    read = [by_path[d] for d in image.profile.chunks]
    assert read.index("usr/bin/python3.11") < read.index("usr/lib/python3.11/json/__init__.py")

    store = LayerStore(tmp_path)
    node = Podman(tmp_path / "node", store.dir)
    try:
        node("pull", "--tls-verify=false", f"{host}/podrec:v2")
        want = {os.path.join(store.cache, "data", d[:2], d) for d in image.profile.chunks}
        deadline = time.monotonic() + 60
        while not all(os.path.isfile(p) for p in want) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(os.path.isfile(p) for p in want)  # prefetched before anything ran
        assert node.run(f"{host}/podrec:v2", "/usr/bin/python3", "-c",
                        "print('from the profile')").strip() == "from the profile"
    finally:
        node.reset()
        store.stop()


def test_a_store_tag_named_as_the_reference_shows_the_image(registry_images, tmp_path):
    """A folder store tagged `HOST/REPO:TAG`: that image shows the registry image, provided
    its subject is the registry's manifest (a conversion of another image is refused)."""
    from warmstart.imageformat.store import ImageStore
    host = registry_images
    folder = str(tmp_path / "store")
    with ImageStore.open(folder) as s:
        convert(f"docker://{host}/x:v1", s, f"{host}/x:v1", registry=PLAIN)
        convert(f"docker://{host}/x:v1", s, f"{host}/x:v2", registry=PLAIN)  # wrong subject
        tagged = s.tags()[f"{host}/x:v1"]
    with RegistryStore.open_registry(f"docker://{host}/x", PLAIN) as r:
        v1 = [d["digest"] for d in json.loads(r.client.get_manifest("x", "v1")[0])["layers"]]
        v2 = [d["digest"] for d in json.loads(r.client.get_manifest("x", "v2")[0])["layers"]]
    store = LayerStore(tmp_path, "--store", folder)
    try:
        top = os.path.join(store.dir, encode_reference(f"{host}/x:v1"), v1[-1], "diff")
        assert os.path.isdir(top) and os.path.ismount(os.path.realpath(top))
        assert tagged.split(":", 1)[1] in os.path.realpath(top)  # the store's image, mounted
        assert os.path.isfile(os.path.join(os.path.realpath(top), "usr/bin/python3.11"))
        # x:v2's tag holds a conversion of x:v1: refused (not shown, and not replaced by
        # a registry twin either: a wrong tag is an error to see, not to paper over)
        assert not os.path.exists(os.path.join(store.dir, encode_reference(f"{host}/x:v2"),
                                               v2[-1]))
    finally:
        store.stop()
    assert "is not a conversion of" in store.text()
