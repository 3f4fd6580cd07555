"""`warmstart ray-node setup`: make a node start Ray workers in lazily pulled images.

Ray 2.60's `runtime_env={"image_uri": IMAGE}` (ray/_private/runtime_env/image_uri.py) runs,
as the user running Ray, first `podman run --rm -v TMP:/shared:Z IMAGE python -c ...` (to
pull the image and find `default_worker.py` in it), then each worker as `podman run -v
RAY_TMP:RAY_TMP --cgroup-manager=cgroupfs --network=host --pid=host --ipc=host
--userns=keep-id --env ... --entrypoint python IMAGE ...`. No other podman flag can be added,
so everything else comes from the user's podman configuration, and:

- `--userns=keep-id` is rootless only (podman 4.3 refuses it for root): Ray runs as a
  non-root user with subordinate uid/gid ranges (`/etc/subuid`, `/etc/subgid`);
- `--ipc=host` needs `/dev/mqueue` (an mqueue mount);
- `containers.conf` picks runc, cgroupfs, the file events backend, the ulimits, and host
  networking for the first command, which names none (rootless slirp4netns needs a
  /dev/net/tun the Ray user may not open);
- `registries.conf` lists the registries reached over plain http;
- `/` is a shared mount, so that the lazy image mounts the layer store makes after rootless
  podman created its namespaces (they are made when podman first asks for a layer) reach
  those namespaces (what systemd does at boot; container hosts often leave `/` private);
- `storage.conf` names the warmstart layer store (`additionallayerstores = ["DIR:ref"]`),
  which a root `warmstart image layer-store DIR` serves to every user (FUSE allow_other);
- `storage.conf` also mounts containers through fuse-overlayfs (`mount_program`): with
  kernel overlay, rootless podman cannot shift owners for `--userns=keep-id`, so it copies
  the image's whole top layer with owners changed before the first worker starts, which
  reads every chunk of a lazy image; fuse-overlayfs maps the owners as it serves the files.
  It opens /dev/fuse as the user, so /dev/fuse is made 0666 (what Debian's udev rule sets).

`plan_setup` decides all of it (pure); `apply` does it, idempotently.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from warmstart.errors import ConfigError, WarmstartError

SUBID_COUNT = 65536
SUBID_FLOOR = 100000


@dataclass(frozen=True)
class NodeSetup:
    user: str
    home: str
    uid: int
    gid: int
    layer_store: str
    insecure_registries: tuple[str, ...] = ()
    runtime: str = "runc"
    ulimits: tuple[str, ...] = ("nofile=20000:20000", "nproc=4096:4096")
    mount_program: str | None = "/usr/bin/fuse-overlayfs"
    """podman's overlay mount program (None: kernel overlay, and a copy of the image)."""


@dataclass(frozen=True)
class Plan:
    files: tuple[tuple[str, str], ...]  # (path, content) written and given to the user
    subid_lines: tuple[tuple[str, str], ...]  # (/etc/subuid | /etc/subgid, line to append)
    mount_mqueue: bool
    share_root: bool
    open_fuse: bool = False  # chmod 0666 /dev/fuse
    notes: tuple[str, ...] = field(default_factory=tuple)


