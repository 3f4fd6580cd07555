"""`warmstart image convert | push | pull | mount | record | inspect | gc`.

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
                        help=f"image store: a folder or s3://bucket/prefix (${ENV_STORE})")

    c = sub.add_parser("convert", help="convert an OCI layout, docker-archive or rootfs folder")
    c.add_argument("source", help="DIR (rootfs or OCI layout), LAYOUT:TAG, ARCHIVE.tar[:TAG]")
    with_store(c)
    c.add_argument("--tag", required=True)
    c.add_argument("--blob-size", type=_size, default=64 << 20)
    c.add_argument("--level", type=int, default=3, help="zstd level")
    c.add_argument("--workdir", help="where layers are decompressed (default: $TMPDIR)")

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
    m.add_argument("--throttle", type=_size, metavar="BYTES_PER_S",
                   help="simulate a slower network (benchmarks), e.g. 150M")

    r = sub.add_parser("record", help="run a start-up in the image and store its profile",
                       usage="warmstart image record REF [options] -- CMD [ARGS...]")
    r.add_argument("ref")
    with_store(r)
    r.add_argument("--tag", help="tag to move to the image with profile (default: REF's tag)")
    r.add_argument("--no-chroot", action="store_true",
                   help="run CMD on the host; {mount} in CMD is replaced by the mount path")
    r.add_argument("--timeout", type=float, default=600)

    i = sub.add_parser("inspect", help="show an image's manifest, sizes and profile")
    i.add_argument("ref", nargs="?")
    with_store(i)
    i.add_argument("--json", action="store_true")
    i.add_argument("--entries", action="store_true", help="list every entry too")

    g = sub.add_parser("gc", help="delete blobs no tagged image references")
    with_store(g)
    g.add_argument("--dry-run", action="store_true")


def _bar(total: int, desc: str):
    if not sys.stderr.isatty():
        return None, None
    from tqdm import tqdm
    bar = tqdm(total=total or None, unit="B", unit_scale=True, desc=desc, file=sys.stderr)
    return bar, bar.update


def _open(uri: str, throttle: int | None = None):
    from .backends import S3Config
    from .store import ImageStore
    return ImageStore.open(uri, S3Config.from_env() if uri.startswith("s3://") else None,
                           throttle)


def run(args: argparse.Namespace) -> int:
    if args.cmd == "convert":
        from .convert import convert
        bar, progress = _bar(0, "convert")
        with _open(args.store) as store:
            res = convert(args.source, store, args.tag, blob_size=args.blob_size,
                          level=args.level, progress=progress, workdir=args.workdir)
        if bar:
            bar.close()
        print(json.dumps(res.__dict__))
    elif args.cmd == "push":
        from .convert import push
        tag = args.tag or args.ref.split("@")[0]
        with _open(args.__dict__["from"]) as src, _open(args.to) as dst:
            bar, progress = _bar(0, "push")
            res = push(src, args.ref, dst, tag, blob_size=args.blob_size,
                       progress=progress)
            if bar:
                bar.close()
        print(json.dumps(res.__dict__))
    elif args.cmd == "pull":
        from .pull import pull
        with _open(args.store, args.throttle) as store:
            size = sum(e.size for e in store.open_image(args.ref).toc.entries)
            bar, progress = _bar(size, "pull")
            image = pull(store, args.ref, args.dest, concurrency=args.concurrency,
                         progress=progress)
            if bar:
                bar.close()
        print(json.dumps({"digest": image.digest, "dest": args.dest}))
    elif args.cmd == "mount":
        from .mount import MountOptions, serve
        opts = MountOptions(args.cache, args.cache_size, not args.no_prefetch,
                            record_path=args.record)
        with _open(args.store, args.throttle) as store:
            stats = serve(store, args.ref, args.mountpoint, opts)
        print(json.dumps(stats), file=sys.stderr)
    elif args.cmd == "record":
        return _record(args)
    elif args.cmd == "inspect":
        return _inspect(args)
    elif args.cmd == "gc":
        with _open(args.store) as store:
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
                           "--no-prefetch", "--record", prof)
        try:
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
        with _open(args.store) as store:
            digest = store.add_profile(args.ref, profile, tag)
    print(json.dumps({"digest": digest, "tag": tag, "chunks": len(profile.chunks)}))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    with _open(args.store) as store:
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
