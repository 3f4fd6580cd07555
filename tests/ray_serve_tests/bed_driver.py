"""The Ray driver of test_bed.py, run on the bed's head host (`ip netns exec`): a Ray driver
must run on a node of its cluster, and the bed's nodes are reachable only from its hosts.

  python bed_driver.py BED_JSON SCENARIO PARAMS_JSON OUT_JSON

Scenarios (PARAMS: "hosts": roles with a replica each, "sharing": the options, "size": the
checkpoint's bytes):
  load   one replica per host loads the checkpoint, with `"modes"` in turn (off, cluster);
         per mode: digests, gateway stats, bytes sent by the storage host's link and bytes
         received by each node's link
  leave  the replicas start loading; once the storage host has sent a quarter of the
         checkpoint, host `"leaving"` goes down (every process on it ends)
  join   the replicas start loading; once the storage host has sent a quarter, host
         `"joining"` starts Ray and joins, and a replica there loads too
"""

from __future__ import annotations

import json
import sys
import time

import ray

from test_cluster import Replica
from warmstart.testing.netns import TestBed, start_ray

URI = "s3://ray-models/ckpt/"


class HostReplica(Replica):
    def address(self) -> str:
        return ray.util.get_node_ip_address()


def _replica(node_id: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(HostReplica).options(num_cpus=0, scheduling_strategy=(
        NodeAffinitySchedulingStrategy(node_id, soft=False))).remote()


def _node_ids(deadline: float, want: set[str]) -> dict[str, str]:
    """{address: node id} of the alive nodes, once every address in `want` is alive."""
    while True:
        alive = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
        if want <= alive.keys():
            return alive
        if time.monotonic() > deadline:
            raise TimeoutError(f"nodes {sorted(want - alive.keys())} never became alive")
        time.sleep(0.2)


def _wait_sent(bed: TestBed, start: int, n: int, deadline: float) -> None:
    storage = bed.hosts["s3"]
    while bed.link_bytes(storage)[0] - start < n:
        if time.monotonic() > deadline:
            raise TimeoutError("the storage host never sent a quarter of the checkpoint")
        time.sleep(0.05)


def main(bed_json: str, scenario: str, params: dict) -> dict:
    from warmstart.ray_serve.node_actor import stop_gateways

    bed = TestBed.attach(bed_json)
    head = bed.hosts[params["head"]]
    ray.init(address=f"{head.address}:6379", logging_level="warning", log_to_driver=False,
             runtime_env={"env_vars": params["env"]})
    deadline = time.monotonic() + 240
    hosts = [bed.hosts[r] for r in params["hosts"]]
    ids = _node_ids(deadline, {h.address for h in hosts})
    replicas = {h.role: _replica(ids[h.address]) for h in hosts}
    storage = bed.hosts["s3"]
    out: dict = {"where": {r: ray.get(a.address.remote(), timeout=120)
                           for r, a in replicas.items()}}
    if scenario == "load":
        for mode in params["modes"]:
            sharing = {**params["sharing"], "mode": mode,
                       "cache_dir": f"{bed.workdir}/cache-{mode}-{{node_id}}"}
            sent0 = bed.link_bytes(storage)[0]
            got0 = {h.role: bed.link_bytes(h)[1] for h in hosts}
            results = ray.get([replicas[h.role].load.remote(sharing) for h in hosts],
                              timeout=300)
            out[mode] = {"digests": [d for d, _ in results], "stats": [s for _, s in results],
                         "s3_sent": bed.link_bytes(storage)[0] - sent0,
                         "received": {h.role: bed.link_bytes(h)[1] - got0[h.role]
                                      for h in hosts}}
            stop_gateways()
        return out
    sharing = {**params["sharing"], "cache_dir": f"{bed.workdir}/cache-{scenario}-{{node_id}}"}
    sent0 = bed.link_bytes(storage)[0]
    refs = {r: a.load.remote(sharing) for r, a in replicas.items()}
    _wait_sent(bed, sent0, params["size"] // 4, time.monotonic() + 120)
    if scenario == "leave":
        bed.stop(bed.hosts[params["leaving"]])
        gone = refs.pop(params["leaving"])
        try:
            ray.get(gone, timeout=120)
            out["gone"] = "completed"
        except ray.exceptions.RayError as exc:
            out["gone"] = type(exc).__name__
    elif scenario == "join":
        joining = bed.hosts[params["joining"]]
        start_ray(bed, joining, address=f"{head.address}:6379",
                  object_store_memory=params.get("object_store_memory", 200 << 20))
        ids = _node_ids(time.monotonic() + 120, {joining.address})
        replicas[joining.role] = _replica(ids[joining.address])
        out["where"][joining.role] = ray.get(replicas[joining.role].address.remote(),
                                             timeout=120)
        refs[joining.role] = replicas[joining.role].load.remote(sharing)
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    done = dict(zip(refs, ray.get(list(refs.values()), timeout=300)))
    out["digests"] = {r: d for r, (d, _) in done.items()}
    out["stats"] = {r: s for r, (_, s) in done.items()}
    out["s3_sent"] = bed.link_bytes(storage)[0] - sent0
    stop_gateways()
    return out


if __name__ == "__main__":
    result = main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
    with open(sys.argv[4], "w") as f:
        json.dump(result, f)
