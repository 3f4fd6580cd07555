"""`warmstart ray-node setup`'s plan (pure: no root, no files touched) and the rootless owner
mapping of the lazy mount."""

from __future__ import annotations

import pytest

from warmstart.errors import ConfigError
from warmstart.imageformat.idmap import IdMap
from warmstart.ray_serve.node_setup import NodeSetup, next_subid_start, plan_setup

S = NodeSetup("ray", "/home/ray", 1001, 1001, "/var/lib/warmstart/layers", ("reg:5000",))


def test_plan_writes_podman_config_for_the_user_and_adds_missing_ranges():
    plan = plan_setup(S, "other:100000:65536\n", "ray:300000:65536\n", mqueue_mounted=False,
                      root_shared=False)
    files = dict(plan.files)
    storage = files["/home/ray/.config/containers/storage.conf"]
    assert 'additionallayerstores = ["/var/lib/warmstart/layers:ref"]' in storage
    # owners shifted by fuse-overlayfs: no chowned copy of a lazy image for keep-id
    assert 'mount_program = "/usr/bin/fuse-overlayfs"' in storage
    containers = files["/home/ray/.config/containers/containers.conf"]
    for line in ('runtime = "runc"', 'cgroup_manager = "cgroupfs"', 'events_logger = "file"',
                 'netns = "host"', '"nofile=20000:20000"', '"nproc=4096:4096"'):
        assert line in containers
    assert 'location = "reg:5000"\ninsecure = true' in \
        files["/home/ray/.config/containers/registries.conf"]
    # subuid lacked the user: a range above every existing one; subgid had it: untouched
    assert plan.subid_lines == (("/etc/subuid", "ray:165536:65536"),)
    assert plan.mount_mqueue and plan.share_root
    assert not plan.open_fuse  # /dev/fuse is 0666 by default


def test_plan_is_idempotent_on_a_set_up_node():
    plan = plan_setup(S, "ray:100000:65536\n", "1001:100000:65536\n", True, True)
    assert plan.subid_lines == () and not plan.mount_mqueue and not plan.share_root
    assert not plan.open_fuse


def test_fuse_overlayfs_needs_dev_fuse_open_to_the_user():
    assert plan_setup(S, "", "", True, True, fuse_mode=0o600).open_fuse
    # without fuse-overlayfs: kernel overlay, /dev/fuse left alone, and a note says the cost
    bare = plan_setup(NodeSetup("ray", "/home/ray", 1001, 1001, "/l", mount_program=None),
                      "", "", True, True, fuse_mode=0o600)
    assert not bare.open_fuse and "mount_program" not in dict(bare.files)[
        "/home/ray/.config/containers/storage.conf"]
    assert any("fuse-overlayfs" in note for note in bare.notes)


def test_root_and_bad_inputs_are_refused():
    with pytest.raises(ConfigError, match="keep-id"):
        plan_setup(NodeSetup("root", "/root", 0, 0, "/l"), "", "", True, True)
    with pytest.raises(ConfigError, match="absolute"):
        plan_setup(NodeSetup("ray", "/home/ray", 1001, 1001, "rel/dir"), "", "", True, True)
    with pytest.raises(ConfigError, match="line 2"):
        next_subid_start("a:100000:65536\nbroken\n")


def test_rootless_owner_mapping():
    m = IdMap(((0, 1001, 1), (1, 165536, 65536)), ((0, 1002, 1), (1, 200000, 65536)))
    assert m.owner(0, 0) == (1001, 1002)
    assert m.owner(33, 33) == (165568, 200032)
    assert m.owner(70000, 0) == (65534, 1002)  # beyond the range: overflow id
    assert IdMap().owner(5, 6) == (5, 6)
