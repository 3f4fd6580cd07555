"""Fixtures for the Ray tests: checkpoints in a local S3 server, and Ray itself.

Ray clusters are started per module by the tests that need one and stopped after, so the
heavy modules never hold two clusters at once on this 2-core machine.
"""

from __future__ import annotations

import os

import pytest

BUCKET = "ray-models"

# Serve kills its HTTP proxy when the proxy is not ready within 5 s or misses health checks
# of 10 s: on two busy cores that is a verdict about the machine's load, not about warmstart.
# Ray's processes inherit these from the driver (the tests' ray.init).
for _name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
    os.environ.setdefault(_name, "300")


@pytest.fixture(scope="session")
def s3_checkpoint(localbucket, tmp_path_factory):
    """A 2-shard bf16 checkpoint (~40 MB) at s3://ray-models/ckpt/ and its local copy."""
    from warmstart.testing.checkpoints import make_checkpoint

    folder = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", 40 << 20, shards=2)
    localbucket.create_bucket(BUCKET)
    localbucket.upload_tree(folder, BUCKET, "ckpt")
    return folder


def oracle(folder):
    """{name: tensor} of every shard, read by safetensors itself."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def checkpoint_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
