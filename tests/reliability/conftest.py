"""Session-scoped S3 servers with a few seeded objects, and a fresh fault proxy per test."""

from __future__ import annotations

import random

import pytest

from warmstart.testing.faultproxy import FaultProxy
from warmstart.testing.s3server import running_server

BUCKET = "reliability"
OBJECTS = {
    "big.bin": random.Random(1).randbytes(8 << 20),
    "medium.bin": random.Random(2).randbytes(1 << 20),
    "small.txt": b"hello, fault proxy\n" * 100,
}


def _seeded(kind: str):
    with running_server(kind) as server:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        for key, data in OBJECTS.items():
            client.put_object(Bucket=BUCKET, Key=key, Body=data)
        yield server


@pytest.fixture(scope="session")
def localbucket():
    yield from _seeded("localbucket")


@pytest.fixture(scope="session")
def nanio():
    yield from _seeded("nanio")


@pytest.fixture(scope="session", params=["localbucket", "nanio"])
def any_server(request):
    """Each test using this runs once per server: no auth, and SigV4-checking."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def proxy(localbucket):
    with FaultProxy(localbucket.endpoint) as proxy:
        yield proxy
    assert not proxy.errors, proxy.errors


def pytest_collection_modifyitems(config, items):
    """Long variants (@pytest.mark.slow) run only when a marker expression is given
    (`-m slow`, as for tests/vllm_plugin_tests); the default run takes the quick ones."""
    if config.getoption("-m"):
        return
    skip = pytest.mark.skip(reason="long variant; run with -m slow")
    for item in items:
        if "slow" in item.keywords and "reliability" in str(item.fspath):
            item.add_marker(skip)
