"""The snapshotter's bookkeeping without containerd: states, mounts, persistence, refusals."""

from __future__ import annotations

import pytest

from warmstart.errors import NotFound
from warmstart.imageformat.lazy import LazyLayers
from warmstart.imageformat.registry_config import RegistryOptions
from warmstart.imageformat.snapshots import (ACTIVE, COMMITTED, AlreadyExists,
                                             FailedPrecondition, Mount, SnapshotDB, mounts_for)


def test_states_mounts_and_a_restart(tmp_path):
    db = SnapshotDB(str(tmp_path))
    db.create("a", ACTIVE, "", {"x": "1"})
    assert mounts_for(db, "a") == [Mount("bind", db.dir(db.get("a")), ("rw", "rbind"))]
    with pytest.raises(FailedPrecondition, match="not committed"):
        db.create("b", ACTIVE, "a", {})
    db.commit("layer1", "a", {"y": "2"})
    assert db.get("layer1").kind == COMMITTED and db.get("layer1").labels == {"x": "1",
                                                                                "y": "2"}
    with pytest.raises(NotFound):
        db.get("a")
    db.create("b", ACTIVE, "layer1", {})
    db.commit("layer2", "b", {})
    db.create("rw", ACTIVE, "layer2", {})
    l1, l2, rw = (db.get(k) for k in ("layer1", "layer2", "rw"))
    assert mounts_for(db, "rw") == [Mount("overlay", "overlay", (
        f"workdir={db.dir(rw, 'work')}", f"upperdir={db.dir(rw)}",
        f"lowerdir={db.dir(l2)}:{db.dir(l1)}"))]
    db.create("v", "view", "layer2", {})
    assert mounts_for(db, "v") == [Mount("overlay", "overlay",
                                         (f"lowerdir={db.dir(l2)}:{db.dir(l1)}",))]
    with pytest.raises(AlreadyExists):
        db.create("rw", ACTIVE, "", {})
    with pytest.raises(FailedPrecondition, match="has children"):
        db.remove("layer2")
    db.save()
    again = SnapshotDB(str(tmp_path))
    assert again.snapshots == db.snapshots and again.next_id == db.next_id
    assert mounts_for(again, "rw") == mounts_for(db, "rw")


def test_a_lazy_placeholder_is_never_the_base_of_another_image(tmp_path):
    db = SnapshotDB(str(tmp_path))
    lazy = LazyLayers(str(tmp_path), RegistryOptions())
    db.create("chain0", COMMITTED, "", {}, lazy={"store": "docker://h/r", "image": "sha256:"
                                                 + "a" * 64, "top": False, "source": "h/r:t"})
    with pytest.raises(FailedPrecondition, match="empty placeholder"):
        lazy.check_parent(db, "chain0")
    db.create("top", COMMITTED, "chain0", {}, lazy={"store": "docker://h/r", "image":
                                                    "sha256:" + "a" * 64, "top": True,
                                                    "source": "h/r:t"})
    lazy.check_parent(db, "top")  # the top shows the whole image: fine to build on
    # labels that name no image: containerd fetches as usual
    assert not lazy.prepare(db, "k", "", {}, "t")
