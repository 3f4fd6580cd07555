"""`warmstart bench`: every loader side by side on one checkpoint, in one run.

With no arguments it generates a Llama-shaped bf16 checkpoint sized to fit the machine (cached
and reused), starts localbucket on 127.0.0.1, uploads the checkpoint, and runs the scenarios

  local-warm     the files are in the page cache (read through before each run)
  local-cold     the page cache is dropped before each run (sync + drop_caches); where that
                 is not permitted the scenario runs as local-odirect: warmstart with
                 direct_io=True, the others as they are, and the report says so
  s3             the same files as objects on the local S3 server
  s3-https       the same objects over https: nginx on 127.0.0.1 (a CA generated for the run,
                 passed as AWS_CA_BUNDLE) serves GET/HEAD with ranges from the S3 server's
                 folder and proxies listings to it; skipped, with the reason, without nginx

Each run of each peer is its own process (`warmstart.benchmarks.peer`); repeats are
interleaved across peers, in an order that changes every repeat (`run_order`); ceilings are
measured in the same run. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from warmstart.benchmarks import ceilings, machine, report
from warmstart.benchmarks.peers import PEERS, applies
from warmstart.benchmarks.verify import reference_digest

GiB, MiB = 1 << 30, 1 << 20
SCENARIOS = ("local-warm", "local-cold", "s3", "s3-https")
IMAGE = "image"  # opt-in: lazy image start vs full pull (needs umoci, skopeo, FUSE, pyfuse3)
SOURCE = {"local-warm": "local", "local-cold": "local", "local-odirect": "local", "s3": "s3",
          "s3-https": "s3"}
BUCKET, PREFIX = "warmstart-bench", "model"
QUICK_SIZE = 64 * MiB
CEILING = "ceiling"  # the ceiling's slot in a repeat's order


def run_order(items: list[str], repeat: int) -> list[list[str]]:
    """The order of ITEMS in each of REPEAT repeats: rows of a Williams (balanced Latin)
    square. A run's figures depend on what ran just before it (a cold read right after another
    process read the same files is faster than one after a pause), so over n rows (n even;
    2n when n is odd) every item runs in every position equally often and directly after
    every other item exactly once (twice for odd n); for fewer repeats, no item has the same
    predecessor in every repeat. Repeats beyond the square start it again."""
    n = len(items)
    if n < 2:
        return [list(items) for _ in range(repeat)]
    first = [0]  # 0, 1, n-1, 2, n-2, ...: each difference between neighbours occurs once
    for k in range(1, n):
        first.append((k + 1) // 2 if k % 2 else n - k // 2)
    name = {index: items[k] for k, index in enumerate(first)}  # so row 0 is ITEMS as given
    rows = []
    for i in range(n):
        row = [name[(j + i) % n] for j in first]
        rows.append(row)
        if n % 2:
            rows.append(row[::-1])  # odd n needs the mirrored rows too; interleaved, so a
                                    # short run already mixes both
    return [list(rows[r % len(rows)]) for r in range(repeat)]


@dataclass
class Checkpoint:
    uri: str                      # what warmstart loads locally ('' for an s3:// model)
    files: list[str]              # local shard paths
    tensor_bytes: int
    tensors: int
    reference: str
    generated: bool
    s3: dict = field(default_factory=dict)  # endpoint, bucket, keys, uri
    s3_https: dict = field(default_factory=dict)  # the same, through the TLS front


def parse_args(argv: list[str]) -> argparse.Namespace:
    from warmstart.storage.units import parse_size

    p = argparse.ArgumentParser(prog="warmstart bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="PATH (file, folder, index json) or s3://bucket/prefix/ "
                                   "(endpoint and keys from AWS_*); default: generated")
    p.add_argument("--size", type=lambda v: parse_size(v, "--size"),
                   help="generated checkpoint size, e.g. 16GiB (default: fits the machine)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma list of {', '.join(SCENARIOS)}, and {IMAGE} (opt-in: "
                        "lazy image start vs full pull, see benchmarks/image_bench.py)")
    p.add_argument("--peers", default=",".join(PEERS), help="comma list of " + ", ".join(PEERS))
    p.add_argument("--repeat", type=int, help="runs per peer per scenario (default 3)")
    p.add_argument("--budget", type=lambda v: parse_size(v, "--budget"),
                   help="warmstart's host memory budget (default: the loader's)")
    p.add_argument("--concurrency", type=int, default=0,
                   help="requests in flight for every peer that takes one (0: each default)")
    p.add_argument("--out", default="./bench-out", help="output folder (default ./bench-out)")
    p.add_argument("--cache", default=os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "warmstart", "bench"),
                   help="where generated checkpoints are kept and reused")
    p.add_argument("--json-only", action="store_true",
                   help="no progress or tables: results.json only, also printed on stdout")
    p.add_argument("--quick", action="store_true", help="64 MiB checkpoint, repeat 2 (CI)")
    p.add_argument("--require", action="append", default=[], metavar="PEER=MODULE",
                   help="import MODULE instead of PEER's own modules (tests: a missing peer)")
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.peers = [s.strip() for s in args.peers.split(",") if s.strip()]
    args.image = IMAGE in args.scenarios
    args.scenarios = [s for s in args.scenarios if s != IMAGE]
    for name in args.scenarios:
        if name not in SOURCE:
            p.error(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    for name in args.peers:
        if name not in PEERS:
            p.error(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    args.require = dict(item.split("=", 1) for item in args.require)
    if args.repeat is None:
        args.repeat = 2 if args.quick else 3
    if args.size is None and args.quick:
        args.size = QUICK_SIZE
    return args


def default_size(cache: str) -> int:
    os.makedirs(cache, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if machine.memory_bytes() >= 16 * GiB and free >= 10 * GiB:
        return 2 * GiB
    return 512 * MiB if machine.memory_bytes() >= 4 * GiB and free >= 3 * GiB else 128 * MiB


def generated_checkpoint(cache: str, size: int, shards: int, say) -> str:
    """The cached checkpoint of this size and shard count, generated on first use."""
    from warmstart.testing.checkpoints import make_checkpoint

    folder = Path(cache) / f"llama-bf16-{size}-{shards}shards"
    marker = folder / "complete.json"
    if marker.exists() and json.loads(marker.read_text()).get("size") == size:
        return json.loads(marker.read_text())["path"]
    shutil.rmtree(folder, ignore_errors=True)
    say(f"generating a {size / GiB:.2f} GiB bf16 checkpoint in {shards} shards: {folder}")
    path = make_checkpoint(folder, size, shards)
    marker.write_text(json.dumps({"size": size, "shards": shards, "path": str(path)}))
    return str(path)


def local_files(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if path.endswith(".json"):
        with open(path) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(os.path.dirname(path), n) for n in names]
    return [path]


class _ObjectReader:
    """Reads one object front to back in 16 MiB ranged GETs (file-like `read(n)`)."""

    def __init__(self, client, uri, size: int) -> None:
        self.client, self.uri, self.size, self.pos = client, uri, size, 0

    def read(self, n: int) -> bytes:
        from warmstart.storage import sync

        n = max(0, min(n, 16 << 20, self.size - self.pos))
        data = sync.run(self.client.get_range(self.uri, self.pos, n)) if n else b""
        self.pos += len(data)
        return data


def s3_checkpoint(uri: str) -> Checkpoint:
    """A user's s3:// checkpoint: keys listed, reference digest streamed from the objects, all
    through warmstart.storage's one client (endpoint, CA bundle, credentials from AWS_*)."""
    from warmstart.benchmarks.verify import combine, stream_records
    from warmstart.storage import sync
    from warmstart.storage.config import StorageConfig
    from warmstart.storage.s3 import S3Client
    from warmstart.storage.uri import S3Uri, parse_s3

    where = parse_s3(uri)
    config = StorageConfig.from_env()
    client = sync.run(S3Client(config).__aenter__())
    try:
        listing = sync.run(client.list(where.bucket, where.key, delimiter=""))
        sizes = {key: size for key, size in listing if key.endswith(".safetensors")}
        keys = sorted(sizes)
        if not keys:
            raise SystemExit(f"warmstart bench: no .safetensors objects under {uri}")
        records, total = {}, 0
        for key in keys:
            reader = _ObjectReader(client, S3Uri(where.bucket, key), sizes[key])
            recs, nbytes = stream_records(reader, key)
            records.update(recs)
            total += nbytes
    finally:
        sync.run(client.__aexit__(None, None, None))
    return Checkpoint("", [], total, len(records), combine(records), False,
                      {"endpoint": config.endpoint_url, "bucket": where.bucket, "keys": keys,
                       "uri": uri, "ca_bundle": config.ca_bundle})


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def warm(paths: list[str]) -> None:
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(16 * MiB):
                pass


