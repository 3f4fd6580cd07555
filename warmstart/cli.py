"""The `warmstart` command: `load` (stream a checkpoint and report), `sums` (block-sums
sidecars for verified loads), `bench` (the
side-by-side benchmark harness), `image` (chunked container images), `ray-node`
(podman set-up for Ray's image_uri)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from warmstart.extras import require, run_command

SUBCOMMANDS = {
    "bench": ("warmstart.benchmarks.harness", "benchmark warmstart against the loaders "
              "people use today (embedded default: generated model + local S3 server)"),
    "image": ("warmstart.imageformat.cli", "convert, push, pull, mount and inspect chunked "
              "container images"),
    "ray-node": ("warmstart.ray_serve.node_setup", "set a node up for Ray's image_uri with "
                 "the warmstart layer store (podman)"),
}


def _load_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="warmstart load",
        description="Stream a safetensors checkpoint (file, folder, index, or s3://) into "
                    "memory and report the throughput.")
    parser.add_argument("uri")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--names", nargs="*", help="load only these tensors")
    parser.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                        help="loader option, e.g. -o chunk_size=8MiB -o direct_io=auto "
                             "(WARMSTART_* environment variables are read first)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from warmstart.loader import LoaderConfig, load

    overrides = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--option expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    config = LoaderConfig.from_env(**overrides)
    bar = None
    if not args.no_progress and not args.json and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=0, unit="B", unit_scale=True, desc="loading", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    started = time.perf_counter()
    tensors = load(args.uri, args.device, names=args.names, config=config, progress=progress)
    seconds = time.perf_counter() - started
    if bar is not None:
        bar.close()
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    result = {"uri": args.uri, "device": args.device, "tensors": len(tensors),
              "bytes": nbytes, "seconds": round(seconds, 4),
              "gb_per_s": round(nbytes / 1e9 / max(seconds, 1e-9), 3)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loaded {result['tensors']} tensors, {nbytes / 1e9:.3f} GB in {seconds:.3f} s "
              f"({result['gb_per_s']} GB/s) to {args.device}")
    return 0


def _sums_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="warmstart sums",
        description="Write a block-sums sidecar (X.safetensors.sums: CRC32 per block) next to "
                    "each local shard, for loads with verify=true. Upload the sidecars next "
                    "to the shards when the checkpoint lives in S3.")
    parser.add_argument("paths", nargs="+", help="shard files, or folders of them")
    parser.add_argument("--block-size", default="1MiB", help="default 1MiB (a multiple of 4KiB)")
    args = parser.parse_args(argv)
    import os

    from warmstart.errors import ConfigError
    from warmstart.loader.config import parse_size
    from warmstart.loader.sums import write_sidecars

    block = parse_size(args.block_size, "--block-size")
    if block < 4096 or block % 4096:
        raise ConfigError(f"--block-size must be a multiple of 4096, got {block}")
    files = []
    for path in args.paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, n) for n in os.listdir(path)
                            if n.endswith(".safetensors"))
        elif os.path.isfile(path):
            files.append(path)
        else:
            parser.error(f"{path}: no such file or folder")
    for sidecar in write_sidecars(files, block):
        print(sidecar)
    return 0


BENCH_NEEDS = ("localbucket", "safetensors", "matplotlib")
"""What `warmstart bench` cannot run without (all in the bench extra); checked up front so a
missing one is a one-line answer, not a server that dies at start."""


def _dispatch(command: str, rest: list[str], usage: str) -> int:
    if command == "load":
        return _load_command(rest)
    if command == "sums":
        return _sums_command(rest)
    if command in SUBCOMMANDS:
        if command == "bench" and not {"-h", "--help"} & set(rest):
            require(BENCH_NEEDS, "warmstart bench")
        module = importlib.import_module(SUBCOMMANDS[command][0])
        return int(module.main(rest) or 0)
    print(f"warmstart: unknown command {command!r}\n\n{usage}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: warmstart {load,sums,bench,image} ...\n\n"
             "  load   stream a safetensors checkpoint into memory and report throughput\n"
             "  sums   write block-sums sidecars for loads with verify=true\n"
             + "".join(f"  {name:<6} {help_}\n" for name, (_, help_) in SUBCOMMANDS.items()))
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    return run_command(f"warmstart {command}", lambda: _dispatch(command, rest, usage))


if __name__ == "__main__":
    sys.exit(main())
