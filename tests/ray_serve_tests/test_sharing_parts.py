"""The parts under the Ray integration, without Ray: piece plans, the node landing area, and
two gateways (real S3 reads, real loader reading the landed files) wired to each other in one
process; the Ray actor calls are stood in for by `Handle`, which calls the same methods on a
thread (the Ray path itself is in test_cluster.py and test_node_path.py)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future

import pytest
import torch

from warmstart.errors import AccessDenied, ConfigError, IntegrityError, NotFound
from warmstart.ray_serve import plan
from warmstart.ray_serve.gateway import Gateway
from warmstart.ray_serve.landing import LandedFile, private_dir, sha256
from warmstart.ray_serve.node_read import gate_for
from warmstart.ray_serve.settings import SharingConfig

from conftest import BUCKET, checkpoint_bytes, oracle

MiB = 1 << 20

NEEDS_RAY = "Ray is not installed (pip install -e '.[ray]')"


def test_pieces_cover_the_object_and_shares_are_disjoint():
    obj = plan.ObjectId("b", "k", 10 * MiB + 5, '"e"')
    ps = plan.pieces(obj.size, 4 * MiB)
    assert [p.length for p in ps] == [4 * MiB, 4 * MiB, 2 * MiB + 5]
    assert sum(p.length for p in ps) == obj.size
    nodes = ("a", "b", "c")
    shares = [set(plan.share(obj, 4 * MiB, nodes, n)) for n in nodes]
    assert set().union(*shares) == {0, 1, 2}
    assert sum(map(len, shares)) == 3
    assert list(plan.pieces_in_range(4 * MiB - 1, 2, obj.size, 4 * MiB)) == [0, 1]
    assert list(plan.pieces_in_range(0, 0, obj.size, 4 * MiB)) == []
    with pytest.raises(ValueError):
        plan.pieces_in_range(obj.size - 1, 2, obj.size, 4 * MiB)
    other = plan.ObjectId("b", "k", obj.size, '"changed"')
    assert plan.piece_key(obj, 4 * MiB, 0) != plan.piece_key(other, 4 * MiB, 0)


def test_sharing_config_rejects_unknown_keys_and_bad_values():
    cfg = SharingConfig.from_mapping({"piece_size": "8MiB", "mode": "node"})
    assert cfg.piece_size == 8 * MiB
    with pytest.raises(ConfigError, match="unknown sharing option.*'peers'"):
        SharingConfig.from_mapping({"peers": 3})
    with pytest.raises(ConfigError, match="mode"):
        SharingConfig(mode="everywhere")
    with pytest.raises(ConfigError, match="piece_size"):
        SharingConfig(piece_size=1000)


def test_landing_area_is_private_to_the_user(tmp_path):
    root = private_dir(str(tmp_path / "cache" / "node"))
    assert os.stat(root).st_mode & 0o777 == 0o700
    f = LandedFile(os.path.join(root, "x.safetensors"), 10_000, 4096)
    f.write(1, b"b" * 4096, sha256(b"b" * 4096))
    assert os.stat(f.path).st_mode & 0o777 == 0o600
    assert os.stat(f.ready_path).st_mode & 0o777 == 0o600
    assert os.path.getsize(f.path) == 10_000  # full size at once, filled in place
    assert f.recorded() == {1: sha256(b"b" * 4096)} and bytes(f.read(1)) == b"b" * 4096
    os.chmod(root, 0o755)  # widened later: closed again
    private_dir(root)
    assert os.stat(root).st_mode & 0o777 == 0o700
    if os.getuid() == 0:  # a folder planted by another user is refused, never used
        planted = tmp_path / "planted"
        planted.mkdir(mode=0o700)
        os.chown(planted, 12345, 12345)
        with pytest.raises(AccessDenied, match="planted.*uid 12345"):
            private_dir(str(planted))
    link = tmp_path / "link"
    link.symlink_to(root)
    with pytest.raises(AccessDenied, match="not a folder"):
        private_dir(str(link))


class Handle:
    """Stands in for the gateway actor's handle: `.wait_ready.remote(...).future()` runs the
    real method on a thread, as the actor's thread pool does."""

    def __init__(self, gateway: Gateway) -> None:
        self.wait_ready = self
        self.gateway = gateway

    def remote(self, path, index):
        fut = Future()

        def run():
            try:
                fut.set_result(self.gateway.wait_ready(path, index))
            except BaseException as exc:  # noqa: BLE001
                fut.set_exception(exc)

        threading.Thread(target=run, daemon=True).start()
        return type("Ref", (), {"future": lambda _self: fut})()


