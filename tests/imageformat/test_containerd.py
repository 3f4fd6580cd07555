"""The containerd remote snapshotter end to end: real containerd 1.6 + runc, the warmstart
snapshotter as a proxy plugin, images in docker-registry, `ctr-remote image rpull` passing
layer labels, `ctr run` starting the container from the lazy mount."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from imageformat_helpers import snapshot

from warmstart.imageformat.convert import convert
from warmstart.imageformat.registry_config import RegistryOptions
from warmstart.imageformat.registry_store import RegistryStore

PLAIN = RegistryOptions(plain_http=True)
NEEDS = ("containerd", "ctr", "ctr-remote", "runc", "fusermount3")


def _problem() -> str | None:
    if os.geteuid() != 0:
        return "containerd and overlay mounts need root"
    missing = [b for b in NEEDS if shutil.which(b) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (Debian: containerd, runc, " \
               "stargz-snapshotter, fuse3)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    import importlib.util
    gone = [m for m, pkg in (("grpc", "grpcio"), ("grpc_tools", "grpcio-tools"),
                             ("pyfuse3", "pyfuse3"))
            if importlib.util.find_spec(m) is None]
    if gone:
        return f"Python packages missing: {', '.join(gone)} (pip install grpcio grpcio-tools " \
               "and the image extra)"
    if not os.path.isdir("/usr/share/gocode/src/github.com/containerd/containerd/api"):
        return "containerd's protos are missing (golang-github-containerd-containerd-dev)"
    return None


pytestmark = pytest.mark.skipif(_problem() is not None, reason=str(_problem()))


def _wait_for(what: str, ready, proc: subprocess.Popen, log, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            pytest.fail(f"{what} did not start: {log.read().decode(errors='replace')[-3000:]}")
        time.sleep(0.05)


class Node:
    """containerd with the warmstart snapshotter, each with its own root, state and socket."""

    def __init__(self, base) -> None:
        self.base = base
        self.sock = str(base / "containerd.sock")
        self.snap_sock = str(base / "snap.sock")
        self.snap_root = str(base / "snaproot")
        (base / "config.toml").write_text(f"""version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[debug]
  address = "{base}/debug.sock"
[proxy_plugins]
  [proxy_plugins.warmstart]
    type = "snapshot"
    address = "{self.snap_sock}"
""")
        self.snapper = None
        self.start_snapshotter()
        self.log = open(base / "containerd.log", "w+b")
        self.containerd = subprocess.Popen(["containerd", "--config", str(base / "config.toml")],
                                           stdout=self.log, stderr=self.log)
        _wait_for("containerd", lambda: subprocess.run(
            ["ctr", "--address", self.sock, "version"], capture_output=True).returncode == 0,
            self.containerd, self.log)

    def start_snapshotter(self) -> None:
        self.snap_log = open(self.base / "snapshotter.log", "a+b")
        if os.path.exists(self.snap_sock):
            os.unlink(self.snap_sock)
        env = dict(os.environ, WARMSTART_LOG="INFO")
        self.snapper = subprocess.Popen(
            [sys.executable, "-m", "warmstart.imageformat.cli", "snapshotter", "--socket",
             self.snap_sock, "--root", self.snap_root, "--plain-http"],
            stdout=self.snap_log, stderr=self.snap_log, env=env)
        _wait_for("the snapshotter", lambda: os.path.exists(self.snap_sock), self.snapper,
                  self.snap_log)

    def stop_snapshotter(self) -> None:
        self.snapper.send_signal(signal.SIGTERM)
        assert self.snapper.wait(timeout=60) == 0

    def ctr(self, *args: str, remote: bool = False, timeout: float = 120) -> str:
        cmd = ["ctr-remote" if remote else "ctr", "--address", self.sock, *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.base)
        assert out.returncode == 0, f"{cmd}: {out.stderr[-2000:]}"
        return out.stdout

    def ctr_eventually(self, *args: str, timeout: float = 60) -> str:
        """`ctr` once containerd has reconnected to a restarted snapshotter (its gRPC client
        redials with backoff, so the first calls may find the socket not yet dialed)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.ctr(*args)
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        self.containerd.terminate()
        self.containerd.wait(timeout=60)
        self.stop_snapshotter()
        subprocess.run(["umount", "-R", str(self.base / "state")], capture_output=True)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("containerd"))
    yield n
    n.stop()


