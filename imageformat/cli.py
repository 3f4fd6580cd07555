"""`warmstart image convert | push | pull | mount | record | inspect | gc | snapshotter |
layer-store`.

STORE is a folder or `s3://bucket/prefix` (S3 settings come from the usual AWS_*
variables, read once here). REF is a tag, `tag@sha256:...` or a manifest digest. Defaults for
--store and --cache come from WARMSTART_IMAGE_STORE and WARMSTART_IMAGE_CACHE.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile

from warmstart.errors import ConfigError, WarmstartError
from warmstart.storage.units import parse_size

from .decompress import LayerLimits
from .sources import parse_platform

ENV_STORE = "WARMSTART_IMAGE_STORE"
ENV_CACHE = "WARMSTART_IMAGE_CACHE"


def _size(text: str) -> int:
    """Sizes on the command line read as everywhere in warmstart (8GB = 8*10^9, 8GiB = 2^33)."""
    return parse_size(text, "size")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("image", help="chunked, lazily pulled container images")
    build(p)
    return p


def build(p: argparse.ArgumentParser) -> None:
    env = os.environ
    store_default = env.get(ENV_STORE)
    cache_default = env.get(ENV_CACHE) or os.path.expanduser("~/.cache/warmstart/chunks")
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_store(sp, flag="--store"):
        sp.add_argument(flag, default=store_default, required=store_default is None,
                        help="image store: a folder, s3://bucket/prefix or "
                        f"docker://HOST[:PORT]/REPO (${ENV_STORE})")
        sp.add_argument("--plain-http", action="store_true",
                        help="talk http:// to docker:// registries (local registries)")
        sp.add_argument("--auth-file", help="registry credentials (default: "
                        "$REGISTRY_AUTH_FILE, else ~/.docker/config.json)")

    c = sub.add_parser("convert", help="convert a registry image, an OCI layout, a "
                       "docker-archive or a rootfs folder")
    c.add_argument("source", help="docker://HOST[:PORT]/REPO[:TAG|@sha256:...], DIR (rootfs "
                   "or OCI layout), LAYOUT:TAG, ARCHIVE.tar[:TAG]")
    c.add_argument("--platform", help="OS/ARCH[/VARIANT] to pick from a multi-platform "
                   "image (default: this machine's)")
    with_store(c)
    c.add_argument("--tag", required=True)
    c.add_argument("--blob-size", type=_size, default=64 << 20)
    c.add_argument("--level", type=int, default=3, help="zstd level")
    c.add_argument("--workdir", help="where new chunks are spooled, compressed, until the "
                   "final tree is known (default: $TMPDIR)")
    c.add_argument("--max-image-bytes", type=_size, default=LayerLimits.max_bytes,
                   help="refuse layers that decompress to more than this in all "
                   "(default 64G)")
    c.add_argument("--max-layer-ratio", type=float, default=LayerLimits.max_ratio,
                   help="refuse a layer that decompresses more than this many times its "
                   "compressed size (judged past 256M; default 100)")

    s = sub.add_parser("push", help="copy an image to another store, uploading only new chunks")
    s.add_argument("ref")
    with_store(s, "--from")
    s.add_argument("--to", required=True)
    s.add_argument("--tag", help="tag in the destination (default: the source tag)")
    s.add_argument("--blob-size", type=_size, default=64 << 20)

    q = sub.add_parser("pull", help="materialize the rootfs into a folder")
    q.add_argument("ref")
    q.add_argument("dest")
    with_store(q)
    q.add_argument("--concurrency", type=int, default=8)
    q.add_argument("--keep-devices", action="store_true",
                   help="create the image's device nodes (root only; skipped by default)")
    q.add_argument("--keep-setid", action="store_true",
                   help="keep setuid/setgid bits and file capabilities (cleared by default)")
    q.add_argument("--throttle", type=_size, metavar="BYTES_PER_S",
                   help="simulate a slower network (benchmarks), e.g. 150M")

    m = sub.add_parser("mount", help="lazy read-only FUSE mount (foreground)")
    m.add_argument("ref")
    m.add_argument("mountpoint")
    with_store(m)
    m.add_argument("--cache", default=cache_default, help=f"chunk cache folder (${ENV_CACHE})")
    m.add_argument("--cache-size", type=_size, default=8 << 30)
    m.add_argument("--no-prefetch", action="store_true")
    m.add_argument("--record", metavar="FILE", help="write the chunks read as a profile")
    m.add_argument("--map-user", metavar="USER", help="show owners as rootless podman run "
                   "by USER maps them (0 -> USER, 1.. -> its /etc/subuid range)")
    m.add_argument("--throttle", type=_size, metavar="BYTES_PER_S",
                   help="simulate a slower network (benchmarks), e.g. 150M")

    r = sub.add_parser("record", help="run a start-up in the image and store its profile",
                       usage="warmstart image record REF [options] -- CMD [ARGS...]")
    r.add_argument("ref")
    with_store(r)
    r.add_argument("--tag", help="tag to move to the image with profile (default: REF's tag)")
    r.add_argument("--no-chroot", action="store_true",
                   help="run CMD on the host; {mount} in CMD is replaced by the mount path")
    r.add_argument("--containerd", metavar="SOCKET",
                   help="start CMD as a container through this containerd (root only): "
                   "runc runs it on an overlay over the recording mount")
    r.add_argument("--podman", action="store_true",
                   help="start CMD as a container with podman (podman run --rootfs "
                   "MOUNT:O; root only)")
    r.add_argument("--podman-arg", action="append", default=[], metavar="ARG",
                   help="a global podman flag for --podman, e.g. --podman-arg=--runtime=runc "
                   "(repeat as needed)")
    r.add_argument("--podman-run-arg", action="append", default=[], metavar="ARG",
                   help="a `podman run` flag for --podman, e.g. "
                   "--podman-run-arg=--ulimit=nofile=20000:20000")
    r.add_argument("--timeout", type=float, default=600)

    i = sub.add_parser("inspect", help="show an image's manifest, sizes and profile")
    i.add_argument("ref", nargs="?")
    with_store(i)
    i.add_argument("--json", action="store_true")
    i.add_argument("--entries", action="store_true", help="list every entry too")

    n = sub.add_parser("snapshotter", help="serve containerd's snapshots API (proxy plugin): "
                       "images with a warmstart twin in their registry start lazily")
    n.add_argument("--socket", required=True, help="unix socket containerd connects to")
    n.add_argument("--root", required=True, help="snapshots, metadata and the chunk cache")
    n.add_argument("--platform", help="OS/ARCH[/VARIANT] of twins to look for (default: "
                   "this machine's)")
    n.add_argument("--no-lazy", action="store_true", help="plain overlay snapshots only")
    n.add_argument("--plain-http", action="store_true",
                   help="talk http:// to registries (local registries)")
    n.add_argument("--auth-file", help="registry credentials (default: $REGISTRY_AUTH_FILE, "
                   "else ~/.docker/config.json)")

    a = sub.add_parser("layer-store", help="serve podman/CRI-O an additional layer store "
                       "(FUSE, foreground): images with a warmstart twin or store tag "
                       "start lazily")
    a.add_argument("dir", help="mount point; storage.conf gets additionallayerstores = "
                   '["DIR:ref"]')
    a.add_argument("--store", default=store_default, help="a store whose tags named as "
                   "the image reference (HOST/REPO:TAG) show that image; without it, or "
                   "when it has no such tag, the twin in the image's own registry repository")
    a.add_argument("--cache", default=cache_default, help=f"chunk cache folder (${ENV_CACHE})")
    a.add_argument("--mounts", help="where the lazy image mounts go (default: CACHE-mounts)")
    a.add_argument("--platform", help="OS/ARCH[/VARIANT] (default: this machine's)")
    a.add_argument("--map-user", metavar="USER", help="serve rootless podman run by USER "
                   "(Ray's image_uri): owners shown as its user namespace maps them")
    a.add_argument("--ttl", type=float, default=30.0,
                   help="seconds an image look-up is kept before asking the registry again")
    a.add_argument("--plain-http", action="store_true",
                   help="talk http:// to registries (local registries)")
    a.add_argument("--auth-file", help="registry credentials (default: $REGISTRY_AUTH_FILE, "
                   "else ~/.docker/config.json)")

    g = sub.add_parser("gc", help="delete blobs no tagged image references")
    with_store(g)
    g.add_argument("--dry-run", action="store_true")


def _bar(desc: str):
    """A progress bar on a terminal, fed by the `(done, total)` protocol (total 0: unknown)."""
    if not sys.stderr.isatty():
        return None, None
    from tqdm import tqdm
    bar = tqdm(total=None, unit="B", unit_scale=True, desc=desc, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total or None
        bar.n = done
        bar.refresh()
    return bar, progress


def _registry(args: argparse.Namespace):
    from .registry_config import RegistryOptions
    return RegistryOptions.from_env(plain_http=getattr(args, "plain_http", False),
                                    auth_file=getattr(args, "auth_file", None))


def _registry_args(args: argparse.Namespace) -> list[str]:
    """The registry flags again, for a child `warmstart image mount`."""
    return ((["--plain-http"] if args.plain_http else [])
            + (["--auth-file", args.auth_file] if args.auth_file else []))


def _open(uri: str, args: argparse.Namespace, throttle: int | None = None):
    from .backends import S3Config
    from .store import ImageStore
    if uri.startswith("docker://"):
        from .registry_store import RegistryStore
        return RegistryStore.open_registry(uri, _registry(args), throttle)
    return ImageStore.open(uri, S3Config.from_env() if uri.startswith("s3://") else None,
                           throttle)


def run(args: argparse.Namespace) -> int:
    if args.cmd == "convert":
        from .convert import convert
        bar, progress = _bar("convert")
        with _open(args.store, args) as store:
            limits = LayerLimits(args.max_image_bytes, args.max_layer_ratio)
            res = convert(args.source, store, args.tag, blob_size=args.blob_size,
                          level=args.level, progress=progress, workdir=args.workdir,
                          limits=limits, platform=parse_platform(args.platform),
                          registry=_registry(args))
        if bar is not None:
            bar.close()
        print(json.dumps(res.__dict__))
    elif args.cmd == "push":
        from .convert import push
        tag = args.tag or args.ref.split("@")[0]
        with _open(args.__dict__["from"], args) as src, _open(args.to, args) as dst:
            bar, progress = _bar("push")
            res = push(src, args.ref, dst, tag, blob_size=args.blob_size,
                       progress=progress)
            if bar is not None:
                bar.close()
        print(json.dumps(res.__dict__))
    elif args.cmd == "pull":
        from .pull import PullPolicy, PullReport, pull
        report = PullReport()
        with _open(args.store, args, args.throttle) as store:
            bar, progress = _bar("pull")
            image = pull(store, args.ref, args.dest, concurrency=args.concurrency,
                         progress=progress, report=report,
                         policy=PullPolicy(args.keep_devices, args.keep_setid))
            if bar is not None:
                bar.close()
        print(json.dumps({"digest": image.digest, "dest": args.dest, **report.__dict__}))
    elif args.cmd == "mount":
        from .mount import MountOptions, serve
        opts = MountOptions(args.cache, args.cache_size, not args.no_prefetch,
                            record_path=args.record, map_user=args.map_user)
        with _open(args.store, args, args.throttle) as store:
            stats = serve(store, args.ref, args.mountpoint, opts)
        print(json.dumps(stats), file=sys.stderr)
    elif args.cmd == "record":
        return _record(args)
    elif args.cmd == "inspect":
        return _inspect(args)
    elif args.cmd == "snapshotter":
        from .lazy import LazyLayers
        from .snapshotter import serve as serve_snapshots
        lazy = None if args.no_lazy else LazyLayers(
            os.path.abspath(args.root), _registry(args), parse_platform(args.platform),
            tuple(_registry_args(args)))
        serve_snapshots(args.socket, args.root, lazy)
    elif args.cmd == "layer-store":
        from . import layerstore_fs
        mount_args = tuple(_registry_args(args)) + (
            ("--map-user", args.map_user) if args.map_user else ())
        return layerstore_fs.run(args, _registry(args), mount_args)
    elif args.cmd == "gc":
        with _open(args.store, args) as store:
            doomed = store.gc(dry_run=args.dry_run)
        print(json.dumps({"deleted" if not args.dry_run else "would_delete": doomed}))
    return 0


def _record(args: argparse.Namespace) -> int:
    from .manifest import parse_profile
    from .mount import spawn_mount, unmount
    cmd = args.command
    if not cmd:
        raise ConfigError("record needs a command after --")
    with tempfile.TemporaryDirectory(prefix="warmstart-record-") as tmp:
        mnt, prof = os.path.join(tmp, "mnt"), os.path.join(tmp, "profile.json")
        os.mkdir(mnt)
        proc = spawn_mount(args.store, args.ref, mnt, os.path.join(tmp, "cache"),
                           "--no-prefetch", "--record", prof, *_registry_args(args))
        try:
            if args.containerd:
                rc = _run_in_containerd(args.containerd, mnt, tmp, cmd, args.timeout)
            elif args.podman:
                from .record_podman import run_in_podman
                rc = run_in_podman(mnt, cmd, args.podman_arg, args.podman_run_arg,
                                   args.timeout)
            else:
                full = ([c.replace("{mount}", mnt) for c in cmd] if args.no_chroot
                        else ["chroot", mnt, *cmd])
                rc = subprocess.run(full, timeout=args.timeout).returncode
        finally:
            unmount(mnt, proc)
        if rc != 0:
            print(f"warmstart image record: the command exited with {rc}; no profile stored",
                  file=sys.stderr)
            return 1
        with open(prof, "rb") as f:
            profile = parse_profile(f.read())
        tag = args.tag or args.ref.split("@")[0]
        with _open(args.store, args) as store:
            digest = store.add_profile(args.ref, profile, tag)
    print(json.dumps({"digest": digest, "tag": tag, "chunks": len(profile.chunks)}))
    return 0


def _run_in_containerd(address: str, mnt: str, tmp: str, cmd: list[str],
                       timeout: float) -> int:
    """`ctr run --rootfs` on an overlay (a writable upper over the read-only mount), so the
    start-up is recorded exactly as containerd and runc perform it."""
    if os.geteuid() != 0:
        raise ConfigError("record --containerd needs root (overlay mount, containerd)")
    rootfs = os.path.join(tmp, "rootfs")
    for d in ("rootfs", "upper", "work"):
        os.mkdir(os.path.join(tmp, d))
    opts = f"lowerdir={mnt},upperdir={tmp}/upper,workdir={tmp}/work"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, rootfs], check=True)
    try:
        return subprocess.run(["ctr", "--address", address, "run", "--rm", "--rootfs", rootfs,
                               f"warmstart-record-{os.getpid()}", *cmd],
                              timeout=timeout).returncode
    finally:
        subprocess.run(["umount", rootfs], check=False)


def _inspect(args: argparse.Namespace) -> int:
    with _open(args.store, args) as store:
        if args.ref is None:
            print(json.dumps(store.tags(), indent=1))
            return 0
        image = store.open_image(args.ref)
    toc = image.toc
    kinds: dict[str, int] = {}
    for e in toc.entries:
        kinds[e.type] = kinds.get(e.type, 0) + 1
    chunks = toc.unique_chunks()
    info = {"digest": image.digest, "toc": image.toc_digest, "entries": kinds,
            "file_bytes": sum(e.size for e in toc.entries),
            "unique_chunk_bytes": sum(c.size for c in chunks), "chunks": len(chunks),
            "blobs": len(image.manifest.blobs),
            "stored_bytes": sum(b.size for b in image.manifest.blobs),
            "profile_chunks": len(image.profile.chunks) if image.profile else None}
    if args.entries:
        info["list"] = [f"{e.type:8} {e.mode:05o} {e.uid}:{e.gid} {e.size:>12} {e.path}"
                        + (f" -> {e.target}" if e.target else "") for e in toc.entries]
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            if k == "list":
                print("\n".join(v))
            else:
                print(f"{k:20} {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="warmstart image", description=__doc__)
    build(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:  # record's command follows `--`
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    args.command = command
    logging.basicConfig(level=os.environ.get("WARMSTART_LOG", "WARNING").upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return run(args)
    except WarmstartError as exc:
        print(f"warmstart image {args.cmd}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
