"""The one S3 client's uploads against a real S3 server (localbucket): one PUT up to
`MULTIPART_ABOVE` (an image blob of "64 MiB" plus its last frame used to go multipart, a full
part and a few kB, which made pushes 1.4x slower), multipart above it, bytes read back whole."""

from __future__ import annotations

import os

import pytest

from warmstart.storage import s3, sync
from warmstart.storage.config import StorageConfig
from warmstart.storage.uri import S3Uri


@pytest.fixture
def small_parts(monkeypatch):
    monkeypatch.setattr(s3, "PART_SIZE", 5 << 20)  # S3's smallest part (the last may be less)
    monkeypatch.setattr(s3, "MULTIPART_ABOVE", 6 << 20)


def put_and_count(server, key: str, data: bytes) -> tuple[list[str], bytes]:
    """Uploads `data` through S3Client; returns the S3 operations it sent and the object."""
    sent: list[str] = []
    cfg = StorageConfig(endpoint_url=server.endpoint, access_key=server.access_key,
                        secret_key=server.secret_key, region=server.region)

    async def go():
        async with s3.S3Client(cfg) as client:
            client.client.meta.events.register(
                "before-call.s3", lambda model, **_: sent.append(model.name))
            await client.put(S3Uri("uploads", key), data)
    sync.run(go())
    got = server.client().get_object(Bucket="uploads", Key=key)["Body"].read()
    return sent, got


def test_one_put_up_to_the_threshold_then_multipart(localbucket, small_parts):
    localbucket.create_bucket("uploads")
    just_over_a_part = os.urandom((5 << 20) + 9_000)
    sent, got = put_and_count(localbucket, "blob", just_over_a_part)
    assert sent == ["PutObject"] and got == just_over_a_part
    big = os.urandom((10 << 20) + 5)
    sent, got = put_and_count(localbucket, "big", big)
    assert sent == ["CreateMultipartUpload"] + ["UploadPart"] * 3 + ["CompleteMultipartUpload"]
    assert got == big
