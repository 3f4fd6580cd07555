"""Test hosts on one machine: each a Linux network namespace, linked to a switch by a veth pair,
with its own loopback, address and (optionally) a rate cap on its link.

    with TestBed() as bed:
        s3 = bed.add_host("s3", rate="200MB")           # 200 MB/s each way (tc tbf)
        nodes = [bed.add_host(f"n{i}", rate="1Gbit") for i in range(3)]
        server = start_s3(bed, s3, data_dir)              # localbucket at http://10.77.0.2:9000
        address = start_ray(bed, nodes[0], head=True)     # `ray start --head` on n0
        start_ray(bed, nodes[1], address=address)
        bed.exec(nodes[0], ["python", "driver.py"])       # the driver runs on a host too
        sent, _ = bed.link_bytes(s3)                      # bytes the storage host sent
        bed.stop(nodes[1])                                # the node leaves (its processes end)

The switch is a bridge in a namespace of its own; hosts get 10.77.0.2, .3, ... (a /24 per bed:
beds never share a switch, so two beds may use the same addresses). Nothing is added to the
machine's own namespace, so traffic flows only between a bed's hosts. Names are unique per bed
(`wsb<pid><random>-<role>`), so two runs, or a run that crashed, never clash; `close()` (also at
exit, and by a watchdog process if the owner is killed) ends every process in the bed's
namespaces and deletes them, which deletes their links.

Processes on a host are found as the processes in its namespace (`ip netns pids`), never by
name: `ray stop` is not used, because it ends every Ray process of the machine, whichever
namespace (or user's test) it belongs to.

Needs root, iproute2 (`ip`, `tc`) and a kernel with network namespaces, veth, bridge and the
tbf qdisc; `unavailable()` says which is missing, as a skip reason.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import functools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from warmstart.errors import ConfigError, WarmstartError
from warmstart.storage.units import parse_size

SUBNET = "10.77.0"
MTU = 9000
"""Jumbo frames, as datacenter links use; link byte counters then carry < 1% header bytes."""
_CLONE_NEWNET = 0x40000000


class TestBedError(WarmstartError, RuntimeError):
    """A test bed could not be built or a program on it could not be started."""

    __test__ = False  # not a pytest test class


def parse_rate(value: Any, key: str = "rate") -> int:
    """Bits per second from '1Gbit', '100Mbit', '500kbit' (decimal, as links are rated) or a
    byte rate as `parse_size` reads it ('200MB' = 200 * 10**6 bytes/s = 1.6 Gbit/s)."""
    if isinstance(value, str):
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)bit(?:/s)?", value.strip().lower())
        if match:
            scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}[match[2]]
            bits = int(float(match[1]) * scale)
            if bits > 0:
                return bits
            raise ConfigError(f"{key}: a rate must be positive, got {value!r}")
    bits = parse_size(value, key) * 8
    if bits <= 0:
        raise ConfigError(f"{key}: a rate must be positive, got {value!r}")
    return bits


@dataclass(frozen=True)
class Host:
    """One test host: a network namespace whose `link` (eth0) goes to the bed's switch."""

    role: str
    netns: str
    address: str
    rate_bits: int | None = None
    link: str = "eth0"

    def __str__(self) -> str:
        return f"{self.role} ({self.address})"