def _lazy_mounts(node: Node) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f
                if " - fuse.warmstart " in line and node.snap_root in line]


def test_ctr_runs_a_registry_image_lazily_and_the_layer_is_never_fetched(
        node, registry_images, umoci_unpacked):
    host = registry_images
    with RegistryStore.open_registry(f"docker://{host}/x", PLAIN) as s:
        convert(f"docker://{host}/x:v1", s, "v1", registry=PLAIN)
    ref = f"{host}/x:v1"
    node.ctr("image", "rpull", "--plain-http", "--snapshotter", "warmstart", ref, remote=True)
    content = {line.split()[0] for line in node.ctr("content", "ls").splitlines()[1:]}
    manifest = RegistryStore.open_registry(f"docker://{host}/x", PLAIN).client.get_manifest(
        "x", "v1")[0]
    import json
    layers = [d["digest"] for d in json.loads(manifest)["layers"]]
    assert content and not content & set(layers)  # containerd fetched no layer
    mounts = _lazy_mounts(node)
    assert len(mounts) == 1
    assert snapshot(mounts[0]) == snapshot(umoci_unpacked["v1"])  # the tree runc will see
    out = node.ctr("run", "--rm", "--snapshotter", "warmstart", ref, "lazy1",
                   "/usr/bin/python3", "-c", "import json; print(json.dumps({'ok': 1}))")
    assert out.strip() == '{"ok": 1}'


def test_an_image_without_a_twin_is_fetched_onto_the_lazy_chain_it_shares(node, registry, oci_layout):
    host, _ = registry
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false",
                    f"oci:{oci_layout}:v2", f"docker://{host}/notwin:v2"], check=True,
                   capture_output=True, timeout=120)
    ref = f"{host}/notwin:v2"
    node.ctr("image", "rpull", "--plain-http", "--snapshotter", "warmstart", ref, remote=True)
    out = node.ctr("run", "--rm", "--snapshotter", "warmstart", ref, "plain1",
                   "/usr/bin/python3", "-c", "print(open('/etc/os-release').read())")
    assert 'VERSION="2"' in out
    import json

    from warmstart.imageformat.registry import RegistryClient
    manifest = json.loads(RegistryClient(host, PLAIN).get_manifest("notwin", "v2")[0])
    content = {line.split()[0] for line in node.ctr("content", "ls").splitlines()[1:]}
    lower, upper = (d["digest"] for d in manifest["layers"])
    # v2 = v1's layer + one more: the upper one is fetched and applied as usual; the lower
    # one is x:v1's layer, whose chain the lazy mount of x:v1's twin already shows whole
    assert upper in content and lower not in content
    assert len(_lazy_mounts(node)) == 1


def test_snapshots_and_lazy_mounts_survive_a_restart(node, registry_images):
    ref = f"{registry_images}/x:v1"
    before = node.ctr("snapshots", "--snapshotter", "warmstart", "ls")
    node.stop_snapshotter()
    assert _lazy_mounts(node) == []  # unmounted on the way down
    node.start_snapshotter()
    deadline = time.monotonic() + 60
    while not _lazy_mounts(node) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_lazy_mounts(node)) == 1
    assert node.ctr_eventually("snapshots", "--snapshotter", "warmstart", "ls") == before
    out = node.ctr("run", "--rm", "--snapshotter", "warmstart", ref, "lazy2",
                   "/usr/bin/python3", "-c", "print('again')")
    assert out.strip() == "again"


