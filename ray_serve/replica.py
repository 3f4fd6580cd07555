"""Loading a checkpoint when a Serve replica starts.

Two ways, both running inside the replica process:
  * `load_in_replica(uri, ...)` from the deployment's `__init__`;
  * `@preload(uri, ...)` under `@serve.deployment`: the weights are loaded before the user's
    `__init__` runs and handed to it as a keyword argument.
Ray 2.60 honours `worker_process_setup_hook` only in the job's runtime_env (`ray.init`), not
in a deployment's `ray_actor_options` (there the field is stored and ignored), so a per-replica
hook has to live in the replica's class: that is what `preload` does.

Progress goes to the replica's log (logger "ray.serve.warmstart", so Serve's per-replica log
files show it) and to Ray metrics: `warmstart_load_seconds`, `warmstart_load_bytes` and
`warmstart_load_progress`, tagged with the checkpoint URI.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from warmstart.ray_serve.settings import SharingConfig

if TYPE_CHECKING:
    from warmstart.loader.config import LoaderConfig

log = logging.getLogger("ray.serve.warmstart")
PROGRESS_STEPS = 10  # log lines per load
_landed: dict[str, float] = {}  # counters of the landings this process did itself
_timings: dict[str, float] = {}  # the last load's steps (see last_load_timings)


def last_load_timings() -> dict[str, float]:
    """Where this process's last `load_in_replica` spent its time: seconds from its start to
    each step (`gateway_looked_up`, `nodes_listed`, `gateway_asked`, `s3_client`, `listed`,
    `small_landed`, `first_piece_landed` when it landed for itself, `loader_imported`,
    `prepared`, `first_bytes`, `loaded`, `closed`), and totals over the load (`gate_waits`,
    `gate_wait_seconds`: the loader's reads that waited for a piece; and the lander's
    `s3_seconds`, `hash_seconds`, `peer_seconds`, `write_seconds`, `claim_wait_seconds`).
    Empty before the first load."""
    return dict(_timings)


def landing_stats() -> dict[str, float]:
    """What this process's own landings obtained, summed over its loads (the counters of
    `Gateway.stats`: `s3_bytes`, `peer_bytes`, `peer_failures`, ...). A replica on a cold
    node lands for itself while the node's gateway starts, so the node's fetches are these
    plus the gateway actor's `stats()`. Empty if it never landed anything itself."""
    return dict(_landed)


def _metrics():
    from ray.util import metrics

    tags = ("uri",)
    return (metrics.Gauge("warmstart_load_seconds", "Seconds the last warmstart load took",
                          tag_keys=tags),
            metrics.Counter("warmstart_load_bytes", "Checkpoint bytes loaded by warmstart",
                            tag_keys=tags),
            metrics.Gauge("warmstart_load_progress", "Fraction of the current load done",
                          tag_keys=tags))


def load_in_replica(uri: str, device: str = "cpu", *, names: Iterable[str] | None = None,
                    dtype=None, config: LoaderConfig | None = None,
                    sharing: SharingConfig | Mapping[str, Any] | None = None) -> dict:
    """`warmstart.load` for a Serve replica (or any Ray actor): s3:// checkpoints are landed
    on the node (one copy per node, a cluster-wide single read; by this replica itself while
    the node's gateway starts, see `node_read.NodeLanding`) and read from there as local
    files, piece by piece as they arrive; progress and time are logged and exported as Ray
    metrics. Returns `{name: tensor}`."""
    if not isinstance(sharing, SharingConfig):
        sharing = SharingConfig.from_mapping(sharing)
    if config is not None and config.s3_endpoint_url and sharing.s3_endpoint_url is None:
        sharing = sharing.replace(s3_endpoint_url=config.s3_endpoint_url)
    started = time.perf_counter()
    _timings.clear()

    def mark(hop: str) -> None:  # the first time each step is reached
        _timings.setdefault(hop, round(time.perf_counter() - started, 4))

    shared = sharing.mode != "off" and uri.startswith("s3://")
    landing = None
    if shared:  # the landing starts now, while this process imports the loader (and torch)
        from warmstart.ray_serve.node_read import NodeLanding

        mark("landing_imported")
        landing = NodeLanding(uri, sharing, mark)
    try:
        return _load(uri, device, names, dtype, config, sharing, landing, started, mark)
    finally:
        if landing is not None:
            landing.close()
            mark("closed")
            stats = landing.stats()
            for key, value in stats.items():
                _landed[key] = _landed.get(key, 0) + value
            for key in ("s3_seconds", "hash_seconds", "peer_seconds", "write_seconds",
                        "claim_wait_seconds", "s3_bytes", "peer_bytes", "peer_failures"):
                if key in stats:
                    _timings[key] = round(stats[key], 4)
            if landing.waiter is not None:
                _timings["gate_waits"] = landing.waiter.waits
                _timings["gate_wait_seconds"] = round(landing.waiter.wait_seconds, 4)


