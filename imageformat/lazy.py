"""Which layers the snapshotter shows lazily, and the FUSE mounts that do it.

A pulling client that passes layer labels (`ctr-remote image rpull`: `containerd.io/
snapshot/remote/stargz.reference` and `.digest`; the CRI plugin: `containerd.io/snapshot/
cri.image-ref` and `cri.layer-digest`) names the image and the layer containerd is about to
fetch. If that image's registry repository holds a warmstart twin (found as `registry_store`
finds it), each of its layers becomes a committed snapshot without being fetched: the top one
is a lazy mount of the whole twin (`warmstart image mount` in a child process), the ones below
are empty placeholders, since the top already shows the whole file tree. Anything else (no
labels, no twin, a registry error) falls back to containerd fetching the layer.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time

from warmstart.errors import WarmstartError

from .registry_config import Reference, RegistryOptions
from .snapshots import COMMITTED, FailedPrecondition, Snapshot, SnapshotDB
from .sources import Platform, is_index, layer_descriptors, parse_platform, pick_platform, \
    verified_json

log = logging.getLogger("warmstart.imageformat.snapshotter")

REF_LABELS = ("containerd.io/snapshot/remote/stargz.reference",
              "containerd.io/snapshot/cri.image-ref")
LAYER_LABELS = ("containerd.io/snapshot/remote/stargz.digest",
                "containerd.io/snapshot/cri.layer-digest")


def _label(labels: dict, names: tuple[str, ...]) -> str | None:
    return next((labels[n] for n in names if labels.get(n)), None)


class LazyLayers:
    def __init__(self, root: str, options: RegistryOptions, platform: Platform | None = None,
                 mount_args: tuple[str, ...] = (), twin_ttl: float = 30.0) -> None:
        self.root, self.options = root, options
        self.platform = platform or parse_platform(None)
        self.mount_args = mount_args
        self.cache = os.path.join(root, "cache")
        self.procs: dict[str, subprocess.Popen] = {}  # snapshot id -> mount process
        # image ref -> (when looked up, answer); answers expire, so a twin pushed (or a tag
        # moved) after a first pull is seen by the next pull
        self.twins: dict[str, tuple[float, tuple[str, str, list[str]] | None]] = {}
        self.ttl = twin_ttl
        self.lock = threading.Lock()

    # --- deciding -------------------------------------------------------------------------
    def _twin(self, image_ref: str) -> tuple[str, str, list[str]] | None:
        """(store URI, twin digest, source layer digests) of `image_ref`, or None."""
        with self.lock:
            cached = self.twins.get(image_ref)
            if cached is not None and time.monotonic() - cached[0] < self.ttl:
                return cached[1]
        from ._aio import run_sync
        from .registry_store import RegistryStore
        found = None
        try:
            ref = Reference.parse("docker://" + image_ref.removeprefix("docker://"))
            uri = f"docker://{ref.host}/{ref.repo}"
            with RegistryStore.open_registry(uri, self.options, platform=self.platform) as s:
                data, _, digest = s.client.get_manifest(ref.repo, ref.ref)
                doc = verified_json(data, digest, image_ref)
                if is_index(doc):
                    digest = pick_platform(doc, self.platform, image_ref).digest
                    data, _, digest = s.client.get_manifest(ref.repo, digest)
                    doc = verified_json(data, digest, image_ref)
                layers = [d.digest for d in layer_descriptors(doc, image_ref)]
                twin = run_sync(s.twin_of(digest))
            found = (uri, twin, layers)
            log.info("%s has warmstart twin %s: its layers are shown lazily", image_ref, twin)
        except WarmstartError as exc:
            log.info("%s: no lazy twin (%s); containerd fetches its layers", image_ref, exc)
        with self.lock:
            self.twins[image_ref] = (time.monotonic(), found)
        return found

    def look_up(self, labels: dict) -> None:
        """Finds (and caches) the twin of the image the labels name, if they name one."""
        image_ref = _label(labels, REF_LABELS)
        if image_ref and _label(labels, LAYER_LABELS):
            self._twin(image_ref)

    def prepare(self, db: SnapshotDB, key: str, parent: str, labels: dict,
                target: str) -> bool:
        """Creates committed snapshot `target` lazily and returns True, or returns False."""
        image_ref, layer = _label(labels, REF_LABELS), _label(labels, LAYER_LABELS)
        if not image_ref or not layer or target in db.snapshots:
            return False
        twin = self._twin(image_ref)
        if twin is None or layer not in twin[2]:
            return False
        uri, digest, layers = twin
        i = layers.index(layer)
        below = db.snapshots.get(parent) if parent else None
        if (i == 0) != (not parent) or (i > 0 and (below is None or below.lazy is None
                                                   or below.lazy["image"] != digest)):
            return False  # the layers below were not shown by this twin
        top = i == len(layers) - 1
        snap = db.create(target, COMMITTED, parent, labels,
                         lazy={"store": uri, "image": digest, "top": top, "source": image_ref})
        if top:
            try:
                self._mount(db, snap)
            except WarmstartError as exc:
                log.warning("lazy mount of %s failed (%s); containerd fetches it", digest, exc)
                db.remove(target)
                return False
        return True

    def check_parent(self, db: SnapshotDB, parent: str) -> None:
        """A placeholder holds nothing by itself: only the twin's top may be built upon."""
        snap = db.snapshots.get(parent) if parent else None
        if snap is not None and snap.lazy is not None and not snap.lazy["top"]:
            raise FailedPrecondition(
                f"parent {parent!r} is an empty placeholder below warmstart image "
                f"{snap.lazy['image']} ({snap.lazy['source']}); it cannot be the base of "
                "another image: remove it, or pull that image without this snapshotter")

    # --- mounts ---------------------------------------------------------------------------
    def _mount(self, db: SnapshotDB, snap: Snapshot) -> None:
        from .mount import spawn_mount
        mnt = db.dir(snap)
        if os.path.ismount(mnt):
            return
        assert snap.lazy is not None
        log_path = os.path.join(self.root, "snapshots", snap.id, "mount.log")
        with open(log_path, "ab") as err:
            self.procs[snap.id] = spawn_mount(snap.lazy["store"], snap.lazy["image"], mnt,
                                              self.cache, *self.mount_args, stderr=err)

    def restore(self, db: SnapshotDB) -> None:
        """Mounts every lazy top snapshot again (after a restart)."""
        for key, snap in sorted(db.snapshots.items()):
            if snap.lazy is not None and snap.lazy["top"]:
                try:
                    self._mount(db, snap)
                except WarmstartError as exc:
                    log.warning("could not restore the lazy mount of %s: %s", key, exc)

    def forget(self, db: SnapshotDB, snap: Snapshot) -> None:
        if snap.lazy is not None and snap.lazy["top"]:
            from .mount import unmount
            unmount(db.dir(snap), self.procs.pop(snap.id, None))

    def close(self) -> None:
        from .mount import unmount
        for sid, proc in sorted(self.procs.items()):
            unmount(os.path.join(self.root, "snapshots", sid, "fs"), proc)
        self.procs.clear()
