"""A real Serve app: two replicas load one checkpoint from the local S3 server through the
`preload` hook and answer from the loaded weights, bit-identical to safetensors; the node reads
object storage about once for both (counted by a proxy in front of the server)."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import BUCKET, checkpoint_bytes, oracle

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
serve = pytest.importorskip("ray.serve")
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def counted_s3(localbucket, s3_checkpoint):
    from warmstart.testing.faultproxy import FaultProxy

    with FaultProxy(localbucket.endpoint) as proxy:
        yield proxy


def test_serve_replicas_load_through_the_hook(counted_s3, localbucket, s3_checkpoint,
                                              tmp_path):
    from warmstart.testing.s3server import free_port

    from serve_app import build, digests_of

    reports = tmp_path / "replicas"
    reports.mkdir()
    env = {**localbucket.env(), "AWS_ENDPOINT_URL": counted_s3.endpoint,
           "PYTHONPATH": str(HERE), "SERVE_APP_REPORT_DIR": str(reports)}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env},
             logging_level="warning")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        sharing = {"cache_dir": str(tmp_path / "chunks-{node_id}"), "piece_size": "4MiB"}
        started = time.perf_counter()
        handle = serve.run(build(f"s3://{BUCKET}/ckpt/", sharing, replicas=2), name="ws",
                           route_prefix="/model")
        startup = time.perf_counter() - started

        want = digests_of(oracle(s3_checkpoint))
        answers = [r.result() for r in [handle.answer.remote() for _ in range(4)]]
        assert all(digests == want for _, digests in answers)
        # serve.run returns once both replicas are up: each wrote what it loaded
        loaded = {p.stem: json.loads(p.read_text()) for p in reports.glob("*.json")}
        assert len(loaded) == 2, f"two replicas loaded, saw {sorted(loaded)}"
        assert all(digests == want for digests in loaded.values())

        name = sorted(want)[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/model?tensor={name}",
                                    timeout=30) as resp:
            answer = json.loads(resp.read())
        assert answer["label"] == "warmstart"
        assert answer["sum"] == pytest.approx(float(oracle(s3_checkpoint)[name].float().sum()))

        counted_s3.wait_idle()
        read = sum(n for key, n in counted_s3.stats().bytes_by_key.items()
                   if key.endswith(".safetensors"))
        size = checkpoint_bytes(s3_checkpoint)
        assert read <= 1.2 * size, f"object storage served {read} bytes for a {size}-byte " \
                                   f"checkpoint and 2 replicas"

        logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
        lines = [l for f in logs.glob("replica_*.log") for l in f.read_text().splitlines()
                 if "warmstart: loaded" in l]
        assert len(lines) >= 2, "each replica logs its load time"
        print(f"serve.run to ready: {startup:.1f}s; S3 bytes {read} / checkpoint {size}")
    finally:
        serve.shutdown()
        ray.shutdown()
