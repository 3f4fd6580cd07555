"""Transient S3 failures are retried per chunk; permanent ones fail fast, clearly, cleanly.

A real fault-injecting HTTP proxy sits between the loader and a real S3 server.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from test_oracle import assert_same
from warmstart.errors import AccessDenied, RetriesExhausted
from warmstart.loader import LoaderConfig, load
from warmstart.testing import faultproxy as fp
from warmstart.testing.checkpoints import make_checkpoint
from warmstart.testing.faultproxy import FaultProxy

from settle_helpers import settled

BUCKET = "retries"
CFG = LoaderConfig(chunk_size=256 << 10, memory_budget=4 * ((256 << 10) + 8192),
                   concurrency=4, max_attempts=8, retry_base_delay=0.01, retry_max_delay=0.05,
                   read_timeout=1.0, connect_timeout=2.0)


@pytest.fixture(scope="module")
def remote(localbucket, tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("retries"), 6 << 20, shards=3,
                           dtype=torch.float16)
    localbucket.create_bucket(BUCKET)
    localbucket.upload_tree(path, BUCKET, "m")
    want = load(str(path))
    return localbucket, want


@pytest.fixture
def proxied(remote, monkeypatch):
    server, want = remote
    with FaultProxy(server.endpoint) as proxy:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        yield proxy, want


FAULTS = {
    "reset": fp.reset_mid_body(1000),
    "truncate": fp.truncate(5000),
    "503-slowdown": fp.status(503, "SlowDown"),
    "500": fp.status(500),
    "stall": fp.stall(3.0),
    "wrong-range": fp.wrong_content_range(),
}


@pytest.mark.parametrize("data_path", ["raw", "botocore"])
@pytest.mark.parametrize("rate", [0.1, 0.3])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_transient_faults_are_retried(proxied, fault, rate, data_path):
    proxy, want = proxied
    rule = proxy.add_rule(FAULTS[fault], method="GET", ranged=True, probability=rate, seed=11)
    got = load(f"s3://{BUCKET}/m/", config=CFG.replace(s3_data_path=data_path))
    assert_same(got, want)
    assert rule.faulted > 0, "the fault never fired: the test proved nothing"


def test_too_many_faults_fail_with_a_named_error_in_bounded_time(proxied):
    proxy, _ = proxied
    proxy.add_rule(fp.status(503, "SlowDown"), method="GET", ranged=True)
    threads = threading.active_count()
    started = time.monotonic()
    with pytest.raises(RetriesExhausted) as info:
        load(f"s3://{BUCKET}/m/", config=CFG.replace(max_attempts=3))
    assert time.monotonic() - started < 30
    message = str(info.value)
    assert f"s3://{BUCKET}/m/" in message and "bytes" in message and "SlowDown" in message
    assert settled(threading.active_count, lambda n: n <= threads) <= threads


def test_permanent_error_is_not_retried(proxied):
    proxy, _ = proxied
    rule = proxy.add_rule(fp.status(403, "AccessDenied"), method="GET", ranged=True)
    with pytest.raises(AccessDenied, match=f"s3://{BUCKET}/m/"):
        load(f"s3://{BUCKET}/m/", config=CFG)
    # the first ranged GET (a header) failed, and nothing was tried again
    assert rule.faulted <= CFG.read_concurrency("s3")
