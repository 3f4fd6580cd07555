"""A registry repository as the image store (real docker-registry 2.8, no referrers API):
OCI 1.1 artifacts linked to their source image by `subject`, found through the
`sha256-<hex>` referrers tag, read by ranged blob GETs (pull and lazy mount)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from imageformat_helpers import BLOB, exact_policy, snapshot

from warmstart.cli import main
from warmstart.errors import ConfigError, NotFound
from warmstart.imageformat.convert import convert, push
from warmstart.imageformat.model import ARTIFACT_TYPE
from warmstart.imageformat.pull import pull
from warmstart.imageformat.registry import RegistryClient
from warmstart.imageformat.registry_config import RegistryOptions
from warmstart.imageformat.registry_store import RegistryStore, referrers_tag
from warmstart.imageformat.sources import parse_platform
from warmstart.imageformat.store import ImageStore

PLAIN = RegistryOptions(plain_http=True)


def store(host: str, repo: str = "x") -> RegistryStore:
    return RegistryStore.open_registry(f"docker://{host}/{repo}", PLAIN)


def test_convert_into_the_registry_links_the_twin_to_its_source(registry_images,
                                                               umoci_unpacked, tmp_path):
    host = registry_images
    client = RegistryClient(host, PLAIN)
    _, _, source_digest = client.get_manifest("x", "v1")
    assert client.referrers("x", source_digest) is None  # 2.8 has no referrers API
    with store(host) as s:
        r = convert(f"docker://{host}/x:v1", s, "v1", registry=PLAIN, blob_size=BLOB)
        # the source's tag is never moved; the twin is pushed by digest and linked
        assert client.get_manifest("x", "v1")[2] == source_digest
        twin = json.loads(client.get_manifest("x", r.digest)[0])
        assert twin["artifactType"] == ARTIFACT_TYPE
        assert twin["subject"]["digest"] == source_digest
        index = json.loads(client.get_manifest("x", referrers_tag(source_digest))[0])
        assert [m["digest"] for m in index["manifests"]
                if m.get("artifactType") == ARTIFACT_TYPE] == [r.digest]
        assert s.open_image("v1").digest == r.digest  # found from the source image's tag
        pull(s, "v1", str(tmp_path / "out"), policy=exact_policy())
    assert snapshot(str(tmp_path / "out")) == snapshot(umoci_unpacked["v1"])


def test_push_from_a_folder_dedups_and_resolves_through_an_index(registry_images, oci_layout,
                                                                 umoci_unpacked, tmp_path):
    host = registry_images
    local = ImageStore.open(str(tmp_path / "local"))
    convert(f"{oci_layout}:v1", local, "v1", blob_size=BLOB)
    convert(f"{oci_layout}:v2", local, "v2", blob_size=BLOB)
    with store(host, "pushed") as s:
        r1 = push(local, "v1", s, "w1", blob_size=BLOB)  # a free tag: the twin gets it
        r2 = push(local, "v2", s, "w2", blob_size=BLOB)
        assert r2.reused_chunks > 10 * r2.new_chunks  # v1's chunks are known in the registry
        assert push(local, "v2", s, "w2", blob_size=BLOB).new_bytes == 0
        assert s.tags() == {"w1": r1.digest, "w2": r2.digest}
        pull(s, "w2", str(tmp_path / "out"), policy=exact_policy())
    assert snapshot(str(tmp_path / "out")) == snapshot(umoci_unpacked["v2"])
    # the source images, copied into this repository as a multi-platform index
    import subprocess
    for tag in ("v1", "v2"):
        subprocess.run(["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false",
                        f"oci:{oci_layout}:{tag}", f"docker://{host}/pushed:src-{tag}"],
                       check=True, capture_output=True, timeout=120)
    client = RegistryClient(host, PLAIN)
    entries = []
    for tag, arch in (("src-v1", "amd64"), ("src-v2", "arm64")):
        data, media_type, digest = client.get_manifest("pushed", tag)
        entries.append({"mediaType": media_type, "digest": digest, "size": len(data),
                        "platform": {"os": "linux", "architecture": arch}})
    client.put_manifest("pushed", "multi", json.dumps(
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
         "manifests": entries}).encode(), "application/vnd.oci.image.index.v1+json")
    arm = RegistryStore.open_registry(f"docker://{host}/pushed", PLAIN,
                                      platform=parse_platform("linux/arm64"))
    with arm, store(host, "pushed") as amd:
        assert arm.open_image("multi").digest == r2.digest
        assert amd.open_image("multi").digest == r1.digest  # amd64: this machine's, v1


def test_the_source_tag_is_not_overwritten_and_errors_name_things(registry_images, tmp_path):
    host = registry_images
    with store(host, "plain") as s:
        with pytest.raises(NotFound, match="no image tagged|HTTP 404"):
            s.open_image("nothing")
        root = tmp_path / "root"
        root.mkdir()
        (root / "f").write_text("x")
        convert(str(root), s, "t1")
        import subprocess
        subprocess.run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
                        "--dest-tls-verify=false", f"docker://{host}/x:v1",
                        f"docker://{host}/plain:img"], check=True, capture_output=True,
                       timeout=120)
        with pytest.raises(NotFound, match="has no warmstart twin"):
            s.open_image("img")
        with pytest.raises(ConfigError, match="not a warmstart image"):
            convert(str(root), s, "img")  # a rootfs has no subject to link it by
        with pytest.raises(ConfigError, match="registry's own garbage collection"):
            s.gc()


def _fuse_problem() -> str | None:
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3 is not importable: {exc}"
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "needs /dev/fuse and fusermount3 (Debian package 'fuse3')"
    return None


@pytest.mark.skipif(_fuse_problem() is not None, reason=str(_fuse_problem()))
def test_lazy_mount_and_record_from_the_registry(registry_images, capsys, tmp_path):
    from warmstart.imageformat.mount import spawn_mount, unmount
    host = registry_images
    uri = f"docker://{host}/mounted"
    with RegistryStore.open_registry(uri, PLAIN) as s:
        r = convert(f"docker://{host}/x:v2", s, "v2", registry=PLAIN, blob_size=BLOB)
        image = s.open_image("v2")
    stored = sum(b.size for b in image.manifest.blobs)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with open(tmp_path / "log", "wb") as log:
        try:
            proc = spawn_mount(uri, "v2", str(mnt), str(tmp_path / "cache"), "--plain-http",
                               "--no-prefetch", stderr=log)
        except Exception as exc:  # noqa: BLE001 - this machine refuses FUSE mounts
            pytest.skip(f"FUSE mount failed here: {exc}")
        try:
            assert (mnt / "etc/os-release").read_text().endswith('VERSION="2"\n')
        finally:
            unmount(str(mnt), proc)
    stats = json.loads((tmp_path / "log").read_text().strip().splitlines()[-1])
    assert 0 < stats["fetched_bytes"] < stored / 4  # ranged GETs of one file's chunks
    rc = main(["image", "record", "v2", "--store", uri, "--plain-http", "--no-chroot",
               "--", "cat", "{mount}/etc/os-release"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["chunks"] >= 1
    with RegistryStore.open_registry(uri, PLAIN) as s:
        profiled = s.open_image("v2")  # the source's tag now finds the twin with a profile
        assert profiled.profile is not None and profiled.digest == out["digest"] != r.digest


def test_pull_retries_cut_ranged_reads(registry_images, umoci_unpacked, tmp_path):
    from warmstart.testing import faultproxy as fp
    host = registry_images
    with store(host, "faulty") as s:
        convert(f"docker://{host}/x:v1", s, "v1", registry=PLAIN, blob_size=BLOB)
    with fp.FaultProxy(f"http://{host}") as proxy:
        rule = proxy.add_rule(fp.reset_mid_body(1000), method="GET", key="/blobs/",
                              ranged=True, max_count=3)
        via = proxy.endpoint.removeprefix("http://")
        with store(via, "faulty") as s:
            pull(s, "v1", str(tmp_path / "out"), policy=exact_policy())
        assert rule.faulted == 3
    assert snapshot(str(tmp_path / "out")) == snapshot(umoci_unpacked["v1"])