def _run(argv: Sequence[str], what: str | None = None, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if proc.returncode:
        message = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
        raise TestBedError(f"{what or ' '.join(argv)}: {message}")
    return proc


@functools.lru_cache(maxsize=None)
def unavailable() -> str | None:
    """None when this machine can build a bed; otherwise why not, in one line (a skip reason).
    Tries each piece once: a namespace, a veth pair between two, a tbf qdisc on it."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (Debian: apt-get install iproute2)"
    name = f"wsprobe{os.getpid()}{secrets.token_hex(2)}"
    made = []
    try:
        for ns in (f"{name}a", f"{name}b"):
            _run(["ip", "netns", "add", ns], "cannot create a network namespace")
            made.append(ns)
        _run(["ip", "link", "add", "eth0", "netns", made[0], "type", "veth", "peer", "name",
              "p0", "netns", made[1]], "cannot create a veth pair between namespaces")
        _run(["ip", "-n", made[1], "link", "add", "br0", "type", "bridge"],
             "cannot create a bridge in a namespace")
        _run(["tc", "-n", made[0], "qdisc", "add", "dev", "eth0", "root", "tbf", "rate",
              "1gbit", "burst", "128kb", "latency", "50ms"],
             "cannot add a tbf qdisc (rate cap) in a namespace")
    except TestBedError as exc:
        return str(exc)
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return None


class TestBed:
    """A switch and the hosts on it; see the module docstring. Use as a context manager, or
    call `close()`; the teardown runs at interpreter exit too, and a watchdog process runs it
    if this process is killed."""

    __test__ = False

    def __init__(self, parent: str | os.PathLike = "/tmp", *, watchdog: bool = True,
                 _state: dict | None = None) -> None:
        self._owned = _state is None
        if _state is None:
            reason = unavailable()
            if reason:
                raise TestBedError(f"cannot build a test bed here: {reason}")
            self.name = f"wsb{os.getpid():x}{secrets.token_hex(2)}"
            # the bed's own folder (deleted with it), in a short `parent`: Ray's Unix socket
            # paths live under the hosts' temp dirs, and may not pass 107 bytes
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=parent))
            self.hosts: dict[str, Host] = {}
            self.switch = f"{self.name}-sw"
            self._closed = False
            self._watchdog: subprocess.Popen | None = None
            _run(["ip", "netns", "add", self.switch])
            try:
                self._ns(self.switch, "link", "set", "lo", "up")
                self._ns(self.switch, "link", "add", "br0", "mtu", str(MTU), "type", "bridge")
                self._ns(self.switch, "link", "set", "br0", "up")
                self._save()
                if watchdog:
                    self._watchdog = subprocess.Popen(
                        [sys.executable, "-m", "warmstart.testing.netns", "watch",
                         str(os.getpid()), str(self._state_file)],
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, start_new_session=True)
            except BaseException:
                self.close()
                raise
            atexit.register(self.close)
        else:  # attach(): a view of a bed another process owns (a driver on one of its hosts)
            self.name, self.switch = _state["name"], _state["switch"]
            self.workdir = Path(_state["workdir"])
            self.hosts = {h["role"]: Host(**h) for h in _state["hosts"]}
            self._closed, self._watchdog = False, None

    # --- building ---------------------------------------------------------------------

    def add_host(self, role: str, rate: Any = None) -> Host:
        """A new host `role` on the switch; `rate` caps its link in both directions (bits/s
        as `parse_rate` reads them: '1Gbit', '200MB')."""
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", role) or role == "sw":
            raise ConfigError(f"host role {role!r}: use 1-8 lowercase letters/digits")
        if role in self.hosts:
            raise ConfigError(f"host {role!r} exists already in bed {self.name}")
        if len(self.hosts) >= 250:
            raise ConfigError("a bed holds at most 250 hosts")
        bits = parse_rate(rate, f"rate of host {role}") if rate is not None else None
        host = Host(role, f"{self.name}-{role}", f"{SUBNET}.{len(self.hosts) + 2}")
        _run(["ip", "netns", "add", host.netns])
        self.hosts[role] = host
        self._save()
        port = f"p-{role}"
        _run(["ip", "link", "add", host.link, "netns", host.netns, "mtu", str(MTU), "type",
              "veth", "peer", "name", port, "netns", self.switch, "mtu", str(MTU)])
        self._ns(self.switch, "link", "set", port, "master", "br0")
        self._ns(self.switch, "link", "set", port, "up")
        self._ns(host.netns, "link", "set", "lo", "up")
        self._ns(host.netns, "addr", "add", f"{host.address}/24", "dev", host.link)
        self._ns(host.netns, "link", "set", host.link, "up")
        # a default route so that programs that find "their" address by routing to a public
        # one (Ray does) find this host's; no packet ever leaves the bed
        self._ns(host.netns, "route", "add", "default", "dev", host.link)
        if bits:
            self.set_rate(host, f"{bits}bit")
        return self.hosts[role]

    def set_rate(self, host: Host, rate: Any) -> Host:
        """Caps `host`'s link at `rate` each way (what it sends, at its end; what it
        receives, at the switch's end), or lifts the cap (None). Takes effect at once, also
        for connections already open."""
        bits = parse_rate(rate, f"rate of host {host.role}") if rate is not None else None
        for netns, dev in ((host.netns, host.link), (self.switch, f"p-{host.role}")):
            if bits is None:
                subprocess.run(["tc", "-n", netns, "qdisc", "del", "dev", dev, "root"],
                               capture_output=True)  # none there: nothing to lift
                continue
            burst = max(128 << 10, bits // 8 // 200)  # 5 ms at the rate, >= a GSO packet
            _run(["tc", "-n", netns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                  f"{bits}bit", "burst", str(burst), "latency", "50ms"])
        self.hosts[host.role] = dataclasses.replace(host, rate_bits=bits)
        if self._owned:
            self._save()
        return self.hosts[host.role]

    def _ns(self, netns: str, *args: str) -> None:
        _run(["ip", "-n", netns, *args])

    @property
    def _state_file(self) -> Path:
        return self.workdir / "bed.json"

    def describe(self) -> dict:
        """What `attach` needs, as JSON-able data."""
        return {"name": self.name, "switch": self.switch, "workdir": str(self.workdir),
                "hosts": [asdict(h) for h in self.hosts.values()]}

    @classmethod
    def attach(cls, state: dict | str | os.PathLike) -> "TestBed":
        """A bed built by another process (`describe()`, or the path of its bed.json): it
        can run programs, read counters and stop hosts; closing it deletes nothing."""
        if not isinstance(state, dict):
            state = json.loads(Path(state).read_text())
        return cls(_state=state)

    def _save(self) -> None:
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.describe()))
        tmp.replace(self._state_file)

    # --- using ------------------------------------------------------------------------

    def command(self, host: Host, argv: Sequence[str]) -> list[str]:
        """`argv` as run on `host`."""
        return ["ip", "netns", "exec", host.netns, *argv]

    def popen(self, host: Host, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Starts `argv` on `host` (`ip netns exec` execs it: the child's pid is argv's);
        returns once the child is in the host's namespace (so `pids` and `stop` see it)."""
        proc = subprocess.Popen(self.command(host, argv), **kw)
        want = os.stat(f"/run/netns/{host.netns}").st_ino
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if os.stat(f"/proc/{proc.pid}/ns/net").st_ino == want:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.002)
        return proc

    def exec(self, host: Host, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """Runs `argv` on `host` and waits; raises TestBedError naming the host on failure."""
        return _run(self.command(host, argv), f"{' '.join(argv)} on {host}", **kw)

    def call(self, host: Host, fn: Callable, *args, **kw):
        """fn(*args, **kw) in a thread of this process that is moved into `host`'s namespace:
        the sockets it opens are the host's (a readiness probe, an upload)."""
        result: dict = {}

        def run() -> None:
            try:
                with open(f"/run/netns/{host.netns}") as ns:
                    if _libc().setns(ns.fileno(), _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise TestBedError(f"setns into {host}: {os.strerror(err)}")
                result["value"] = fn(*args, **kw)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result["error"] = exc

        thread = threading.Thread(target=run, name=f"netns-{host.role}", daemon=True)
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["value"]

    def link_bytes(self, host: Host) -> tuple[int, int]:
        """(bytes sent, bytes received) on `host`'s link so far, Ethernet headers included."""
        out = _run(["ip", "-j", "-s", "-n", host.netns, "link", "show", "dev", host.link])
        stats = json.loads(out.stdout)[0]["stats64"]
        return stats["tx"]["bytes"], stats["rx"]["bytes"]

    def pids(self, host: Host) -> list[int]:
        proc = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True,
                              text=True)
        return [int(p) for p in proc.stdout.split()]

    def stop(self, host: Host, grace: float = 2.0) -> None:
        """Ends every process on `host` (SIGTERM, then SIGKILL after `grace` s): the host
        goes down as if unplugged; it keeps its namespace and link and can be used again."""
        _end(self.pids(host), grace, lambda: self.pids(host))

    def close(self) -> None:
        """Ends every process on every host and deletes the namespaces and the work folder.
        Safe to call twice; a bed from `attach` only forgets."""
        if self._closed:
            return
        self._closed = True
        if not self._owned:
            return
        _teardown(self.describe())
        if self._watchdog is not None:
            _end([self._watchdog.pid], 5, lambda: [] if self._watchdog.poll() is not None
                 else [self._watchdog.pid])
        shutil.rmtree(self.workdir, ignore_errors=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    def __enter__(self) -> "TestBed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@functools.lru_cache(maxsize=None)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _end(pids: list[int], grace: float, alive: Callable[[], list[int]]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while True:
            pids = alive()
            if not pids or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not pids:
            return


def _teardown(state: dict, grace: float = 2.0) -> None:
    """Ends the processes of all the bed's namespaces (together: SIGTERM, SIGKILL after
    `grace`) and deletes the namespaces (their veths go with them). Takes the described
    state, so the watchdog can run it for a dead owner."""
    names = [h["netns"] for h in state["hosts"]] + [state["switch"]]

    def pids() -> list[int]:
        found = []
        for ns in names:
            proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            found += [int(p) for p in proc.stdout.split()]
        return found

    _end(pids(), grace, pids)
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _watch(owner: int, state_file: str) -> None:
    """Waits for `owner` to exit; if its bed still exists then (it was killed before
    closing it), tears the bed down."""
    import select

    try:
        fd = os.pidfd_open(owner)
    except ProcessLookupError:
        fd = None
    if fd is not None:
        select.select([fd], [], [])
    path = Path(state_file)
    if path.exists():
        _teardown(json.loads(path.read_text()))
        shutil.rmtree(path.parent, ignore_errors=True)


# --- programs on the bed ------------------------------------------------------------------


def start_s3(bed: TestBed, host: Host, data_dir: str | os.PathLike, kind: str = "localbucket",
             port: int = 9000, timeout: float = 60.0):
    """An S3 server (`warmstart.testing.s3server`'s kinds) on `host`, listening on its
    address. A fixed port is free there: the host's namespace has nothing else in it.
    Returns an `S3Server`; its `client()` and uploads work from `bed.call(host, ...)`."""
    import urllib.error
    import urllib.request

    from warmstart.testing.s3server import S3Server, _command

    cmd, env = _command(kind, port, str(data_dir), host=host.address)
    log = bed.workdir / f"{kind}-{host.role}.log"
    with open(log, "wb") as out:
        proc = bed.popen(host, cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = S3Server(kind=kind, endpoint=f"http://{host.address}:{port}", process=proc,
                      log_path=str(log), data_dir=str(data_dir))

    def probe() -> bool:
        try:
            urllib.request.urlopen(server.endpoint + "/", timeout=1).close()
        except urllib.error.HTTPError:
            pass  # any HTTP answer means it is up
        except OSError:
            return False
        return True

    deadline = time.monotonic() + timeout
    while not bed.call(host, probe):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise TestBedError(f"{kind} on {host} did not start: "
                               f"{log.read_text(errors='replace')[-1000:]}")
        time.sleep(0.1)
    return server


def ray_env(bed: TestBed) -> dict[str, str]:
    """The environment every Ray process of the bed needs, drivers included: token
    authentication with a token of this bed's own (in its folder, 0600), so that the bed
    neither needs nor touches `~/.ray/auth_token` (which, when present, turns token mode on
    for a head but not for the nodes joining it)."""
    token = bed.workdir / "ray-auth-token"
    if not token.exists():
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_USAGE_STATS_ENABLED": "0"}


def start_ray(bed: TestBed, host: Host, *, head: bool = False, address: str | None = None,
              num_cpus: int = 1, resources: dict | None = None,
              object_store_memory: int = 200 << 20, system_config: dict | None = None,
              env: dict | None = None, port: int = 6379, timeout: float = 180.0) -> str:
    """`ray start` on `host`: the head (`head=True`) or a node joining `address`, with its
    own `--temp-dir` (under the bed's folder) and `--node-ip-address` (the host's). Returns
    the cluster's address (the head's `ip:port`). Ray runs this process's Python, so its
    workers import the same warmstart."""
    if head == (address is not None):
        raise ConfigError("start_ray: give head=True or the head's address, not both")
    temp = bed.workdir / "ray" / host.role
    temp.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ray.scripts.scripts", "start", "--disable-usage-stats",
            f"--node-ip-address={host.address}", f"--temp-dir={temp}",
            f"--num-cpus={num_cpus}", f"--object-store-memory={object_store_memory}",
            f"--resources={json.dumps(resources or {})}"]
    if head:
        argv += ["--head", f"--port={port}", "--include-dashboard=false"]
        if system_config:
            argv.append(f"--system-config={json.dumps(system_config)}")
    else:
        argv.append(f"--address={address}")
    run_env = {**os.environ, **ray_env(bed), **(env or {})}
    log = bed.workdir / f"ray-start-{host.role}.log"
    with open(log, "ab") as out:
        proc = bed.popen(host, argv, env=run_env, stdout=out, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _end([proc.pid], 5, lambda: [] if proc.poll() is not None else [proc.pid])
            code = "timeout"
    if code != 0:
        raise TestBedError(f"ray start on {host} failed ({code}): "
                           f"{log.read_text(errors='replace')[-1500:]}")
    return f"{host.address}:{port}" if head else address


def _main(argv: list[str]) -> int:
    if argv[:1] == ["watch"] and len(argv) == 3:
        _watch(int(argv[1]), argv[2])
        return 0
    if argv[:1] == ["check"]:
        reason = unavailable()
        print(reason or "ok: network namespaces, veth pairs, a bridge and tbf caps work here")
        return 1 if reason else 0
    print("usage: python -m warmstart.testing.netns check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