class Pair:
    """Two gateways, 'node-a' and 'node-b', each asking the other for its share."""

    def __init__(self, tmp_path, endpoint: str, piece_size: int = 4 * MiB, hold=None):
        self.settings = SharingConfig(cache_dir=str(tmp_path / "{node_id}"),
                                      piece_size=piece_size, s3_endpoint_url=endpoint,
                                      prefetch=2)
        self.dead: set[str] = set()
        self.hold = hold  # (index, Event): a peer's piece `index` waits for the event
        self.gw = {name: self.gateway(name) for name in ("node-a", "node-b")}

    def gateway(self, name: str, **changes) -> Gateway:
        return Gateway(self.settings.replace(**changes), name,
                       nodes=lambda: ("node-a", "node-b"), peer_fetch=self.fetch)

    def fetch(self, node, obj, index):
        if node in self.dead:
            raise ConnectionError(f"{node} is gone")
        if self.hold is not None and index == self.hold[0]:
            assert self.hold[1].wait(60), "never released"
        return self.gw[node].piece_for_peer(obj, index)

    def close(self):
        for gw in self.gw.values():
            gw.close()


def _load_on(gateway: Gateway, uri: str = f"s3://{BUCKET}/ckpt/"):
    from warmstart.loader import LoaderConfig, load

    prepared = gateway.prepare(uri)
    cfg = LoaderConfig(chunk_size=4 * MiB, memory_budget=32 * MiB, direct_io=False)
    return load(prepared.path, "cpu", config=cfg,
                wrap_source=gate_for(Handle(gateway), prepared)), prepared


def _same(got, want):
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), name


@pytest.fixture
def s3_env(localbucket, monkeypatch):
    for key, value in localbucket.env().items():
        monkeypatch.setenv(key, value)
    return localbucket


def test_two_gateways_read_storage_once_and_catch_a_corrupt_peer(s3_checkpoint, s3_env,
                                                                  tmp_path):
    pytest.importorskip("ray", reason=NEEDS_RAY)  # the replica asks its gateway over Ray
    want = oracle(s3_checkpoint)
    pair = Pair(tmp_path, s3_env.endpoint)
    try:
        got, prepared = _load_on(pair.gw["node-a"])
        _same(got, want)
        assert not prepared.complete  # loaded while the pieces were still landing
        _same(_load_on(pair.gw["node-b"])[0], want)
        a, b = pair.gw["node-a"].stats(), pair.gw["node-b"].stats()
        size = checkpoint_bytes(s3_checkpoint)
        assert a["s3_bytes"] + b["s3_bytes"] <= 1.05 * size, (a, b)
        assert a["peer_bytes"] > 0 and b["peer_bytes"] > 0

        # a warm node: the same gateway answers with every piece landed, no gate at all
        again = pair.gw["node-a"].prepare(f"s3://{BUCKET}/ckpt/")
        assert again.complete and gate_for(Handle(pair.gw["node-a"]), again) is None

        # Damage node-b's landed files and restart it: it re-checks them and keeps none of
        # the damaged pieces; a fresh node-a then lands everything right.
        pair.gw["node-b"].close()
        for f in (tmp_path / "node-b").rglob("*.safetensors"):
            data = bytearray(f.read_bytes())
            for i in range(0, len(data), 4 * MiB):
                data[i + 100] ^= 0xFF
            f.write_bytes(bytes(data))
        pair.gw["node-b"] = pair.gateway("node-b")
        fresh = pair.gateway("node-a", cache_dir=str(tmp_path / "a2"))
        _same(_load_on(fresh)[0], want)
        assert pair.gw["node-b"].stats()["cache_bytes"] < size // 2
        _same(_load_on(pair.gw["node-b"])[0], want)

        # A dead peer: node-a falls back to object storage for node-b's share.
        pair.dead.add("node-b")
        lonely = pair.gateway("node-a", cache_dir=str(tmp_path / "a3"))
        _same(_load_on(lonely)[0], want)
        assert lonely.stats()["peer_failures"] >= 1
        assert lonely.stats()["s3_bytes"] >= size * 0.95
        for gw in (fresh, lonely):
            gw.close()
    finally:
        pair.close()


