"""One read of object storage per node, however many tensor-parallel ranks it runs.

vLLM's weight loaders give every rank the whole tensor and let it cut its own slice, so with
TP=8 on one node a naive loader reads the checkpoint from S3 eight times. Here the ranks of
one engine on one node agree through a file lock: the first rank to take it streams the
checkpoint once into a node-local folder (safetensors shards of at most `SHARD_BYTES` plus an
index), and every rank then streams from that folder (local disk, mostly page cache). The rank
that finishes last removes the folder. A rank that dies while filling releases the lock with
its process, and the next rank starts the copy again.

The folder is keyed by the weights URI and vLLM's per-engine `instance_id`, which all ranks of
one engine share; engines never reuse each other's copies, so a changed object cannot be
served stale.

No second copy of bytes the node already has: a local checkpoint is always read in place (every
rank maps the same page cache), whatever `node_cache` says. Under `ray.serve.llm` the Ray node
gateway's copy is such a local checkpoint (its callback points `weights` at it and turns
`node_cache` off). Only an `s3://` checkpoint gets the node folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

from warmstart.vllm_plugin.options import PluginOptions

SHARD_BYTES = 1 << 30
COMPLETE = "COMPLETE"
READERS = "readers"
INDEX_NAME = "model.safetensors.index.json"
logger = logging.getLogger("vllm.warmstart")  # shown by vLLM's own log handler


@dataclass(frozen=True)
class SharePlan:
    folder: str
    readers: int  # ranks of this engine on this node; the last one to finish cleans up


def plan_sharing(uri: str, options: PluginOptions, ranks_on_node: int, instance_id: str,
                 cache_root: str) -> SharePlan | None:
    """Whether (and where) the ranks on this node share one copy. Pure."""
    if options.node_cache == "off" or not uri.startswith("s3://"):
        return None  # local files are read in place: the ranks share the page cache
    if options.node_cache == "auto" and ranks_on_node < 2:
        return None
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    root = options.node_cache_dir or cache_root
    return SharePlan(folder=os.path.join(root, f"{key}-{instance_id}"),
                     readers=max(ranks_on_node, 1))


@contextlib.contextmanager
def shared_copy(uri: str, options: PluginOptions, loader_config) -> Iterator[str]:
    """Yields the URI this rank should read: `uri` itself, or the node-local copy."""
    ranks, instance_id, cache_root = _engine_facts()
    plan = plan_sharing(uri, options, ranks, instance_id, cache_root)
    if plan is None:
        yield uri
        return
    def fill(folder: str) -> None:
        fill_copy(uri, folder, loader_config)
        logger.info("warmstart: copied %s to the node-local folder %s for %d ranks", uri,
                    plan.folder, plan.readers)

    local = acquire(plan, fill)
    try:
        yield local
    finally:
        release(plan)


@contextlib.contextmanager
def _locked(folder: str):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def acquire(plan: SharePlan, fill) -> str:
    """Fills the copy unless another rank already has; returns the local index path."""
    with _locked(plan.folder):
        data = os.path.join(plan.folder, "data")
        if not os.path.exists(os.path.join(plan.folder, COMPLETE)):
            shutil.rmtree(data, ignore_errors=True)  # left by a rank that died while filling
            os.makedirs(data)
            fill(data)
            with open(os.path.join(plan.folder, COMPLETE), "w") as f:
                f.write("ok\n")
        return os.path.join(data, INDEX_NAME)


def release(plan: SharePlan) -> None:
    """Counts this rank as done; the last of `plan.readers` removes the copy."""
    with _locked(plan.folder):
        path = os.path.join(plan.folder, READERS)
        done = int(open(path).read() or 0) + 1 if os.path.exists(path) else 1
        with open(path, "w") as f:
            f.write(str(done))
        last = done >= plan.readers
        if last:
            shutil.rmtree(os.path.join(plan.folder, "data"), ignore_errors=True)
            for name in (COMPLETE, READERS):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(plan.folder, name))
    if last:
        shutil.rmtree(plan.folder, ignore_errors=True)


def fill_copy(uri: str, folder: str, loader_config, shard_bytes: int = SHARD_BYTES) -> None:
    """Streams the checkpoint once into `folder` as shards of at most `shard_bytes` (a single
    larger tensor gets a shard of its own) plus an index, holding one shard in memory."""
    from safetensors.torch import save_file

    from warmstart.loader import stream

    weight_map: dict[str, str] = {}
    pending: dict = {}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            name = f"part-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(pending, os.path.join(folder, name))
            weight_map.update(dict.fromkeys(pending, name))
        pending, pending_bytes = {}, 0

    for name, tensor in stream(uri, "cpu", config=loader_config):
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > shard_bytes:
            flush()
        pending[name] = tensor.contiguous()
        pending_bytes += size
    flush()
    with open(os.path.join(folder, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"source": uri}, "weight_map": weight_map}, f)


def _engine_facts() -> tuple[int, str, str]:
    """(ranks of this engine on this node, the engine's instance id, default cache root)."""
    import vllm.envs as envs
    from vllm.config import get_current_vllm_config

    config = get_current_vllm_config()
    parallel = config.parallel_config
    nnodes = max(getattr(parallel, "nnodes", 1) or 1, 1)
    ranks = max(parallel.world_size // nnodes, 1)
    instance_id = str(getattr(config, "instance_id", "") or os.getppid())
    return ranks, instance_id, os.path.join(envs.VLLM_CACHE_ROOT, "warmstart-node-cache")
