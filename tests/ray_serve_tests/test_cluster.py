"""Several Ray nodes on this machine (`ray.cluster_utils.Cluster`), one loading replica per
node: with sharing, object storage serves the checkpoint about once (counted by a proxy in
front of the S3 server) instead of once per node; a node killed mid-load does not stop the
others, which fall back to object storage for its share."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from conftest import BUCKET, checkpoint_bytes, oracle

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
NODES = 3
URI = f"s3://{BUCKET}/ckpt/"


def _digest(tensors) -> str:
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        if t.numel():
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Replica:
    """Stands for one Serve replica per node: it calls the same hook a deployment does."""

    def load(self, sharing: dict) -> tuple[str, dict]:
        import ray as ray_

        from warmstart.ray_serve import load_in_replica
        from warmstart.ray_serve.node_actor import ensure_gateway, SharingConfig
        from warmstart.ray_serve.replica import landing_stats, last_load_timings

        tensors = load_in_replica(URI, "cpu", sharing=sharing)
        node = ray_.get_runtime_context().get_node_id()
        stats = {}
        if sharing.get("mode", "cluster") != "off":
            # the node's fetches: this replica's own landing (a cold node) plus the gateway's
            gw = ensure_gateway(node, SharingConfig.from_mapping(sharing))
            stats = {"gateway": ray_.get(gw.stats.remote()), "replica": landing_stats(),
                     "timings": last_load_timings()}
            for key, value in stats["gateway"].items():
                numeric = isinstance(value, (int, float))
                stats[key] = value + stats["replica"].get(key, 0) if numeric else value
        return _digest(tensors), stats


@pytest.fixture(scope="module")
def cluster(localbucket, s3_checkpoint):
    from warmstart.testing.faultproxy import FaultProxy

    proxy = FaultProxy(localbucket.endpoint).start()
    env = {**localbucket.env(), "AWS_ENDPOINT_URL": proxy.endpoint,
           "PYTHONPATH": str(Path(__file__).parent)}
    system = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
              "health_check_timeout_ms": 500}
    c, nodes = _start_cluster(system)
    ray.init(address=c.address, runtime_env={"env_vars": env}, logging_level="warning")
    try:
        yield c, nodes, proxy
    finally:
        ray.shutdown()
        c.shutdown()
        proxy.stop()


def _start_cluster(system: dict, attempts: int = 2, nodes: int = NODES):
    """Ray waits a fixed 30 s for each node to register; on a busy 2-core machine that can
    pass, so a failed start is retried once from scratch."""
    from ray.cluster_utils import Cluster

    for attempt in range(attempts):
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "object_store_memory": 100 << 20, "_system_config": system,
            "include_dashboard": False})
        try:
            added = [c.add_node(num_cpus=1, object_store_memory=120 << 20)
                     for _ in range(nodes)]
            c.wait_for_nodes()
            return c, added
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception on a slow start
            c.shutdown()
            if attempt + 1 == attempts:
                raise


def _replicas(nodes):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = ray.remote(Replica)
    return [actor.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        n.node_id, soft=False)).remote() for n in nodes]


def _s3_bytes(proxy) -> int:
    proxy.wait_idle(30)
    return sum(n for key, n in proxy.stats().bytes_by_key.items() if key.endswith(".safetensors"))


def test_cluster_reads_object_storage_about_once(cluster, s3_checkpoint, tmp_path):
    from warmstart.ray_serve.node_actor import stop_gateways

    c, nodes, proxy = cluster
    want = _digest(oracle(s3_checkpoint))
    size = checkpoint_bytes(s3_checkpoint)
    replicas = _replicas(nodes)

    proxy.reset_stats()
    results = ray.get([r.load.remote({"mode": "off"}) for r in replicas], timeout=300)
    assert all(d == want for d, _ in results)
    unshared = _s3_bytes(proxy)
    assert unshared >= NODES * size * 0.95  # the baseline: once per node

    proxy.reset_stats()
    sharing = {"cache_dir": str(tmp_path / "shared-{node_id}"), "piece_size": "4MiB"}
    started = time.perf_counter()
    results = ray.get([r.load.remote(sharing) for r in replicas], timeout=300)
    seconds = time.perf_counter() - started
    assert all(d == want for d, _ in results)
    shared = _s3_bytes(proxy)
    stats = [s for _, s in results]
    assert shared <= 1.2 * size, (shared, size, stats)
    assert all(s["peer_bytes"] > 0 for s in stats), stats
    print(f"{NODES} nodes: S3 bytes {unshared / size:.2f}x unshared, {shared / size:.2f}x "
          f"shared ({seconds:.1f}s)")
    stop_gateways()


def test_a_node_killed_mid_load_does_not_stop_the_others(cluster, s3_checkpoint, tmp_path):
    from warmstart.testing.faultproxy import bandwidth
    from warmstart.ray_serve.node_actor import stop_gateways

    c, nodes, proxy = cluster
    want = _digest(oracle(s3_checkpoint))
    replicas = _replicas(nodes)
    sharing = {"cache_dir": str(tmp_path / "kill-{node_id}"), "piece_size": "4MiB",
               "peer_timeout": 20}
    size = checkpoint_bytes(s3_checkpoint)
    proxy.reset_stats()
    with proxy.injecting(bandwidth(12e6), method="GET", ranged=True):  # ~4 s in all
        refs = [r.load.remote(sharing) for r in replicas]
        deadline = time.monotonic() + 120
        while sum(proxy.stats().bytes_by_key.values()) < size // 4:  # well into the load
            assert time.monotonic() < deadline, "the load never started"
            time.sleep(0.05)
        c.remove_node(nodes[-1])  # its replica and its gateway die with it
        done = ray.get(refs[:-1], timeout=240)
    assert all(d == want for d, _ in done)
    assert any(s["peer_failures"] > 0 for _, s in done), [s for _, s in done]
    with pytest.raises(ray.exceptions.RayError):
        ray.get(refs[-1], timeout=60)
    stop_gateways()
