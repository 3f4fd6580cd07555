"""The node byte path under real Ray (`ray.cluster_utils.Cluster`): a second load on a warm
node reads the node copy with no object-storage read, the node copy is private to the user,
and a node that joins mid-load reads correct bytes (its own share from object storage, the
rest from the node that was there first)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conftest import BUCKET, checkpoint_bytes, oracle
from test_cluster import Replica, _digest, _s3_bytes, _start_cluster

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
URI = f"s3://{BUCKET}/ckpt/"


@pytest.fixture(scope="module")
def cluster(localbucket, s3_checkpoint):
    from warmstart.testing.faultproxy import FaultProxy

    proxy = FaultProxy(localbucket.endpoint).start()
    env = {**localbucket.env(), "AWS_ENDPOINT_URL": proxy.endpoint,
           "PYTHONPATH": str(Path(__file__).parent)}
    c, nodes = _start_cluster({}, nodes=1)
    ray.init(address=c.address, runtime_env={"env_vars": env}, logging_level="warning")
    try:
        yield c, nodes, proxy
    finally:
        ray.shutdown()
        c.shutdown()
        proxy.stop()


def _on(node_id: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(Replica).options(num_cpus=0, scheduling_strategy=(
        NodeAffinitySchedulingStrategy(node_id, soft=False))).remote()


def test_a_warm_node_reads_its_node_copy_and_no_one_else_can(cluster, s3_checkpoint,
                                                             tmp_path):
    from warmstart.ray_serve.node_actor import ensure_gateway, stop_gateways
    from warmstart.ray_serve.settings import SharingConfig

    c, nodes, proxy = cluster
    want = _digest(oracle(s3_checkpoint))
    size = checkpoint_bytes(s3_checkpoint)
    sharing = {"cache_dir": str(tmp_path / "warm-{node_id}"), "piece_size": "4MiB"}
    proxy.reset_stats()
    digest, first = ray.get(_on(nodes[0].node_id).load.remote(sharing), timeout=300)
    assert digest == want and first["s3_bytes"] >= size  # the cold node fetched it all
    # ... by the replica itself: the gateway, started after its load, fetched nothing
    assert first["replica"]["s3_bytes"] >= size and first["gateway"]["s3_bytes"] == 0, first
    steps = first["timings"]  # where the cold load went, step by step, in order
    hops = ["listed", "small_landed", "prepared", "loaded", "closed"]
    assert [steps[h] for h in hops] == sorted(steps[h] for h in hops), steps
    assert steps["s3_bytes"] >= size and steps["hash_seconds"] > 0, steps
    gw = ensure_gateway(nodes[0].node_id, SharingConfig.from_mapping(sharing))
    deadline = time.monotonic() + 120
    while ray.get(gw.stats.remote())["cache_bytes"] < size:  # the replica's handover
        assert time.monotonic() < deadline, "the gateway never took the node copy over"
        time.sleep(0.05)
    cold = _s3_bytes(proxy)
    proxy.reset_stats()
    digest, second = ray.get(_on(nodes[0].node_id).load.remote(sharing), timeout=300)
    assert digest == want
    assert _s3_bytes(proxy) == 0 and not second["replica"]  # the gateway answered, complete
    assert second["gateway"]["s3_bytes"] == 0  # nothing fetched
    assert second["gateway"]["rechecked_bytes"] == 0  # handed over with digests: not hashed
    assert "listed" not in second["timings"] and "prepared" in second["timings"]  # no lander
    assert cold <= 1.05 * size
    prepared = ray.get(gw.prepare.remote(URI))
    assert prepared.complete
    root = Path(second["cache_dir"])
    assert os.stat(root).st_mode & 0o777 == 0o700
    for f in root.rglob("*"):
        if f.is_file():
            assert os.stat(f).st_mode & 0o777 == 0o600, f
    stop_gateways()


def test_a_node_joining_mid_load_reads_correct_bytes(cluster, s3_checkpoint, tmp_path):
    from warmstart.testing.faultproxy import bandwidth
    from warmstart.ray_serve.node_actor import stop_gateways

    c, nodes, proxy = cluster
    want = _digest(oracle(s3_checkpoint))
    size = checkpoint_bytes(s3_checkpoint)
    sharing = {"cache_dir": str(tmp_path / "join-{node_id}"), "piece_size": "4MiB",
               "peer_timeout": 60}
    proxy.reset_stats()
    with proxy.injecting(bandwidth(12e6), method="GET", ranged=True):  # ~4 s in all
        first = _on(nodes[0].node_id).load.remote(sharing)
        deadline = time.monotonic() + 120
        while sum(proxy.stats().bytes_by_key.values()) < size // 4:  # well into the load
            assert time.monotonic() < deadline, "the load never started"
            time.sleep(0.05)
        joined = c.add_node(num_cpus=1, object_store_memory=120 << 20)
        c.wait_for_nodes()
        second = _on(joined.node_id).load.remote(sharing)
        (d1, s1), (d2, s2) = ray.get([first, second], timeout=300)
    assert d1 == want and d2 == want
    # the first node planned without the newcomer and read everything itself; the newcomer
    # planned with both, read its own share, and got the rest from the first node
    assert s2["peer_bytes"] > 0, s2
    assert _s3_bytes(proxy) < 2 * size
    stop_gateways()
