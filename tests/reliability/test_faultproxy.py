"""The fault proxy forwards S3 traffic unchanged and each fault shows up as a client sees it."""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
import xml.etree.ElementTree as ET
from urllib.parse import urlsplit

import botocore.config
import botocore.session
import pytest
from botocore.exceptions import ClientError

from warmstart.testing.faultproxy import (
    FaultProxy, bandwidth, flip_bytes, latency, reset_mid_body, stall, status, truncate,
    wrong_content_range)
from warmstart.testing.s3server import free_port

from conftest import BUCKET, OBJECTS

BIG, MEDIUM, SMALL = (OBJECTS[k] for k in ("big.bin", "medium.bin", "small.txt"))
MiB = 1 << 20


def via(proxy: FaultProxy, server, secret_key: str | None = None):
    """A botocore client that talks to `server` through `proxy`, without retries."""
    return botocore.session.get_session().create_client(
        "s3", endpoint_url=proxy.endpoint, region_name=server.region,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=secret_key or server.secret_key,
        config=botocore.config.Config(s3={"addressing_style": "path"},
                                      retries={"total_max_attempts": 1}))


def connect(proxy: FaultProxy, timeout: float = 10.0) -> http.client.HTTPConnection:
    url = urlsplit(proxy.endpoint)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)


def fetch(conn, key: str, first: int | None = None, last: int | None = None,
          method: str = "GET"):
    headers = {} if first is None else {"Range": f"bytes={first}-{last}"}
    conn.request(method, f"/{BUCKET}/{key}", headers=headers)
    response = conn.getresponse()
    return response, response.read()


