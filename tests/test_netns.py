"""The multi-host test bed (`warmstart.testing.netns`): hosts as network namespaces on a switch
of their own, rate caps, processes found by namespace, and a teardown that runs even when the
bed's owner is killed."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from warmstart.errors import ConfigError
from warmstart.testing import netns

needs_bed = pytest.mark.skipif(bool(netns.unavailable()),
                               reason=f"no test bed here: {netns.unavailable()}")


@pytest.mark.parametrize("text, bits", [
    ("1Gbit", 10**9), ("100mbit", 10**8), ("1.5 Gbit/s", 15 * 10**8), ("500kbit", 5 * 10**5),
    ("200MB", 1_600_000_000), ("200MB/s", 1_600_000_000), ("1MiB", 8 << 20), (1000, 8000)])
def test_rates(text, bits):
    assert netns.parse_rate(text) == bits


@pytest.mark.parametrize("bad", ["", "fast", "0bit", "0", "-1Gbit", "1Gbyte", None, True])
def test_bad_rates_name_the_key(bad):
    with pytest.raises(ConfigError, match="--node-link"):
        netns.parse_rate(bad, "--node-link")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _qdisc(netns_name: str, dev: str) -> str:
    return subprocess.run(["tc", "-n", netns_name, "qdisc", "show", "dev", dev],
                          capture_output=True, text=True, check=True).stdout


@needs_bed
def test_hosts_talk_over_their_links_and_only_there():
    with netns.TestBed() as bed:
        a, b = bed.add_host("a", rate="1Gbit"), bed.add_host("b")
        assert (a.address, b.address) == ("10.77.0.2", "10.77.0.3")
        assert {a.netns, b.netns, bed.switch} <= _namespaces()
        assert "tbf" in _qdisc(a.netns, "eth0") and "rate 1Gbit" in _qdisc(a.netns, "eth0")
        assert "tbf" not in _qdisc(b.netns, "eth0")

        listener = bed.call(b, socket.create_server, (b.address, 0))
        port = listener.getsockname()[1]
        payload = 3 << 20
        received = []

        def serve():
            conn, _ = listener.accept()
            with conn:
                n = 0
                while chunk := conn.recv(1 << 16):
                    n += len(chunk)
                received.append(n)

        server = threading.Thread(target=serve)
        server.start()
        sent0 = bed.link_bytes(a)[0]

        def send():
            with socket.create_connection((b.address, port), timeout=30) as s:
                s.sendall(b"x" * payload)

        bed.call(a, send)
        server.join(30)
        listener.close()
        assert received == [payload]
        assert payload <= bed.link_bytes(a)[0] - sent0 <= 1.05 * payload
        # the machine's own namespace is not on the switch
        with pytest.raises(OSError):
            socket.create_connection((b.address, port), timeout=2)

        bed.set_rate(b, "200MB")
        assert "rate 1600Mbit" in _qdisc(b.netns, "eth0")
        bed.set_rate(a, None)
        assert "tbf" not in _qdisc(a.netns, "eth0")
    assert not {a.netns, b.netns, bed.switch} & _namespaces()


@needs_bed
def test_stop_ends_the_hosts_processes_and_two_beds_do_not_clash():
    with netns.TestBed() as one, netns.TestBed() as two:
        h1, h2 = one.add_host("n0"), two.add_host("n0")
        assert h1.address == h2.address and h1.netns != h2.netns
        sleeper = one.popen(h1, ["sleep", "600"])
        other = two.popen(h2, ["sleep", "600"])
        assert one.pids(h1) == [sleeper.pid]
        one.stop(h1)
        assert sleeper.wait(30) == -signal.SIGTERM
        assert not one.pids(h1)
        assert other.poll() is None  # the other bed's host is untouched
    assert other.wait(30) == -signal.SIGTERM  # closing ended it


@needs_bed
def test_bad_hosts_are_config_errors():
    with netns.TestBed() as bed:
        bed.add_host("n0")
        for role in ("n0", "sw", "Node", "a" * 9, ""):
            with pytest.raises(ConfigError):
                bed.add_host(role)
        with pytest.raises(ConfigError, match="rate of host n1"):
            bed.add_host("n1", rate="fast")


OWNER = """
import json, sys, time
from warmstart.testing import netns
bed = netns.TestBed()
host = bed.add_host("n0")
bed.popen(host, ["sleep", "600"])
print(json.dumps(bed.describe()), flush=True)
time.sleep(600)
"""


@needs_bed
def test_a_killed_owners_bed_is_torn_down_by_its_watchdog():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        state = json.loads(owner.stdout.readline())
        names = {h["netns"] for h in state["hosts"]} | {state["switch"]}
        assert names <= _namespaces()
        bed = netns.TestBed.attach(state)
        (sleeper,) = bed.pids(bed.hosts["n0"])
    finally:
        owner.kill()  # no atexit, no finally: only the watchdog can clean up
        owner.wait()
    deadline = time.monotonic() + 60
    while names & _namespaces():
        assert time.monotonic() < deadline, f"left behind: {names & _namespaces()}"
        time.sleep(0.1)
    assert not _alive(sleeper)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_ray_bench_caps_node_links_only_on_the_bed():
    from warmstart.ray_serve.bench import main

    with pytest.raises(ConfigError, match="--node-link needs --hosts netns"):
        main(["--node-link", "1Gbit", "--nodes", "1"])