def run_peer(spec: dict, env: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "warmstart.benchmarks.peer", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break  # a line cut short by a crash
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return {"status": "error", "error": f"exit {proc.returncode}: {tail}"[:500]}


class Run:
    """Everything one `warmstart bench` invocation needs while it measures."""

    def __init__(self, args: argparse.Namespace, ckpt: Checkpoint, device: str,
                 server_data: str | None, env: dict, say) -> None:
        self.args, self.ckpt, self.device, self.env, self.say = args, ckpt, device, env, say
        self.server_data = server_data
        self.scenario_env: dict[str, dict] = {}  # s3-https: AWS_ENDPOINT_URL, AWS_CA_BUNDLE
        self.can_drop = drop_caches() if any(SOURCE[s] == "local" for s in args.scenarios) \
            else True
        self.tmp = tempfile.mkdtemp(prefix="warmstart-bench-")

    def prepare(self, scenario: str) -> None:
        if scenario == "local-warm":
            warm(self.ckpt.files)
        elif scenario == "local-cold":
            drop_caches()
        elif SOURCE[scenario] == "s3" and self.server_data:
            warm([str(p) for p in Path(self.server_data).rglob("*") if p.is_file()])

    def spec(self, scenario: str, peer: str) -> dict:
        source = SOURCE[scenario]
        s3 = self.ckpt.s3_https if scenario == "s3-https" else self.ckpt.s3
        return {"peer": peer, "source": source, "device": self.device,
                "files": self.ckpt.files,
                "uri": self.ckpt.uri if source == "local" else s3["uri"],
                "s3": s3, "budget": self.args.budget,
                "concurrency": self.args.concurrency,
                "direct_io": True if scenario == "local-odirect" else None,
                "tmp": self.tmp, "reference": self.ckpt.reference,
                "require": self.args.require}

    def ceiling(self, scenario: str) -> list[dict]:
        out = []
        try:
            if SOURCE[scenario] == "local":
                out.append(ceilings.disk(self.ckpt.files, direct=scenario != "local-warm"))
            else:
                s3 = self.ckpt.s3_https if scenario == "s3-https" else self.ckpt.s3
                out.append(ceilings.s3(s3["endpoint"] or "", s3["bucket"], s3["keys"],
                                       self.args.concurrency or 16,
                                       ca_bundle=s3.get("ca_bundle")))
        except Exception as exc:  # noqa: BLE001 - a missing ceiling is reported, not fatal
            out.append({"kind": "disk" if SOURCE[scenario] == "local" else "s3",
                        "label": "not measured", "gbps": None, "error": str(exc)[:300]})
        if self.device.startswith("cuda"):
            try:
                out.append(ceilings.gpu())
            except Exception as exc:  # noqa: BLE001
                out.append({"kind": "gpu", "label": "not measured", "gbps": None,
                            "error": str(exc)[:300]})
        return out

    def scenario(self, scenario: str) -> dict:
        from tqdm import tqdm

        source = SOURCE[scenario]
        peers = [p for p in self.args.peers if applies(p, source)]
        result = {"name": scenario, "source": source, "note": self.note(scenario),
                  "ceilings": {}, "peers": {p: {"peer": p, "runs": []} for p in peers},
                  "not_applicable": [p for p in self.args.peers if not applies(p, source)]}
        timeout = 300 + self.ckpt.tensor_bytes / 20e6
        bar = tqdm(total=self.args.repeat * (len(peers) + 1), desc=scenario, unit="run",
                   file=sys.stderr, disable=self.args.json_only, leave=False)
        result["order"] = run_order([CEILING, *peers], self.args.repeat)
        for r, order in enumerate(result["order"]):
            for peer in order:
                if peer == CEILING:
                    self.prepare(scenario)
                    for c in self.ceiling(scenario):
                        result["ceilings"].setdefault(c["kind"],
                                                      {"label": c["label"], "runs": []})
                        result["ceilings"][c["kind"]]["runs"].append(c)
                    bar.update(1)
                    continue
                runs = result["peers"][peer]["runs"]
                if runs and runs[-1]["status"] in {"not installed", "error"}:
                    bar.update(1)
                    continue  # reported once; no point repeating a crash or a missing module
                self.prepare(scenario)
                started = time.perf_counter()
                run = run_peer(self.spec(scenario, peer),
                               {**self.env, **self.scenario_env.get(scenario, {})}, timeout)
                run["wall_seconds"] = time.perf_counter() - started
                runs.append(run)
                bar.update(1)
                if not self.args.json_only:
                    tqdm.write(report.run_line(scenario, peer, r + 1, self.args.repeat, run),
                               file=sys.stdout)
        bar.close()
        report.summarize(result)
        return result

    def note(self, scenario: str) -> str:
        notes = {"local-warm": "files in the page cache (read through before every run)",
                 "local-cold": "page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) "
                               "before every run",
                 "local-odirect": "page cache could NOT be dropped (not permitted): warmstart "
                                  "forced to O_DIRECT (direct_io=True); the other peers may "
                                  "read from the page cache",
                 "s3": ("objects on a local S3 server on 127.0.0.1 (its files warm)"
                        if self.server_data else
                        f"objects under {self.ckpt.s3.get('uri')} at "
                        f"{self.ckpt.s3.get('endpoint') or 'the AWS default endpoint'}"),
                 "s3-https": "the same objects over https: nginx on 127.0.0.1 serves GET/HEAD "
                             "with ranges from the S3 server's folder (TLS 1.3, a CA made for "
                             "the run in AWS_CA_BUNDLE) and proxies listings to it"}
        return notes[scenario]


def image_tools_missing() -> list[str]:
    import importlib.util

    missing = [tool for tool in ("umoci", "skopeo", "fusermount3") if not shutil.which(tool)]
    missing += [mod for mod in ("pyfuse3", "zstandard", "trio")
                if importlib.util.find_spec(mod) is None]
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    return missing


def run_image_scenario(args: argparse.Namespace, out: Path, say) -> int:
    """The image benchmark (small Python + numpy image, `--repeat` runs) into OUT/image/."""
    missing = image_tools_missing()
    folder = out / IMAGE
    folder.mkdir(parents=True, exist_ok=True)
    if missing:
        note = (f"image scenario not run: needs {', '.join(missing)} (Debian fuse3, "
                f"libfuse3-dev, umoci, skopeo; `pip install -e .[image]`)")
        (folder / "RESULTS.md").write_text(note + "\n")
        say(note)
        return 0
    from warmstart.benchmarks import image_bench

    say(f"image: lazy start vs full pull, {args.repeat} run(s) per mode ...")
    with contextlib.redirect_stdout(sys.stderr):  # its samples; stdout is for --json-only
        return image_bench.main(["--runs", str(args.repeat), "--out", str(folder)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    started = datetime.datetime.now(datetime.timezone.utc)

    def say(text: str) -> None:
        if not args.json_only:
            print(text, file=sys.stderr, flush=True)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image_status = run_image_scenario(args, out, say) if args.image else None
    if not args.scenarios:
        return 0 if image_status in (None, 0) else 1
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true",
           "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0"}
    server = server_data = front = None
    if "s3-https" in args.scenarios:
        from warmstart.testing.tlsfront import nginx_missing

        why = nginx_missing()
        if why:
            args.scenarios = [s for s in args.scenarios if s != "s3-https"]
            say(f"s3-https not run: {why}")
    if args.model and args.model.startswith("s3://"):
        if any(s != "s3" for s in args.scenarios):
            args.scenarios = ["s3"]
            say("an s3:// model: running the s3 scenario only (over its own endpoint)")
        ckpt = s3_checkpoint(args.model)
    else:
        path = args.model or generated_checkpoint(
            args.cache, args.size or default_size(args.cache), args.shards, say)
        files = local_files(path)
        say(f"reference digest of {len(files)} file(s) ...")
        digest, nbytes, count = reference_digest(files)
        ckpt = Checkpoint(path, files, nbytes, count, digest, args.model is None)
    try:
        if any(SOURCE[s] == "s3" for s in args.scenarios) and not ckpt.s3:
            from warmstart.testing.s3server import start_server

            server_data = tempfile.mkdtemp(prefix="warmstart-bench-s3-")
            server = start_server("localbucket", server_data)
            server.create_bucket(BUCKET)
            say(f"uploading {len(ckpt.files)} file(s) to {server.endpoint} ...")
            for f in ckpt.files:
                server.upload_file(f, BUCKET, f"{PREFIX}/{os.path.basename(f)}")
            env.update(server.env())
            os.environ.update(server.env())
            ckpt.s3 = {"endpoint": server.endpoint, "bucket": BUCKET, "uri":
                       f"s3://{BUCKET}/{PREFIX}/", "keys": [f"{PREFIX}/{os.path.basename(f)}"
                                                           for f in ckpt.files]}
        if "s3-https" in args.scenarios:
            from warmstart.testing.tlsfront import start_tls_front

            front = start_tls_front(server, tempfile.mkdtemp(prefix="warmstart-bench-tls-"),
                                    static=True)
            ckpt.s3_https = {**ckpt.s3, "endpoint": front.endpoint,
                             "ca_bundle": front.ca_bundle}
            say(f"s3-https: nginx TLS front at {front.endpoint}")
        run = Run(args, ckpt, device, server_data, env, say)
        if front is not None:
            run.scenario_env["s3-https"] = {"AWS_ENDPOINT_URL": front.endpoint,
                                            "AWS_CA_BUNDLE": front.ca_bundle}
        if not run.can_drop:
            args.scenarios = ["local-odirect" if s == "local-cold" else s
                              for s in args.scenarios]
            say("cannot drop the page cache here: local-cold runs as local-odirect")
        results = [run.scenario(s) for s in args.scenarios]
        shutil.rmtree(run.tmp, ignore_errors=True)
    finally:
        if front is not None:
            front.stop()
        if server is not None:
            server.stop()
        if server_data:
            shutil.rmtree(server_data, ignore_errors=True)
    doc = report.document(
        argv=(["python", "-m", "warmstart.benchmarks", *sys.argv[1:]] if argv is None
              else ["warmstart", "bench", *argv]),
        started=started, device=device, args=args, ckpt=ckpt, scenarios=results,
        machine=machine.facts(os.path.dirname(ckpt.files[0]) if ckpt.files else str(out)))
    report.write(doc, out, json_only=args.json_only)
    if args.json_only:
        print(json.dumps(doc, indent=1))
    else:
        for scenario in doc["scenarios"]:
            print("\n" + report.scenario_markdown(scenario, doc["baselines"]))
        print(f"\nwrote {out}/results.json, results.md, throughput.png, first_tensor.png, "
              f"peak_rss.png" + (f", {IMAGE}/RESULTS.md" if args.image else ""))
    return 0 if all(p["status"] != "failed" for s in doc["scenarios"]
                    for p in s["peers"].values()) else 1