def raw_get(proxy: FaultProxy, key: str) -> tuple[bytes, bytes, str]:
    """GET over a bare socket: (head, body received, "reset" or "eof")."""
    url = urlsplit(proxy.endpoint)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(f"GET /{BUCKET}/{key} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                     "Connection: close\r\n\r\n".encode())
        got, ending = bytearray(), "eof"
        try:
            while chunk := sock.recv(MiB):
                got += chunk
        except ConnectionResetError:
            ending = "reset"
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    return head, body, ending


def error_code(body: bytes) -> str:
    root = ET.fromstring(body)
    assert root.tag == "Error" and root.findtext("Message")
    return root.findtext("Code")


# --- plain forwarding ------------------------------------------------------------------


def test_s3_calls_pass_through_unchanged(any_server):
    put = random.Random(5).randbytes(3 * MiB)
    with FaultProxy(any_server.endpoint) as proxy:
        s3 = via(proxy, any_server)
        s3.put_object(Bucket=BUCKET, Key="up/put.bin", Body=put)
        assert s3.head_object(Bucket=BUCKET, Key="up/put.bin")["ContentLength"] == len(put)
        ranged = s3.get_object(Bucket=BUCKET, Key="up/put.bin", Range="bytes=100-199")
        assert ranged["Body"].read() == put[100:200]
        assert ranged["ContentRange"] == f"bytes 100-199/{len(put)}"
        listing = s3.list_objects_v2(Bucket=BUCKET, Prefix="up/")
        assert [o["Key"] for o in listing["Contents"]] == ["up/put.bin"]
        assert s3.get_object(Bucket=BUCKET, Key="medium.bin")["Body"].read() == MEDIUM
        proxy.wait_idle()
        stats = proxy.stats()
    assert not proxy.errors
    direct = any_server.client().get_object(Bucket=BUCKET, Key="up/put.bin")["Body"].read()
    assert direct == put
    assert stats.requests == 5
    assert stats.bytes_by_key[f"{BUCKET}/up/put.bin"] == 100
    assert stats.bytes_by_key[f"{BUCKET}/medium.bin"] == len(MEDIUM)
    assert stats.bytes_from_client >= len(put)


def test_signatures_are_really_checked_upstream(nanio):
    with FaultProxy(nanio.endpoint) as proxy:
        with pytest.raises(ClientError) as err:
            via(proxy, nanio, secret_key="not-the-secret").get_object(
                Bucket=BUCKET, Key="small.txt")
        assert err.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
        assert via(proxy, nanio).get_object(Bucket=BUCKET, Key="small.txt")["Body"].read() \
            == SMALL


def test_keep_alive_serves_many_requests_on_one_connection(proxy):
    conn, rng = connect(proxy), random.Random(9)
    _, body = fetch(conn, "small.txt")
    sock = conn.sock
    for _ in range(20):
        first = rng.randrange(len(BIG))
        last = min(len(BIG) - 1, first + rng.randrange(1, 300_000))
        response, body = fetch(conn, "big.bin", first, last)
        assert response.status == 206 and body == BIG[first:last + 1]
    response, body = fetch(conn, "medium.bin", method="HEAD")
    assert body == b"" and int(response.getheader("Content-Length")) == len(MEDIUM)
    conn.request("GET", f"/{BUCKET}?list-type=2&prefix=sm")
    listing = conn.getresponse().read()
    assert b"<Key>small.txt</Key>" in listing and b"big.bin" not in listing
    assert conn.sock is sock
    proxy.wait_idle()
    assert (proxy.stats().connections, proxy.stats().requests) == (1, 23)


def test_chunked_upload_streams_through(proxy, localbucket):
    data = random.Random(6).randbytes(2 * MiB + 17)
    conn = connect(proxy)
    blocks = (data[i:i + 100_000] for i in range(0, len(data), 100_000))
    conn.request("PUT", f"/{BUCKET}/up/chunked.bin", body=blocks, encode_chunked=True)
    assert conn.getresponse().read() is not None
    got = localbucket.client().get_object(Bucket=BUCKET, Key="up/chunked.bin")["Body"].read()
    assert got == data
    proxy.wait_idle()
    assert proxy.stats().bytes_from_client == len(data)


def test_unreachable_upstream_answers_502():
    with FaultProxy(f"http://127.0.0.1:{free_port()}") as proxy:
        response, body = fetch(connect(proxy), "small.txt")
    assert response.status == 502 and error_code(body) == "BadGateway"


# --- faults ----------------------------------------------------------------------------


def test_reset_mid_body(proxy):
    proxy.add_rule(reset_mid_body(100_000), key="big.bin")
    head, body, ending = raw_get(proxy, "small.txt")  # the rule's key does not match
    assert (body, ending) == (SMALL, "eof")
    head, body, ending = raw_get(proxy, "big.bin")
    assert head.startswith(b"HTTP/1.1 200") and f"Content-Length: {len(BIG)}".encode() in head
    assert ending == "reset" and body == BIG[:100_000]
    proxy.wait_idle()
    assert proxy.stats().bytes_by_key[f"{BUCKET}/big.bin"] == 100_000


def test_truncate_promises_full_length_and_closes(proxy):
    proxy.add_rule(truncate(12_345))
    head, body, ending = raw_get(proxy, "medium.bin")
    assert f"Content-Length: {len(MEDIUM)}".encode() in head
    assert (body, ending) == (MEDIUM[:12_345], "eof")
    conn = connect(proxy)
    conn.request("GET", f"/{BUCKET}/medium.bin")
    with pytest.raises(http.client.IncompleteRead) as err:
        conn.getresponse().read()
    assert err.value.partial == MEDIUM[:12_345]


@pytest.mark.parametrize("code, s3_code", [
    (500, "InternalError"), (503, "SlowDown"), (429, "TooManyRequests"),
    (403, "AccessDenied"), (404, "NoSuchKey")])
def test_status_answers_with_s3_error(proxy, localbucket, code, s3_code):
    proxy.add_rule(status(code))
    with pytest.raises(ClientError) as err:
        via(proxy, localbucket).get_object(Bucket=BUCKET, Key="small.txt")
    assert err.value.response["Error"]["Code"] == s3_code
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == code
    conn = connect(proxy)
    response, body = fetch(conn, "small.txt")
    assert response.status == code and error_code(body) == s3_code
    proxy.clear_rules()
    assert fetch(conn, "small.txt")[1] == SMALL  # same connection still usable


def test_status_fault_never_reaches_upstream(proxy, localbucket):
    s3 = via(proxy, localbucket)
    with proxy.injecting(status(503), method="PUT") as rule:
        with pytest.raises(ClientError):
            s3.put_object(Bucket=BUCKET, Key="up/never.bin", Body=b"x" * 1000)
    assert rule.faulted == 1 and not proxy.rules
    with pytest.raises(ClientError) as err:
        localbucket.client().head_object(Bucket=BUCKET, Key="up/never.bin")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    s3.put_object(Bucket=BUCKET, Key="up/never.bin", Body=b"x" * 1000)  # rule is gone


def test_stall_before_response_times_out_the_client(proxy):
    proxy.add_rule(stall(5.0), max_count=1)
    conn, start = connect(proxy, timeout=0.3), time.monotonic()
    conn.request("GET", f"/{BUCKET}/small.txt")
    with pytest.raises(TimeoutError):
        conn.getresponse()
    assert time.monotonic() - start >= 0.3
    assert fetch(connect(proxy), "small.txt")[1] == SMALL  # max_count=1: next one is fine


def test_stall_mid_body(proxy):
    proxy.add_rule(stall(30.0, after_bytes=1000))
    conn = connect(proxy)  # headers and the first 1000 bytes may take long on a busy machine
    conn.request("GET", f"/{BUCKET}/medium.bin")
    response = conn.getresponse()
    assert response.status == 200 and response.read(1000) == MEDIUM[:1000]
    conn.sock.settimeout(0.3)  # the stall, not a slow machine, is what times out now
    with pytest.raises(TimeoutError):
        response.read(1)


def test_latency_delays_first_byte(proxy):
    rule = proxy.add_rule(latency(0.3), max_count=1)
    conn = connect(proxy)
    start = time.monotonic()
    assert fetch(conn, "small.txt")[1] == SMALL
    assert time.monotonic() - start >= 0.3
    assert fetch(conn, "small.txt")[1] == SMALL
    assert (rule.seen, rule.faulted) == (2, 1)


def test_bandwidth_caps_a_transfer(proxy):
    proxy.add_rule(bandwidth(16 * MiB))
    start = time.monotonic()
    assert fetch(connect(proxy), "big.bin")[1] == BIG
    assert time.monotonic() - start >= 0.8 * len(BIG) / (16 * MiB)


@pytest.mark.parametrize("per_connection", [False, True])
def test_bandwidth_bucket_global_or_per_connection(proxy, per_connection):
    """Four connections of 1 MiB: one shared bucket meters all four bodies, or a bucket per
    connection meters each one (counted, not timed); every connection is capped (a lower
    bound on its time, which a busy machine can only lengthen)."""
    rate, each, n = 4 * MiB, 1 * MiB, 4
    rule = proxy.add_rule(bandwidth(rate, per_connection=per_connection))
    bodies, took = {}, {}

    def download(first):
        started = time.monotonic()
        bodies[first] = fetch(connect(proxy), "big.bin", first, first + each - 1)[1]
        took[first] = time.monotonic() - started

    firsts = [i * each for i in range(n)]
    threads = [threading.Thread(target=download, args=(first,)) for first in firsts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert bodies == {first: BIG[first:first + each] for first in firsts}
    assert min(took.values()) >= 0.8 * each / rate  # every connection was capped
    assert rule.bucket_bytes() == ([each] * n if per_connection else [n * each])


def test_token_bucket_arithmetic():
    """The wait a bucket asks for, on an injected clock: a 50 ms burst, then the rate."""
    from warmstart.testing.faultproxy import _TokenBucket

    now = [100.0]
    bucket = _TokenBucket(1000.0, clock=lambda: now[0])
    assert bucket.take(50) == pytest.approx(0.05)  # starts empty: 50 bytes cost 50 ms
    now[0] += 1.0  # a second idle refills only up to the 50 ms burst
    assert bucket.take(50) == pytest.approx(0.0, abs=1e-9)
    assert bucket.take(1000) == pytest.approx(1.0)
    assert bucket.taken == 1100


def test_wrong_content_range(proxy):
    proxy.add_rule(wrong_content_range(), ranged=True)
    conn = connect(proxy)
    response, body = fetch(conn, "big.bin", 1000, 1999)
    assert response.getheader("Content-Range") == f"bytes 1001-2000/{len(BIG)}"
    assert body == BIG[1000:2000]
    response, body = fetch(conn, "small.txt")  # not ranged: untouched
    assert response.getheader("Content-Range") is None and body == SMALL


def test_flip_bytes_is_exact_and_repeatable(proxy):
    def corrupted(seed):
        with proxy.injecting(flip_bytes(7), seed=seed):
            body = fetch(connect(proxy), "medium.bin")[1]
        assert len(body) == len(MEDIUM)
        diff = [i for i, (a, b) in enumerate(zip(body, MEDIUM)) if a != b]
        assert len(diff) == 7 and all(body[i] == MEDIUM[i] ^ 0xFF for i in diff)
        return diff

    assert corrupted(3) == corrupted(3) != corrupted(4)


# --- rule selection and counters -------------------------------------------------------


def failures(conn, requests) -> list[bool]:
    """Issues (key, ranged, method) requests on one connection; True where it got a 503."""
    out = []
    for key, ranged, method in requests:
        response, _ = fetch(conn, key, *((0, 9) if ranged else (None, None)), method=method)
        out.append(response.status == 503)
    return out


def test_rule_selection(proxy):
    conn = connect(proxy)
    every = proxy.add_rule(status(503), key="small", every=3, name="every3")
    assert failures(conn, [("small.txt", False, "GET")] * 6 + [("big.bin", False, "HEAD")]) \
        == [False, False, True, False, False, True, False]
    proxy.remove_rule(every)
    proxy.add_rule(status(503), ranged=True, method="GET", max_count=2, name="ranged")
    assert failures(conn, [("big.bin", True, "GET"), ("big.bin", False, "GET"),
                           ("big.bin", True, "HEAD"), ("big.bin", True, "GET"),
                           ("big.bin", True, "GET")]) == [True, False, False, True, False]
    proxy.clear_rules()
    proxy.add_rule(status(503), probability=0.3, seed=11, name="random")
    rng = random.Random(11)
    expected = [rng.random() < 0.3 for _ in range(30)]
    assert failures(conn, [("small.txt", False, "GET")] * 30) == expected
    proxy.wait_idle()
    assert proxy.stats().faulted == {"every3": 2, "ranged": 2, "random": sum(expected)}


def test_first_breaking_rule_wins_and_shaping_rules_stack(proxy):
    first = proxy.add_rule(status(503), name="first")
    second = proxy.add_rule(status(500), name="second")
    shaping = proxy.add_rule(latency(0.05), name="slow")
    response, body = fetch(connect(proxy), "small.txt")
    assert response.status == 503 and error_code(body) == "SlowDown"
    assert (first.faulted, second.seen, shaping.faulted) == (1, 0, 1)


def test_byte_counters_equal_bytes_received(proxy):
    proxy.add_rule(truncate(50_000), key="medium", every=4)
    received: dict[str, int] = {}
    lock, problems = threading.Lock(), []

    def client(seed):
        rng, conn = random.Random(seed), connect(proxy)
        for _ in range(12):
            key = rng.choice(["big.bin", "medium.bin"])
            size = len(OBJECTS[key])
            first = rng.randrange(size)
            last = min(size - 1, first + rng.randrange(1, 400_000))
            try:
                body = fetch(conn, key, first, last)[1]
            except http.client.IncompleteRead as exc:
                body = exc.partial
                conn = connect(proxy)
            if body != OBJECTS[key][first:first + len(body)]:
                problems.append((key, first, len(body)))
            with lock:
                received[f"{BUCKET}/{key}"] = received.get(f"{BUCKET}/{key}", 0) + len(body)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    proxy.wait_idle()
    stats = proxy.stats()
    assert not problems
    assert stats.requests == 48 and stats.faulted["truncate"] >= 1
    assert dict(stats.bytes_by_key) == received
    assert stats.bytes_to_client == sum(received.values())


def test_rules_change_while_requests_run(proxy):
    statuses: list[int] = []
    done = threading.Event()

    def client():
        conn = connect(proxy)
        while not done.is_set():
            response, body = fetch(conn, "small.txt")
            statuses.append(response.status)
            if body != SMALL and error_code(body) != "SlowDown":
                statuses.append(-1)  # neither the object nor the injected error

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    # toggle at least 20 times, and on until the clients have seen both states (a busy
    # machine may start them late)
    toggles, deadline = 0, time.monotonic() + 60
    try:
        while toggles < 20 or not {200, 503} <= set(statuses):
            assert time.monotonic() < deadline, f"clients saw only {set(statuses)}"
            with proxy.injecting(status(503), name="toggle"):
                time.sleep(0.01)
            time.sleep(0.01)
            toggles += 1
    finally:
        done.set()
        for thread in threads:
            thread.join()
    proxy.wait_idle()
    assert set(statuses) == {200, 503}
    assert proxy.stats().faulted.get("toggle", 0) == statuses.count(503)
    assert proxy.stats().requests == len(statuses)