def _toml_list(items) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def next_subid_start(existing: str) -> int:
    """The first free start of a 65536 range above every range in a subuid/subgid file."""
    top = SUBID_FLOOR
    for n, line in enumerate(existing.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise ConfigError(f"subordinate id file line {n} is not NAME:START:COUNT: {line!r}")
        top = max(top, int(parts[1]) + int(parts[2]))
    return top


def _has_range(existing: str, user: str, uid: int) -> bool:
    return any(line.split(":")[0] in (user, str(uid)) for line in existing.splitlines()
               if line.strip() and not line.startswith("#"))


def plan_setup(s: NodeSetup, subuid: str, subgid: str, mqueue_mounted: bool,
               root_shared: bool, fuse_mode: int = 0o666) -> Plan:
    """What to do for `s`, given the subuid/subgid files, /dev/mqueue, `/`'s propagation and
    /dev/fuse's permission bits."""
    if s.uid == 0:
        raise ConfigError("Ray's image_uri passes --userns=keep-id, which podman refuses for "
                          "root: set up a non-root user and run Ray as that user")
    if not os.path.isabs(s.layer_store):
        raise ConfigError(f"layer store {s.layer_store!r} must be an absolute path")
    conf = os.path.join(s.home, ".config", "containers")
    storage = ("[storage]\ndriver = \"overlay\"\n[storage.options]\n"
               f"additionallayerstores = {_toml_list([s.layer_store + ':ref'])}\n")
    if s.mount_program:
        storage += f"[storage.options.overlay]\nmount_program = {json.dumps(s.mount_program)}\n"
    containers = ("[containers]\n"
                  f"default_ulimits = {_toml_list(s.ulimits)}\n"
                  # Ray's first command (pull, find default_worker.py) names no network:
                  # rootless slirp4netns needs /dev/net/tun, so the default is the host's
                  "netns = \"host\"\n"
                  "[engine]\n"
                  f"runtime = {json.dumps(s.runtime)}\n"
                  "cgroup_manager = \"cgroupfs\"\n"
                  "events_logger = \"file\"\n")
    registries = "".join(f"[[registry]]\nlocation = {json.dumps(r)}\ninsecure = true\n\n"
                         for r in s.insecure_registries)
    files = [(os.path.join(conf, "storage.conf"), storage),
             (os.path.join(conf, "containers.conf"), containers)]
    if registries:
        files.append((os.path.join(conf, "registries.conf"),
                      'unqualified-search-registries = []\n\n' + registries))
    subids = []
    for path, text in (("/etc/subuid", subuid), ("/etc/subgid", subgid)):
        if not _has_range(text, s.user, s.uid):
            subids.append((path, f"{s.user}:{next_subid_start(text)}:{SUBID_COUNT}"))
    notes = [f"run `warmstart image layer-store {s.layer_store}` as root (it must be "
             "mounted before Ray starts a worker), and Ray itself as " + s.user]
    if not s.mount_program:
        notes.append("no fuse-overlayfs (Debian package fuse-overlayfs): podman copies each "
                     "image's top layer for --userns=keep-id, reading all of a lazy image")
    open_fuse = bool(s.mount_program) and fuse_mode & 0o006 != 0o006
    return Plan(tuple(files), tuple(subids), not mqueue_mounted, not root_shared,
                open_fuse=open_fuse, notes=tuple(notes))


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _mountinfo() -> list[list[str]]:
    with open("/proc/self/mountinfo") as f:
        return [line.split() for line in f]


def mqueue_mounted() -> bool:
    return any(parts[4] == "/dev/mqueue" for parts in _mountinfo())


def root_shared() -> bool:
    """Whether `/` propagates mounts (an optional `shared:N` field in its mountinfo line)."""
    for parts in _mountinfo():
        if parts[4] == "/":
            fields = parts[6:parts.index("-")]
            return any(f.startswith("shared:") for f in fields)
    return False


def apply(plan: Plan, s: NodeSetup) -> None:
    if os.geteuid() != 0:
        raise ConfigError("warmstart ray-node setup needs root (subuid/subgid, /dev/mqueue, "
                          "the user's podman configuration)")
    for path, line in plan.subid_lines:
        with open(path, "a") as f:
            f.write(line + "\n")
    if plan.mount_mqueue:
        os.makedirs("/dev/mqueue", exist_ok=True)
        r = subprocess.run(["mount", "-t", "mqueue", "mqueue", "/dev/mqueue"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise ConfigError(f"could not mount /dev/mqueue: {r.stderr.strip()}")
    if plan.open_fuse:
        os.chmod("/dev/fuse", 0o666)
    if plan.share_root:
        r = subprocess.run(["mount", "--make-rshared", "/"], capture_output=True, text=True)
        if r.returncode != 0:
            raise ConfigError(f"could not make / a shared mount: {r.stderr.strip()}")
    for path, content in plan.files:
        d = os.path.dirname(path)
        os.makedirs(d, exist_ok=True)
        for p in (os.path.dirname(d), d):  # ~/.config and ~/.config/containers
            os.chown(p, s.uid, s.gid)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(content)
        os.chown(tmp, s.uid, s.gid)
        os.replace(tmp, path)
    os.makedirs(s.layer_store, exist_ok=True)
    # podman as the user migrates to the new configuration (pause process, storage)
    subprocess.run(["runuser", "-u", s.user, "--", "podman", "system", "migrate"],
                   capture_output=True, cwd="/")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="warmstart ray-node", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("setup", help="configure this node's podman for Ray's image_uri "
                        "with the warmstart layer store")
    st.add_argument("--user", required=True, help="the non-root user that runs Ray")
    st.add_argument("--layer-store", default="/var/lib/warmstart/layers",
                    help="where `warmstart image layer-store` is mounted")
    st.add_argument("--insecure-registry", action="append", default=[], metavar="HOST:PORT",
                    help="a registry reached over plain http (repeat as needed)")
    st.add_argument("--runtime", default="runc", help="OCI runtime podman uses (runc)")
    st.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    args = p.parse_args(argv)
    try:
        try:
            pw = pwd.getpwnam(args.user)
        except KeyError:
            raise ConfigError(f"user {args.user!r} does not exist (create it first, e.g. "
                              f"useradd -m {args.user})") from None
        s = NodeSetup(args.user, pw.pw_dir, pw.pw_uid, pw.pw_gid,
                      os.path.abspath(args.layer_store), tuple(args.insecure_registry),
                      args.runtime, mount_program=shutil.which("fuse-overlayfs"))
        try:
            fuse_mode = os.stat("/dev/fuse").st_mode & 0o777
        except FileNotFoundError:
            raise ConfigError("/dev/fuse does not exist (the layer store and fuse-overlayfs "
                              "need FUSE)") from None
        plan = plan_setup(s, _read("/etc/subuid"), _read("/etc/subgid"), mqueue_mounted(),
                          root_shared(), fuse_mode)
        if not args.dry_run:
            apply(plan, s)
    except WarmstartError as exc:
        print(f"warmstart ray-node setup: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"user": s.user, "files": [f for f, _ in plan.files],
                      "subids": [line for _, line in plan.subid_lines],
                      "mqueue": plan.mount_mqueue, "share_root": plan.share_root,
                      "open_fuse": plan.open_fuse, "mount_program": s.mount_program,
                      "applied": not args.dry_run,
                      "next": list(plan.notes)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
