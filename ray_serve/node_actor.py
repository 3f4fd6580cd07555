"""`NodeGateway`: the Ray actor that runs a node's `Gateway`.

It serves no socket of its own: replicas call it through Ray (`prepare`, `wait_ready`) and
read the landed files themselves, so only processes that may open the node cache's 0600 files
get bytes. One per node, named `warmstart-gateway-<node id>` in namespace "warmstart", detached, 0 CPUs,
pinned to its node with a hard node-affinity strategy, started by the first replica that needs
it (which lands the checkpoint itself meanwhile, see `replica`). Participants are the alive Ray nodes with `node_resource`, read once per object: Ray says
which nodes exist, schedules the gateways and moves the bytes (a peer's `piece.remote()`);
warmstart keeps no membership of its own.
"""

from __future__ import annotations

import logging
import time

from warmstart.ray_serve.gateway import Gateway
from warmstart.ray_serve.plan import ObjectId
from warmstart.ray_serve.settings import SharingConfig

log = logging.getLogger("warmstart.ray_serve")
NAMESPACE = "warmstart"
NAME_PREFIX = "warmstart-gateway-"
# threads of the actor: replicas' waits for pieces (one per piece in flight per replica) and
# peers' piece requests block one each
MAX_CONCURRENCY = 256


def gateway_name(node_id: str) -> str:
    return NAME_PREFIX + node_id


def participant_nodes(resource: str) -> tuple[str, ...]:
    import ray

    return tuple(sorted(n["NodeID"] for n in ray.nodes()
                        if n.get("Alive") and n.get("Resources", {}).get(resource, 0) > 0))


class NodeGateway:
    """The Ray actor (see `ensure_gateway`); its methods are what peers and replicas call."""

    def __init__(self, settings: dict, node_id: str) -> None:
        self.settings = SharingConfig.from_mapping(settings)
        self.core = Gateway(self.settings, node_id,
                            nodes=lambda: participant_nodes(self.settings.node_resource),
                            peer_fetch=peer_fetch(self.settings),
                            on_bytes=bytes_metric())
        log.info("warmstart gateway for node %s (mode %s, node cache %s)", node_id,
                 self.settings.mode, self.core.root)

    def prepare(self, uri: str, trusted=None):
        """`Gateway.prepare`: the local path to load and what is already landed."""
        return self.core.prepare(uri, trusted=trusted)

    def wait_ready(self, path: str, index: int) -> tuple[int, ...]:
        return self.core.wait_ready(path, index)

    def piece(self, bucket: str, key: str, size: int, etag: str, index: int):
        return self.core.piece_for_peer(ObjectId(bucket, key, size, etag), index)

    def stats(self) -> dict:
        return {**self.core.stats(), "node_id": self.core.node_id,
                "cache_dir": self.core.root}


def bytes_metric():
    """A `Gateway`'s `on_bytes`: the Ray counter `warmstart_gateway_bytes`, tag `source`."""
    from ray.util import metrics

    counter = metrics.Counter(
        "warmstart_gateway_bytes", "Bytes a warmstart node gateway (or a replica landing for "
        "itself) obtained, by source (s3: object storage, peer: another node, cache: "
        "node-local cache)", tag_keys=("source",))

    def count(source: str, n: int) -> None:
        if n > 0:  # Ray counters reject increments of 0
            counter.inc(n, {"source": source})

    return count


def peer_fetch(settings: SharingConfig):
    """A `Gateway`'s `peer_fetch`: asks the owner node's gateway for a piece through Ray
    (starting that gateway if it is not up), waiting at most `peer_timeout`. The handle of
    each peer's gateway is looked up once (not per piece: a GCS round trip each), and again
    after a call to it failed."""
    handles: dict[str, object] = {}

    def fetch(node: str, obj: ObjectId, index: int) -> tuple[str, bytes]:
        import ray

        handle = handles.get(node)
        if handle is None:
            handle = handles[node] = ensure_gateway(node, settings)
        ref = handle.piece.remote(obj.bucket, obj.key, obj.size, obj.etag, index)
        try:
            return ray.get(ref, timeout=settings.peer_timeout)
        except BaseException:
            handles.pop(node, None)
            raise

    return fetch


def gateway_running(node_id: str) -> bool:
    """Whether `node_id`'s gateway actor exists (alive, or being started by someone)."""
    import ray

    try:
        ray.get_actor(gateway_name(node_id), namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def ensure_gateway(node_id: str, settings: SharingConfig):
    """The gateway actor of `node_id`, started there if it is not running yet."""
    import dataclasses

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = ray.remote(NodeGateway)
    return actor.options(
        name=gateway_name(node_id), namespace=NAMESPACE, get_if_exists=True,
        lifetime="detached", num_cpus=0, max_concurrency=MAX_CONCURRENCY, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(dataclasses.asdict(settings), node_id)


def stop_gateways(timeout: float = 30.0) -> int:
    """Kills every warmstart gateway of the connected cluster and waits until their names are
    free (so the next `ensure_gateway` starts a new one); returns how many were killed."""
    import ray

    names = [e["name"] for e in ray.util.list_named_actors(all_namespaces=True)
             if e["namespace"] == NAMESPACE and e["name"].startswith(NAME_PREFIX)]
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:  # gone already
            pass
    deadline = time.monotonic() + timeout
    for name in names:
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                break
            time.sleep(0.05)
    return len(names)