def test_peer_bytes_that_do_not_match_their_digest_are_read_again(s3_checkpoint, s3_env,
                                                                  tmp_path):
    pytest.importorskip("ray", reason=NEEDS_RAY)  # the replica asks its gateway over Ray
    want = oracle(s3_checkpoint)
    pair = Pair(tmp_path, s3_env.endpoint)
    real = pair.fetch

    def flipped(node, obj, index):
        digest, data = real(node, obj, index)
        damaged = bytearray(data)
        damaged[len(damaged) // 2] ^= 0xFF
        return digest, bytes(damaged)

    try:
        pair.gw["node-a"]._peer_fetch = flipped
        _same(_load_on(pair.gw["node-a"])[0], want)
        st = pair.gw["node-a"].stats()
        assert st["digest_mismatches"] > 0 and st["peer_bytes"] == 0, st
    finally:
        pair.close()


def test_the_replica_reads_first_pieces_before_the_last_has_landed(s3_checkpoint, s3_env,
                                                                  tmp_path):
    pytest.importorskip("ray", reason=NEEDS_RAY)  # the replica asks its gateway over Ray
    """Pipelined: while the later pieces cannot land (their object storage reads wait for an
    event), the tensors in the first pieces are already handed out."""
    from warmstart.loader import LoaderConfig, stream

    want = oracle(s3_checkpoint)
    release = threading.Event()
    hold_from = 2 * (4 * MiB)

    class HeldBack(Gateway):  # the real gateway; only its later object-storage reads wait
        def _get_into(self, obj, offset, view):
            if offset >= hold_from:
                assert release.wait(60), "never released"
            return super()._get_into(obj, offset, view)

    gw = HeldBack(SharingConfig(cache_dir=str(tmp_path / "c"), mode="node", piece_size=4 * MiB,
                                prefetch=2, s3_endpoint_url=s3_env.endpoint), "n")
    try:
        prepared = gw.prepare(f"s3://{BUCKET}/ckpt/")
        cfg = LoaderConfig(chunk_size=1 * MiB, memory_budget=8 * MiB, direct_io=False,
                           group_size=1 * MiB)
        out, early = {}, 0
        for name, tensor in stream(prepared.path, "cpu", config=cfg,
                                   wrap_source=gate_for(Handle(gw), prepared)):
            out[name] = tensor.clone()
            if not release.is_set():
                landed = {p: gw.wait_ready(p, 0) for p in prepared.files
                          if p.endswith(".safetensors")}
                assert all(max(ready) < 2 for ready in landed.values()), landed
                early += 1
                release.set()
        _same(out, want)
        assert early == 1  # a tensor came out while no piece past the second had landed
    finally:
        release.set()
        gw.close()


def test_object_storage_errors_reach_the_replica_by_name(s3_env, tmp_path):
    s3_env.create_bucket(BUCKET)
    gw = Gateway(SharingConfig(cache_dir=str(tmp_path / "c"), mode="node",
                               s3_endpoint_url=s3_env.endpoint), "n")
    try:
        with pytest.raises(NotFound, match="no-such"):
            gw.prepare(f"s3://{BUCKET}/no-such/model.safetensors")
        with pytest.raises(NotFound, match="no-such-prefix"):
            gw.prepare(f"s3://{BUCKET}/no-such-prefix/")
        with pytest.raises(NotFound, match="not a file"):
            gw.wait_ready(str(tmp_path / "elsewhere"), 0)
    finally:
        gw.close()


def test_whole_versions_are_evicted_least_recently_used_first(s3_checkpoint, s3_env, tmp_path):
    pytest.importorskip("ray", reason=NEEDS_RAY)  # the replica asks its gateway over Ray
    size = checkpoint_bytes(s3_checkpoint)
    for i in range(2):  # a second version of the checkpoint under another prefix
        s3_env.upload_tree(s3_checkpoint, BUCKET, f"copy{i}")
    gw = Gateway(SharingConfig(cache_dir=str(tmp_path / "c"), mode="node", piece_size=4 * MiB,
                               cache_size=int(size * 1.5), s3_endpoint_url=s3_env.endpoint),
                 "n")
    try:
        first = _load_on(gw, f"s3://{BUCKET}/copy0/")[1]
        second = _load_on(gw, f"s3://{BUCKET}/copy1/")[1]  # the same long-lived gateway
        assert not os.path.exists(first.path) and os.path.exists(second.path)
        held = {f.stat().st_ino: f.stat().st_blocks * 512 for f in (tmp_path / "c").rglob("*")
                if f.is_file()}  # hard links counted once
        assert sum(held.values()) <= 1.5 * size
        got, again = _load_on(gw, f"s3://{BUCKET}/copy0/")  # landed again after eviction
        _same(got, oracle(s3_checkpoint))
        assert os.path.exists(again.path) and not os.path.exists(second.path)
        with pytest.raises(IntegrityError, match="no piece 99"):
            gw.wait_ready(next(iter(again.files)), 99)
    finally:
        gw.close()


def test_llm_callback_fills_the_plugin_config():
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    pytest.importorskip("ray.llm._internal.common.callbacks.base",
                        reason="this Ray has no ray.serve.llm callbacks")
    from warmstart.ray_serve.llm import plan_extra_config

    out = plan_extra_config(None, None, "s3://b/m/", "/tmp/node/v1")
    assert out == {"weights": "/tmp/node/v1", "node_cache": "off"}  # ranks share the node copy
    # the user's own keys win; a JSON string is accepted (vLLM's CLI form)
    out = plan_extra_config('{"weights": "s3://b/other/", "chunk_size": "8MiB"}', None,
                            "s3://b/m/", None)
    assert out == {"weights": "s3://b/other/", "chunk_size": "8MiB"}
    # local weights never go through the gateway
    assert plan_extra_config({}, "/models/m", None, "/tmp/node/v1") == {
        "weights": "/models/m"}
    with pytest.raises(ConfigError, match="unknown key"):
        plan_extra_config({"weigths": "x"}, None, None, None)


def test_two_landers_of_one_node_fetch_each_piece_once(s3_checkpoint, s3_env, tmp_path):
    """A replica landing on a cold node and the node's gateway, started meanwhile, land the
    same checkpoint into one node cache at once: each piece is read from object storage by
    one of them (the other waits on the piece's claim and takes it over), both read right."""
    pytest.importorskip("ray", reason=NEEDS_RAY)  # the replica asks its gateway over Ray
    want = oracle(s3_checkpoint)
    settings = SharingConfig(cache_dir=str(tmp_path / "{node_id}"), mode="node",
                             piece_size=4 * MiB, prefetch=2, s3_endpoint_url=s3_env.endpoint)
    # two instances, two open file descriptions per file: they exclude each other exactly as
    # two processes do
    replica, gateway = Gateway(settings, "n"), Gateway(settings, "n")
    try:
        results = {}
        threads = [threading.Thread(target=lambda k=k, g=g: results.setdefault(k, _load_on(g)))
                   for k, g in (("replica", replica), ("gateway", gateway))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results.keys() == {"replica", "gateway"}
        for got, _ in results.values():
            _same(got, want)
        a, b = replica.stats(), gateway.stats()
        assert a["s3_bytes"] + b["s3_bytes"] <= 1.05 * checkpoint_bytes(s3_checkpoint), (a, b)
        assert a["landed_pieces"] and b["landed_pieces"]
    finally:
        replica.close()
        gateway.close()


def test_a_claim_dies_with_its_process(tmp_path):
    """A lander killed while it holds a piece's claim does not block the node: the kernel
    drops its lock and the next lander gets the piece."""
    import fcntl
    import struct
    import subprocess
    import sys

    root = private_dir(str(tmp_path / "c"))
    path = os.path.join(root, "obj")
    f = LandedFile(path, 3 * 4096, 4096)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\n"
         "from warmstart.ray_serve.landing import LandedFile\n"
         f"f = LandedFile({path!r}, 3 * 4096, 4096)\n"
         "with f.claim(1):\n"
         "    print('held', flush=True)\n"
         "    sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 4096, 4096, 0)
        held = struct.unpack("hhqqi4x", fcntl.fcntl(f._fd, fcntl.F_OFD_GETLK, probe))
        assert held[0] == fcntl.F_WRLCK  # piece 1 is claimed by the other process
        free = struct.unpack("hhqqi4x", fcntl.fcntl(
            f._fd, fcntl.F_OFD_GETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0,
                                                  4096, 0)))
        assert free[0] == fcntl.F_UNLCK  # piece 0 is not
        got = threading.Event()

        def take():
            with f.claim(1):
                got.set()
        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        holder.kill()
        holder.wait(30)
        assert got.wait(60)
        taker.join(60)
    finally:
        if holder.poll() is None:
            holder.kill()
        f.close()