def test_a_recorded_profile_is_prefetched_when_containerd_pulls(registry_images, tmp_path,
                                                                capsys):
    """x:v2 (two layers) on a node of its own: its twin carries a start-up profile, and the
    snapshotter's lazy mount fetches those chunks before any container reads a byte."""
    import json

    from warmstart.cli import main
    host = registry_images
    uri = f"docker://{host}/x"
    with RegistryStore.open_registry(uri, PLAIN) as s:
        convert(f"docker://{host}/x:v2", s, "v2", registry=PLAIN)
    rc = main(["image", "record", "v2", "--store", uri, "--plain-http", "--no-chroot", "--",
               "sha256sum", "{mount}/etc/os-release", "{mount}/data/new.bin"])
    recorded = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and recorded["chunks"] >= 2
    with RegistryStore.open_registry(uri, PLAIN) as s:
        profile = s.open_image("v2").profile
    assert profile is not None and len(profile.chunks) == recorded["chunks"]
    (tmp_path / "node").mkdir()
    node = Node(tmp_path / "node")
    try:
        node.ctr("image", "rpull", "--plain-http", "--snapshotter", "warmstart",
                 f"{host}/x:v2", remote=True)
        assert len(_lazy_mounts(node)) == 1
        cache = os.path.join(node.snap_root, "cache")
        want = {os.path.join(cache, "data", d[:2], d) for d in profile.chunks}
        deadline = time.monotonic() + 60
        while not all(os.path.isfile(p) for p in want) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(os.path.isfile(p) for p in want)
        out = node.ctr("run", "--rm", "--snapshotter", "warmstart", f"{host}/x:v2", "prof1",
                       "/usr/bin/python3", "-c", "print(open('/etc/os-release').read())")
        assert 'VERSION="2"' in out
    finally:
        node.stop()