def _load(uri, device, names, dtype, config, sharing, landing, started, mark) -> dict:
    from warmstart.loader import load
    from warmstart.loader.config import LoaderConfig

    mark("loader_imported")
    cfg = config if config is not None else LoaderConfig.from_env()
    read_uri, wrap, answered = uri, None, 0.0
    if landing is not None:
        prepared = landing.prepared()
        mark("prepared")
        answered = time.perf_counter() - started
        read_uri, wrap = prepared.path, landing.gate(prepared)
        if wrap is not None:  # pieces arrive in the page cache: no O_DIRECT for them
            cfg = cfg.replace(direct_io=False)
    seconds_gauge, bytes_counter, progress_gauge = _metrics()
    tags = {"uri": uri}
    who = "" if landing is None else ("this replica (the gateway starts meanwhile)"
                                      if landing.local else "the node's gateway")
    log.info("warmstart: loading %s to %s (sharing: %s%s)", uri, device, sharing.mode,
             f", node copy {read_uri}" + (", landing" if wrap else ", complete")
             + f" by {who}, prepared after {answered:.2f}s" if landing else "")
    state = {"step": 0, "last": 0}

    def progress(done: int, total: int) -> None:
        if done:
            mark("first_bytes")
        if done > state["last"]:  # Ray counters reject increments of 0
            bytes_counter.inc(done - state["last"], tags)
            state["last"] = done
        frac = done / total if total else 1.0
        progress_gauge.set(frac, tags)
        if frac * PROGRESS_STEPS >= state["step"] + 1:
            state["step"] = int(frac * PROGRESS_STEPS)
            log.info("warmstart: %s %3.0f%% (%.1f of %.1f MB, %.1fs)", uri, 100 * frac,
                     done / 1e6, total / 1e6, time.perf_counter() - started)

    tensors = load(read_uri, device, names=names, dtype=dtype, config=cfg, progress=progress,
                   wrap_source=wrap)
    seconds = time.perf_counter() - started
    mark("loaded")
    seconds_gauge.set(seconds, tags)
    progress_gauge.set(1.0, tags)
    log.info("warmstart: loaded %d tensors (%.1f MB) from %s in %.2fs", len(tensors),
             state["last"] / 1e6, uri, seconds)
    return tensors


def preload(uri: str, *, argument: str = "weights", device: str = "cpu",
            config: LoaderConfig | None = None,
            sharing: SharingConfig | Mapping[str, Any] | None = None, **load_kwargs):
    """Class decorator: each replica loads `uri` before the class's `__init__` runs, and
    passes the tensors to it as the keyword argument `argument`.

        @serve.deployment
        @preload("s3://models/llama/", device="cuda:0")
        class Model:
            def __init__(self, weights): ...
    """
    def wrap(cls):
        @functools.wraps(cls, updated=())
        class Preloaded(cls):
            def __init__(self, *args, **kwargs):
                kwargs[argument] = load_in_replica(uri, device, config=config, sharing=sharing,
                                                   **load_kwargs)
                super().__init__(*args, **kwargs)

        return Preloaded

    return wrap
