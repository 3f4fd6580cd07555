"""The parts under the Ray integration, without Ray: piece plans, the chunk cache, and two
gateways (real S3 reads, real HTTP front, real loader) wired to each other in one process."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from warmstart.errors import ConfigError, DigestMismatch
from warmstart.ray_serve import plan
from warmstart.ray_serve.chunk_cache import ChunkCache, sha256
from warmstart.ray_serve.gateway import Gateway
from warmstart.ray_serve.s3front import S3Front
from warmstart.ray_serve.settings import SharingConfig

from conftest import BUCKET, checkpoint_bytes, oracle

MiB = 1 << 20


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


def test_cache_is_content_addressed_and_heals(tmp_path):
    cache = ChunkCache(str(tmp_path), 1 << 30)
    digest = cache.put_named("k1", b"hello")
    assert digest == sha256(b"hello")
    assert cache.get_named("k1") == (digest, b"hello")
    with pytest.raises(DigestMismatch):
        cache.put(b"other", digest)
    with open(cache.data_path(digest), "r+b") as f:
        f.write(b"j")  # damaged on disk
    assert cache.get_named("k1", verify=False) == (digest, b"jello")
    assert cache.get_named("k1") is None  # verified read: detected and deleted
    assert not os.path.exists(cache.data_path(digest))


def test_cache_evicts_least_recently_used(tmp_path):
    cache = ChunkCache(str(tmp_path), 10_000)
    digests = []
    for i in range(3):
        digests.append(cache.put(bytes([i]) * 3000))
        os.utime(cache.data_path(digests[-1]), (i, i))  # distinct ages, oldest first
    cache.get(digests[0])  # used again: now the newest
    digests.append(cache.put(bytes([3]) * 3000))  # 12000 > 10000: evict down to 9000
    assert cache.usage() <= 9000
    assert cache.get(digests[1]) is None  # the least recently used went first
    assert all(cache.get(d) is not None for d in (digests[0], digests[2], digests[3]))


def _writer(root: str, seed: int, out) -> None:
    cache = ChunkCache(root, 40 * 4096)
    got = []
    for i in range(60):
        data = bytes([(seed + i) % 7]) * 4096 * (1 + i % 3)
        digest = cache.put_named(f"key{(seed + i) % 7}-{len(data)}", data)
        hit = cache.get(digest)
        got.append(hit is None or sha256(hit) == digest)
    out.put(all(got))


def test_concurrent_writers_never_expose_partial_files(tmp_path):
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), s, out)) for s in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert all(out.get(timeout=5) for _ in procs)
    cache = ChunkCache(str(tmp_path), 40 * 4096)
    for sub in (tmp_path / "data").iterdir():
        for f in sub.iterdir():
            assert not f.name.startswith(".tmp"), "a temporary file was left behind"
            assert sha256(f.read_bytes()) == f.name
    assert cache.usage() <= 40 * 4096 + 3 * 4096 * 4  # bound (plus writers mid-put)


class Pair:
    """Two gateways, 'node-a' and 'node-b', each asking the other for its share."""

    def __init__(self, tmp_path, endpoint: str, piece_size: int = 4 * MiB):
        settings = SharingConfig(cache_dir=str(tmp_path / "{node_id}"), piece_size=piece_size,
                                 s3_endpoint_url=endpoint, prefetch=2)
        nodes = lambda: ("node-a", "node-b")  # noqa: E731
        self.gw = {}
        for name in ("node-a", "node-b"):
            self.gw[name] = Gateway(settings, name, nodes=nodes, peer_fetch=self.fetch)
        self.dead: set[str] = set()
        self.fronts = {n: S3Front(g) for n, g in self.gw.items()}

    def fetch(self, node, obj, index):
        if node in self.dead:
            raise ConnectionError(f"{node} is gone")
        return self.gw[node].piece_for_peer(obj, index)

    def stop(self):
        for front in self.fronts.values():
            front.stop()


def _load_via(front: S3Front):
    from warmstart.loader import LoaderConfig, load

    cfg = LoaderConfig(s3_endpoint_url=front.endpoint, s3_data_path="raw", chunk_size=4 * MiB,
                       memory_budget=32 * MiB)
    return load(f"s3://{BUCKET}/ckpt/", "cpu", config=cfg)


def _same(got, want):
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_two_gateways_read_storage_once_and_catch_a_corrupt_peer(s3_checkpoint, localbucket,
                                                                  tmp_path, monkeypatch):
    for key, value in localbucket.env().items():
        monkeypatch.setenv(key, value)
    want = oracle(s3_checkpoint)
    pair = Pair(tmp_path, localbucket.endpoint)
    try:
        _same(_load_via(pair.fronts["node-a"]), want)
        _same(_load_via(pair.fronts["node-b"]), want)
        a, b = pair.gw["node-a"].stats(), pair.gw["node-b"].stats()
        size = checkpoint_bytes(s3_checkpoint)
        assert a["s3_bytes"] + b["s3_bytes"] <= 1.2 * size, (a, b)
        assert a["peer_bytes"] > 0 and b["peer_bytes"] + b["cache_bytes"] > 0

        # Damage every piece node-b holds on disk and restart it (its memory is gone), empty
        # node-a's cache: node-a must notice the peer's bytes do not match their digest and
        # read object storage instead.
        for gw in pair.gw.values():
            gw.flush()
        pair.gw["node-b"] = Gateway(pair.gw["node-b"].settings, "node-b",
                                    nodes=lambda: ("node-a", "node-b"), peer_fetch=pair.fetch)
        for f in (tmp_path / "node-b" / "data").rglob("*"):
            if f.is_file():
                data = bytearray(f.read_bytes())
                data[len(data) // 2] ^= 0xFF
                f.write_bytes(bytes(data))
        fresh = Gateway(pair.gw["node-a"].settings.replace(cache_dir=str(tmp_path / "a2")),
                        "node-a", nodes=lambda: ("node-a", "node-b"), peer_fetch=pair.fetch)
        front = S3Front(fresh)
        try:
            _same(_load_via(front), want)
        finally:
            front.stop()
        st = fresh.stats()
        assert st["digest_mismatches"] > 0 and st["peer_bytes"] == 0, st

        # A dead peer: node-a falls back to object storage for node-b's share.
        pair.dead.add("node-b")
        lonely = Gateway(fresh.settings.replace(cache_dir=str(tmp_path / "a3")), "node-a",
                         nodes=lambda: ("node-a", "node-b"), peer_fetch=pair.fetch)
        front = S3Front(lonely)
        try:
            _same(_load_via(front), want)
        finally:
            front.stop()
        assert lonely.stats()["peer_failures"] >= 1
    finally:
        pair.stop()


def test_front_answers_s3_errors_the_loader_understands(localbucket, tmp_path, monkeypatch):
    from warmstart.errors import NotFound
    from warmstart.loader import LoaderConfig, load

    for key, value in localbucket.env().items():
        monkeypatch.setenv(key, value)
    localbucket.create_bucket(BUCKET)
    gw = Gateway(SharingConfig(cache_dir=str(tmp_path), mode="node",
                               s3_endpoint_url=localbucket.endpoint), "n")
    front = S3Front(gw)
    try:
        cfg = LoaderConfig(s3_endpoint_url=front.endpoint, s3_data_path="raw")
        with pytest.raises(NotFound):
            load(f"s3://{BUCKET}/no-such/model.safetensors", config=cfg)
        with pytest.raises(NotFound):
            load(f"s3://{BUCKET}/no-such-prefix/", config=cfg)
    finally:
        front.stop()


def test_llm_callback_fills_the_plugin_config():
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    pytest.importorskip("ray.llm._internal.common.callbacks.base",
                        reason="this Ray has no ray.serve.llm callbacks")
    from warmstart.ray_serve.llm import plan_extra_config

    out = plan_extra_config(None, None, "s3://b/m/", "http://127.0.0.1:9")
    assert out == {"weights": "s3://b/m/", "s3_endpoint_url": "http://127.0.0.1:9",
                   "s3_data_path": "raw"}
    # the user's own keys win; a JSON string is accepted (vLLM's CLI form)
    out = plan_extra_config('{"weights": "s3://b/other/", "chunk_size": "8MiB"}', None,
                            "s3://b/m/", None)
    assert out == {"weights": "s3://b/other/", "chunk_size": "8MiB"}
    # local weights never go through the gateway
    assert plan_extra_config({}, "/models/m", None, "http://127.0.0.1:9") == {
        "weights": "/models/m"}
    with pytest.raises(ConfigError, match="unknown key"):
        plan_extra_config({"weigths": "x"}, None, None, None)
