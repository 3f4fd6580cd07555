"""The storage layer's pure parts: units, URIs, the error table, the env table, retries, the
sync facade's timeout. No I/O beyond the facade's own thread."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import threading

import pytest

from warmstart.errors import (AccessDenied, ConfigError, NotFound, OperationTimeout,
                              RangeNotSatisfiable, RetriesExhausted, Retryable, SourceError,
                              WarmstartError)
from warmstart.storage import sync
from warmstart.storage.config import StorageConfig
from warmstart.storage.errors import error_for_answer, error_for_body
from warmstart.storage.retry import RetryPolicy, attempt
from warmstart.storage.units import parse_size
from warmstart.storage.uri import HttpUri, LocalUri, S3Uri, parse_uri


@pytest.mark.parametrize("text, expected", [
    ("4096", 4096), ("8GB", 8 * 10**9), ("8GiB", 8 << 30), ("8g", 8 << 30), ("512M", 512 << 20),
    ("1.5KiB", 1536), ("100MB/s", 10**8), (" 2 TB ", 2 * 10**12), (7, 7), ("0", 0)])
def test_one_size_parser(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GB", "8XB", "-1", "1e3", True, None, 1.5, -3])
def test_bad_sizes_are_config_errors_naming_the_key(bad):
    with pytest.raises(ConfigError, match="--size"):
        parse_size(bad, "--size")


def test_every_part_reads_sizes_alike():
    from warmstart.imageformat.cli import _size
    from warmstart.loader.config import LoaderConfig

    assert _size("8GB") == LoaderConfig.from_mapping({"group_size": "8GB"}).group_size == 8 * 10**9
    assert _size("8GiB") == 8 << 30


def test_uris_by_scheme():
    assert parse_uri("/a/b") == LocalUri("/a/b")
    assert parse_uri("file:///a/b%20c") == LocalUri("/a/b c")
    assert parse_uri("s3://bkt/k/x.safetensors") == S3Uri("bkt", "k/x.safetensors")
    assert parse_uri("https://h:8443/p?X-Amz-Signature=1") == HttpUri("https://h:8443/p?X-Amz-Signature=1")
    with pytest.raises(ConfigError, match="gs"):
        parse_uri("gs://bucket/key")
    with pytest.raises(NotFound):
        parse_uri("s3:///key")


@pytest.mark.parametrize("status, code, cls", [
    (404, "NoSuchKey", NotFound), (404, "", NotFound), (403, "AccessDenied", AccessDenied),
    (400, "ExpiredToken", AccessDenied), (403, "SignatureDoesNotMatch", AccessDenied),
    (401, "", AccessDenied), (429, "", Retryable), (503, "SlowDown", Retryable),
    (503, "", Retryable), (500, "InternalError", Retryable), (400, "SlowDown", Retryable),
    (416, "InvalidRange", RangeNotSatisfiable), (301, "PermanentRedirect", SourceError),
    (307, "", SourceError), (400, "BadRequest", SourceError)])
def test_one_error_table(status, code, cls):
    exc = error_for_answer(status, code, "msg", "s3://b/k")
    assert type(exc) is cls and "s3://b/k" in str(exc)
    assert isinstance(exc, WarmstartError)


def test_redirects_are_refused_not_retried():
    exc = error_for_body(301, b"<Error><Code>PermanentRedirect</Code></Error>", "s3://b/k")
    assert "redirect refused" in str(exc) and not isinstance(exc, Retryable)


def test_botocore_errors_use_the_same_table():
    import botocore.exceptions as bx

    from warmstart.storage.errors import map_client_error

    def client_error(status, code):
        return bx.ClientError({"Error": {"Code": code, "Message": "m"},
                               "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    assert isinstance(map_client_error(client_error(429, "TooManyRequests"), "x"), Retryable)
    assert isinstance(map_client_error(client_error(400, "ExpiredToken"), "x"), AccessDenied)
    assert isinstance(map_client_error(client_error(503, "SlowDown"), "x"), Retryable)


def test_endpoint_precedence_follows_aws():
    env = {"AWS_ENDPOINT_URL": "http://generic:1", "AWS_ENDPOINT_URL_S3": "http://s3:2",
           "AWS_DEFAULT_REGION": "eu-west-1", "AWS_CA_BUNDLE": "/ca.pem"}
    cfg = StorageConfig.from_env(env)
    assert cfg.endpoint_url == "http://s3:2" and cfg.region == "eu-west-1"
    assert cfg.ca_bundle == "/ca.pem" and cfg.verify_tls and cfg.style == "path"
    assert StorageConfig.from_env({"AWS_ENDPOINT_URL": "http://g:1"}).endpoint_url == "http://g:1"
    assert StorageConfig.from_env(env, endpoint_url="https://x").endpoint_url == "https://x"
    assert StorageConfig.from_env({}).style == "auto"
    with pytest.raises(ConfigError):
        StorageConfig.from_env({"AWS_ENDPOINT_URL_S3": "ftp://x"})


def test_botocore_retries_are_off_in_the_one_client():
    from warmstart.storage.s3 import S3Client

    async def go():
        async with S3Client(StorageConfig(endpoint_url="http://127.0.0.1:9",
                                          access_key="a", secret_key="b")) as c:
            return c.client.meta.config.retries
    assert sync.run(go())["total_max_attempts"] == 1


def test_retry_policy_is_bounded_and_per_request():
    calls = []

    async def flaky():
        calls.append(1)
        raise Retryable("transient")
    policy = RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.001)
    with pytest.raises(RetriesExhausted, match="after 3 attempts"):
        sync.run(attempt(policy, "GET x", flaky, random.Random(1)))
    assert len(calls) == 3

    async def denied():
        calls.append(1)
        raise AccessDenied("no")
    calls.clear()
    with pytest.raises(AccessDenied):
        sync.run(attempt(policy, "GET x", denied))
    assert len(calls) == 1
    delays = [policy.delay(n, random.Random(n)) for n in range(10)]
    assert all(0 <= d <= policy.max_delay for d in delays)


def test_sync_timeout_cancels_the_coroutine():
    cancelled, started = threading.Event(), threading.Event()

    async def forever():
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
    with pytest.raises(OperationTimeout) as info:
        sync.run(forever(), timeout=0.05)
    assert started.is_set() and cancelled.is_set() and isinstance(info.value, TimeoutError)


def test_sync_facade_refuses_its_own_thread():
    async def inner():
        return sync.run(asyncio.sleep(0))
    with pytest.raises(WarmstartError, match="own I/O loop"):
        sync.run(inner())


def test_storage_imports_no_torch_and_no_other_part():
    code = ("import sys, warmstart.storage.s3, warmstart.storage.sync, warmstart.storage.units, "
            "warmstart.storage.progress, warmstart.storage.uri\n"
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('warmstart.loader', "
            "'warmstart.imageformat', 'warmstart.ray_serve', 'warmstart.vllm_plugin'))]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_progress_counter_reports_cumulative_counts():
    from warmstart.storage.progress import Counter

    seen = []
    counter = Counter(10, lambda done, total: seen.append((done, total)))
    for n in (3, 3, 4):
        counter.add(n)
    assert seen == [(3, 10), (6, 10), (10, 10)]


def test_runtime_never_imports_the_testing_module():
    """Fault proxies, test servers and checkpoint makers stay out of what users run."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[2]
    offenders = []
    for part in ("loader", "imageformat", "vllm_plugin", "ray_serve", "warmstart"):
        for path in (root / part).rglob("*.py"):
            rel = path.relative_to(root).as_posix()
            if rel.startswith("warmstart/testing/") or rel == "ray_serve/bench.py":
                continue  # the testing module itself; the Ray benchmark tool
            if re.search(r"^\s*(from|import) warmstart\.testing", path.read_text(), re.M):
                offenders.append(rel)
    assert not offenders, offenders


@pytest.mark.parametrize("style, host, target", [
    ("virtual", "bkt.s3.example.test", "/a/b%20c.bin"),
    ("path", "s3.example.test", "/bkt/a/b%20c.bin")])
def test_signed_ranged_gets_use_virtual_hosted_or_path_style(style, host, target):
    """The URL and SigV4 headers the data path sends: the Host signed is the Host sent (port
    kept), TLS for https endpoints; no request is made."""
    from warmstart.storage.s3 import S3Client
    from warmstart.storage.uri import S3Uri

    async def go():
        cfg = StorageConfig(endpoint_url="https://s3.example.test:9443", addressing_style=style,
                            access_key="AKIDEXAMPLE", secret_key="secret", session_token="tok")
        async with S3Client(cfg) as client:
            return await client.signed(S3Uri("bkt", "a/b c.bin"))
    url, headers = sync.run(go())
    assert (url.scheme, url.host, url.port, url.target) == ("https", host, 9443, target)
    assert headers["host"] == f"{host}:9443"
    assert headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "range" not in headers["Authorization"].lower()  # one signature serves every range
    assert headers["X-Amz-Security-Token"] == "tok"