def test_record_a_start_up_run_by_containerd(node, registry_images, capsys):
    """`record --containerd`: the program is started by containerd and runc on an overlay
    over the recording mount; what it read becomes the twin's profile."""
    import json

    from warmstart.cli import main
    host = registry_images
    uri = f"docker://{host}/rec"
    import subprocess as sp
    sp.run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
            "--dest-tls-verify=false", f"docker://{host}/x:v1", f"docker://{host}/rec:v1"],
           check=True, capture_output=True, timeout=120)
    with RegistryStore.open_registry(uri, PLAIN) as s:
        convert(f"docker://{host}/rec:v1", s, "v1", registry=PLAIN)
    rc = main(["image", "record", "v1", "--store", uri, "--plain-http", "--containerd",
               node.sock, "--", "/usr/bin/python3", "-c", "import json; print('recorded')"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["chunks"] > 0
    with RegistryStore.open_registry(uri, PLAIN) as s:
        image = s.open_image("v1")  # the source tag finds the twin, now with the profile
    assert image.profile is not None and image.digest == out["digest"]
    by_path = {c.digest: e.path for e in image.toc.entries for c in e.chunks}
    read = [by_path[d] for d in image.profile.chunks]
    # in first-read order: the interpreter runc starts, then the module it imports
    assert read.index("usr/bin/python3.11") < read.index("usr/lib/python3.11/json/__init__.py")


def _chain_id(diff_ids: list[str]) -> str:
    import hashlib
    chain = diff_ids[0]
    for d in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {d}".encode()).hexdigest()
    return chain


def _view(node: Node, snapshotter: str, chain: str, target) -> None:
    """Mounts a read-only view of committed snapshot `chain` at `target`."""
    import json
    key = f"cmp-{snapshotter}-{chain[7:19]}"
    mounts = json.loads(node.ctr("snapshots", "--snapshotter", snapshotter, "view",
                                 "--mounts", key, chain))
    target.mkdir()
    for m in mounts:  # ctr prints Go's field names
        m = {k.lower(): v for k, v in m.items()}
        opts = ",".join(m.get("options") or [])
        subprocess.run(["mount", "-t", m["type"], m["source"], str(target)]
                       + (["-o", opts] if opts else []), check=True, capture_output=True)


@pytest.mark.parametrize("image", ["x:v1", "notwin:v2"])
def test_the_tree_equals_containerds_own_unpack(node, registry_images, tmp_path, image):
    """What a container sees through the warmstart snapshotter (x:v1: the lazy mount;
    notwin:v2: a fetched layer over it) is the tree containerd's overlayfs snapshotter
    unpacks from the same registry image, file for file."""
    import json

    from warmstart.imageformat.registry import RegistryClient
    host = registry_images
    repo, tag = image.split(":")
    client = RegistryClient(host, PLAIN)
    manifest = json.loads(client.get_manifest(repo, tag)[0])
    with client.open_blob(repo, manifest["config"]["digest"]) as f:
        chain = _chain_id(json.loads(f.read())["rootfs"]["diff_ids"])
    ref = f"{host}/{image}"
    node.ctr("image", "rpull", "--plain-http", "--snapshotter", "warmstart", ref, remote=True)
    node.ctr("image", "pull", "--plain-http", "--snapshotter", "overlayfs", ref)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    _view(node, "warmstart", chain, ours)
    try:
        _view(node, "overlayfs", chain, theirs)
        try:
            assert snapshot(str(ours)) == snapshot(str(theirs))
        finally:
            subprocess.run(["umount", str(theirs)], check=True)
    finally:
        subprocess.run(["umount", str(ours)], check=True)


def test_cri_labels_over_grpc(node, registry_images):
    """A client of our own speaking the snapshots API with the labels containerd's CRI plugin
    passes: the layer is answered ALREADY_EXISTS and committed lazily, a container snapshot
    on it is an overlay over the lazy mount, and removing it unmounts."""
    import grpc

    from warmstart.imageformat import containerd_api
    host = registry_images
    with RegistryStore.open_registry(f"docker://{host}/x", PLAIN) as s:
        convert(f"docker://{host}/x:v1", s, "v1", registry=PLAIN)
        layer = __import__("json").loads(s.client.get_manifest("x", "v1")[0])["layers"][0]
    api = containerd_api.load(os.path.join(node.snap_root, ".cache"))
    pb = api.snapshots_pb2
    with grpc.insecure_channel(f"unix://{node.snap_sock}") as channel:
        stub = api.snapshots_pb2_grpc.SnapshotsStub(channel)
        labels = {"containerd.io/snapshot.ref": "cri-top",
                  "containerd.io/snapshot/cri.image-ref": f"{host}/x:v1",
                  "containerd.io/snapshot/cri.layer-digest": layer["digest"]}
        mounted = len(_lazy_mounts(node))
        with pytest.raises(grpc.RpcError) as err:
            stub.Prepare(pb.PrepareSnapshotRequest(key="cri-extract", labels=labels))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert stub.Stat(pb.StatSnapshotRequest(key="cri-top")).info.kind == pb.COMMITTED
        assert len(_lazy_mounts(node)) == mounted + 1
        got = stub.Prepare(pb.PrepareSnapshotRequest(key="cri-ctr", parent="cri-top"))
        (m,) = got.mounts
        lower = [o for o in m.options if o.startswith("lowerdir=")][0][len("lowerdir="):]
        assert m.type == "overlay" and lower in _lazy_mounts(node)
        with pytest.raises(grpc.RpcError) as err:
            stub.Remove(pb.RemoveSnapshotRequest(key="cri-top"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # has a child
        stub.Remove(pb.RemoveSnapshotRequest(key="cri-ctr"))
        stub.Remove(pb.RemoveSnapshotRequest(key="cri-top"))
        assert len(_lazy_mounts(node)) == mounted
        with pytest.raises(grpc.RpcError) as err:
            stub.Stat(pb.StatSnapshotRequest(key="cri-top"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
