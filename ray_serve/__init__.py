"""Ray Serve integration: replicas start with warmstart, and a cluster reads a checkpoint once.

Layers, each importing only the ones below it (none of them is imported by the loader):
  replica      `load_in_replica()` for a deployment's `__init__`, and the `preload` class
               decorator that loads before user code runs; progress in the replica's log and
               as Ray metrics
  llm          `WarmstartCallback` for `ray.serve.llm`: `load_format="warmstart"` without
               downloading the safetensors files first
  node_read    the replica's side: loads the node copy as local files, each read waiting
               (a Ray call to the gateway) until the pieces under it have landed
  node_actor   `NodeGateway`, the Ray actor per node that runs a gateway (no socket)
  gateway      lands a checkpoint on the node piece by piece: this node's share from object
               storage, other pieces from the owner node's gateway (digest-checked, falling
               back to object storage)
  landing      the node-local landing area: 0700 folder, 0600 files filled in place, a
               record of landed pieces, whole-version eviction
  plan         pure functions: pieces of an object, which node owns which piece
  settings     `SharingConfig`, the typed options of all of the above
Ray is imported lazily, so `import warmstart.ray_serve` works without Ray installed.
"""

from __future__ import annotations

from warmstart.ray_serve.settings import SharingConfig


def __getattr__(name: str):
    if name in {"load_in_replica", "preload"}:
        from warmstart.ray_serve import replica

        return getattr(replica, name)
    if name == "WarmstartCallback":
        from warmstart.ray_serve.llm import WarmstartCallback

        return WarmstartCallback
    raise AttributeError(f"module 'warmstart.ray_serve' has no attribute {name!r}")


__all__ = ["SharingConfig", "load_in_replica", "preload", "WarmstartCallback"]
