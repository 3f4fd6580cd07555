"""S3 conformance: the same checkpoints, layouts and data paths against real local servers
(localbucket without auth, nanio checking SigV4; moto for the small-object API)."""

from __future__ import annotations

import pytest
import torch

from test_oracle import assert_same
from warmstart.errors import (AccessDenied, EndpointUnreachable, NotFound, ShardIndexError,
                              WarmstartError)
from warmstart.loader import LoaderConfig, load, stream
from warmstart.testing.s3server import free_port

BUCKET = "models"
# Many ring cycles with few enough requests to keep the suite quick.
S3_SMALL = LoaderConfig(chunk_size=1 << 16, memory_budget=3 * ((1 << 16) + 8192),
                        group_size=1 << 17, read_timeout=20)


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory):
    from test_oracle import checkpoint as make  # reuse the oracle test's layouts

    return make.__wrapped__(tmp_path_factory)


_UPLOADED: set[str] = set()


@pytest.fixture
def uploaded(s3, local_checkpoint):
    root, tensors = local_checkpoint
    prefix = f"{s3.kind}"
    if s3.endpoint in _UPLOADED:
        return f"s3://{BUCKET}/{prefix}", tensors
    _UPLOADED.add(s3.endpoint)
    s3.create_bucket(BUCKET)
    s3.upload_file(root / "single.safetensors", BUCKET, f"{prefix}/single.safetensors")
    s3.upload_tree(root / "sharded", BUCKET, f"{prefix}/sharded")
    s3.upload_tree(root / "folder", BUCKET, f"{prefix}/folder")
    return f"s3://{BUCKET}/{prefix}", tensors


@pytest.mark.parametrize("data_path", ["raw", "botocore"])
@pytest.mark.parametrize("layout", ["single.safetensors", "sharded/", "sharded",
                                    "sharded/model.safetensors.index.json", "folder/"])
def test_s3_matches_oracle(uploaded, layout, data_path):
    base, tensors = uploaded
    cfg = S3_SMALL.replace(s3_data_path=data_path, concurrency=4)
    assert_same(load(f"{base}/{layout}", config=cfg), tensors)


def test_s3_stream_default_config(uploaded):
    base, tensors = uploaded
    got = {name: t.clone() for name, t in stream(f"{base}/sharded/")}
    assert_same(got, tensors)


def test_moto_small_objects(moto, monkeypatch, local_checkpoint):
    root, tensors = local_checkpoint
    for key, value in moto.env().items():
        monkeypatch.setenv(key, value)
    moto.create_bucket(BUCKET)
    moto.upload_tree(root / "sharded", BUCKET, "m")
    assert_same(load(f"s3://{BUCKET}/m/", config=S3_SMALL), tensors)


def test_missing_key_and_bucket(s3):
    s3.create_bucket(BUCKET)
    with pytest.raises(NotFound, match=f"s3://{BUCKET}/absent.safetensors"):
        load(f"s3://{BUCKET}/absent.safetensors")
    with pytest.raises(NotFound, match="no .safetensors objects"):
        load(f"s3://{BUCKET}/empty-prefix/")
    with pytest.raises(NotFound, match="s3://no-such-bucket-here"):
        load("s3://no-such-bucket-here/model/")


def test_missing_shard(s3, uploaded):
    base, _ = uploaded
    s3.put_bytes(BUCKET, f"{s3.kind}/broken/model.safetensors.index.json",
                 b'{"weight_map": {"a": "missing-shard.safetensors"}}')
    with pytest.raises(NotFound, match="missing-shard.safetensors"):
        load(f"{base}/broken/")
    s3.put_bytes(BUCKET, f"{s3.kind}/evil/model.safetensors.index.json",
                 b'{"weight_map": {"a": "../sharded/x.safetensors"}}')
    with pytest.raises(ShardIndexError, match="relative path"):
        load(f"{base}/evil/")


@pytest.mark.parametrize("data_path", ["raw", "botocore"])
def test_wrong_secret_is_access_denied(nanio, monkeypatch, local_checkpoint, data_path):
    root, _ = local_checkpoint
    nanio.create_bucket(BUCKET)
    nanio.upload_file(root / "single.safetensors", BUCKET, "auth/single.safetensors")
    for key, value in nanio.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(AccessDenied, match="auth/single.safetensors") as info:
        load(f"s3://{BUCKET}/auth/single.safetensors",
             config=LoaderConfig(s3_data_path=data_path))
    assert isinstance(info.value, PermissionError)


def test_unreachable_endpoint_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    cfg = LoaderConfig(connect_timeout=2, read_timeout=2)
    with pytest.raises(EndpointUnreachable, match="127.0.0.1"):
        load("s3://bucket/model.safetensors", config=cfg)


def test_explicit_endpoint_in_config_wins(s3, uploaded, monkeypatch):
    base, tensors = uploaded
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    cfg = LoaderConfig(s3_endpoint_url=s3.endpoint)
    assert_same(load(f"{base}/single.safetensors", config=cfg), tensors)


def test_errors_are_one_tree():
    for cls in (AccessDenied, EndpointUnreachable, NotFound, ShardIndexError):
        assert issubclass(cls, WarmstartError)
    assert issubclass(NotFound, FileNotFoundError) and issubclass(AccessDenied, PermissionError)
    assert torch  # the module under test returns torch tensors
