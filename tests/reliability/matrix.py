"""The loader under S3 faults: fault mode x rate -> outcome, for tests and docs/RELIABILITY.md.

Every load reads a multi-shard checkpoint from a real S3 server (localbucket) through the
fault-injecting proxy, with one fault mode applied to a seeded fraction of ranged GETs, and is
compared byte for byte with `safetensors.torch.load_file`. Outcomes:

  identical    the load completed and every tensor equals the oracle's, bit for bit
  named-error  the load failed with a warmstart error naming the object and byte range
  wrong-bytes  the load completed with bytes that differ from the oracle (must never happen
               for a fault warmstart can detect)
  other-error  anything else (an unnamed exception, a message without object or range)

Run as a script to regenerate the table in docs/RELIABILITY.md (about 5 minutes on 2 cores):

    python tests/reliability/matrix.py --out docs/RELIABILITY.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from warmstart.errors import FormatError, WarmstartError
from warmstart.loader import LoaderConfig, load
from warmstart.testing import faultproxy as fp
from warmstart.testing.checkpoints import make_checkpoint
from warmstart.testing.faultproxy import FaultProxy

BUCKET = "reliability-matrix"
PREFIX = "m"
CHECKPOINT_BYTES = 8 << 20
SHARDS = 3
CONFIG = LoaderConfig(chunk_size=64 << 10, memory_budget=8 * ((64 << 10) + 8192),
                      concurrency=4, max_attempts=6, retry_base_delay=0.01,
                      retry_max_delay=0.05, read_timeout=0.5, connect_timeout=2.0,
                      s3_data_path="raw")
EXHAUST_ATTEMPTS = 3

# name -> (fault, whether warmstart can notice it). Breaking faults first, then shaping.
MODES = {
    "reset mid-body": (fp.reset_mid_body(4096), True),
    "truncated body": (fp.truncate(4096), True),
    "500 InternalError": (fp.status(500), True),
    "503 SlowDown": (fp.status(503, "SlowDown"), True),
    "stall > read timeout": (fp.stall(5.0, after_bytes=4096), True),
    "wrong Content-Range": (fp.wrong_content_range(), True),
    "flip 1 byte": (fp.flip_bytes(1), False),
    "latency 50 ms": (fp.latency(0.05), True),
    "bandwidth 8 MiB/s": (fp.bandwidth(8 << 20), True),
}
BREAKING = [m for m, (f, _) in MODES.items() if f.kind not in ("latency", "bandwidth")]
RANGE = re.compile(r"bytes \d+-\d+")


@dataclass
class Outcome:
    mode: str
    rate: float
    seed: int
    result: str  # identical | named-error | wrong-bytes | other-error
    seconds: float
    faults: int
    error: str = ""
    rss_growth: int = 0  # bytes of RSS still held after the load's result was dropped


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> dict[str, int]:
    """Open file descriptors of this process by kind (socket, file, ...)."""
    kinds: dict[str, int] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":", 1)[0] if ":" in target else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def sockets_to(port: int) -> int:
    """This process's TCP sockets whose remote end is 127.0.0.1:`port` (client side)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                parts = line.split()
                if int(parts[2].rsplit(":", 1)[1], 16) == port and parts[9] in inodes:
                    count += 1
    return count


def oracle(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def same_bytes(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    if got.keys() != want.keys():
        return False
    for name, w in want.items():
        g = got[name]
        if g.dtype != w.dtype or g.shape != w.shape:
            return False
        if not torch.equal(g.contiguous().view(-1).view(torch.uint8),
                           w.contiguous().view(-1).view(torch.uint8)):
            return False
    return True


def classify(exc: BaseException, uri: str) -> str:
    """named-error only for a warmstart error that says which object and, for a storage
    failure, which bytes (a corrupted header or index is a FormatError naming the file)."""
    text = str(exc)
    if (isinstance(exc, WarmstartError) and uri.rstrip("/") in text
            and (RANGE.search(text) or isinstance(exc, FormatError))):
        return "named-error"
    return "other-error"


@contextlib.contextmanager
def s3_env(endpoint: str, server):
    """Points the AWS credential chain at `server` and the endpoint at `endpoint`."""
    saved = {k: os.environ.get(k) for k in (*server.env(), "AWS_ENDPOINT_URL")}
    os.environ.update(server.env())
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_load(proxy: FaultProxy, uri: str, want: dict, mode: str, rate: float, seed: int,
             config: LoaderConfig = CONFIG, key: str | None = None) -> Outcome:
    """One load of `uri` with `mode` on a `rate` fraction of ranged GETs (of keys holding
    `key`, when given)."""
    fault, _ = MODES[mode]
    rule = proxy.add_rule(fault, method="GET", ranged=True, probability=rate, seed=seed,
                          name=mode, key=key)
    gc.collect()
    before = rss()
    started = time.monotonic()
    try:
        got = load(uri, config=config)
    except Exception as exc:  # noqa: BLE001 - classified below
        seconds = time.monotonic() - started
        result, error = classify(exc, uri), f"{type(exc).__name__}: {exc}"
    else:
        seconds = time.monotonic() - started
        result = "identical" if same_bytes(got, want) else "wrong-bytes"
        error = ""
        del got
    finally:
        proxy.remove_rule(rule)
    gc.collect()
    return Outcome(mode, rate, seed, result, round(seconds, 3), rule.faulted, error[:300],
                   rss() - before)


# --- the script: a matrix over modes, rates and seeds, rendered as markdown -------------

def baseline(proxy: FaultProxy, uri: str, want: dict, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.monotonic()
        got = load(uri, config=CONFIG)
        times.append(time.monotonic() - started)
        assert same_bytes(got, want), "the no-fault load is not identical to the oracle"
    return sorted(times)[len(times) // 2]


def run_matrix(rates: list[float], seeds: int, exhaust: bool) -> dict:
    from warmstart.testing.s3server import running_server

    rows: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="warmstart-matrix-") as tmp, \
            running_server("localbucket") as server:
        folder = make_checkpoint(tmp, CHECKPOINT_BYTES, shards=SHARDS, dtype=torch.float16)
        want = oracle(folder)
        server.create_bucket(BUCKET)
        server.upload_tree(folder, BUCKET, PREFIX)
        uri = f"s3://{BUCKET}/{PREFIX}/"
        with FaultProxy(server.endpoint) as proxy, s3_env(proxy.endpoint, server):
            base = baseline(proxy, uri, want, 5)
            proxy.reset_stats()
            load(uri, config=CONFIG)
            proxy.wait_idle()
            requests = proxy.stats().requests
            for mode in MODES:
                for rate in rates:
                    for seed in range(seeds):
                        rows.append(run_load(proxy, uri, want, mode, rate, seed))
                        print(json.dumps(asdict(rows[-1])), flush=True)
            if exhaust:  # every ranged GET of the shards fails: past any retry bound
                cfg = CONFIG.replace(max_attempts=EXHAUST_ATTEMPTS)
                for mode in BREAKING:
                    if MODES[mode][1]:
                        rows.append(run_load(proxy, uri, want, mode, 1.0, 0, cfg, "-of-"))
                    print(json.dumps(asdict(rows[-1])), flush=True)
    return {"baseline_seconds": base, "requests_per_load": requests,
            "rows": [asdict(r) for r in rows]}


def run_fuzz(runs: int, seconds: int) -> list[dict]:
    """Each atheris target for `runs` executions or `seconds`, whichever ends first, seeded
    with the corpus; crashes counted."""
    here = Path(__file__).parent / "fuzz"
    out = []
    try:
        import atheris  # noqa: F401
    except ImportError:
        return [{"target": "all", "note": "atheris is not installed; fuzzing skipped"}]
    from fuzz.targets import TARGETS

    for target in TARGETS:
        with tempfile.TemporaryDirectory() as work:
            started = time.monotonic()
            proc = subprocess.run(
                [sys.executable, str(here / "fuzz_parsers.py"), target, work,
                 str(here / "corpus" / target), f"-atheris_runs={runs}",
                 f"-max_total_time={seconds}", f"-artifact_prefix={work}/", "-max_len=8192"],
                capture_output=True, text=True, timeout=seconds + 600)
            log = proc.stdout + proc.stderr
            done = (re.findall(r"Done (\d+) (?:runs )?in", log)
                    or re.findall(r"#(\d+)\s+DONE", log) or re.findall(r"#(\d+)", log))
            crashes = [n for n in os.listdir(work) if n.startswith(("crash-", "timeout-",
                                                                    "oom-"))]
            out.append({"target": target, "executions": int(done[-1]) if done else 0,
                        "seconds": round(time.monotonic() - started, 1),
                        "exit": proc.returncode, "crashes": len(crashes),
                        "tail": "" if proc.returncode == 0 else log[-1500:]})
            print(json.dumps(out[-1]), flush=True)
    return out


def render(data: dict) -> str:
    rows = data["rows"]
    base = data["baseline_seconds"]
    lines = [
        f"Checkpoint: {CHECKPOINT_BYTES >> 20} MiB fp16 in {SHARDS} shards on localbucket, "
        f"through warmstart.testing.faultproxy; {data['requests_per_load']} requests per "
        f"no-fault load (chunk {CONFIG.chunk_size >> 10} KiB, concurrency "
        f"{CONFIG.concurrency}, max_attempts {CONFIG.max_attempts}, read_timeout "
        f"{CONFIG.read_timeout} s, raw data path). Faults hit the given fraction of ranged "
        f"GETs (seeded). No-fault baseline: {base:.2f} s per load (median of 5).",
        "",
        "| fault mode | rate | loads | identical | named error | wrong bytes | other | "
        "faults injected | median time | vs baseline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["mode"], r["rate"]) for r in rows},
                  key=lambda k: (list(MODES).index(k[0]), k[1]))
    for mode, rate in keys:
        cell = [r for r in rows if (r["mode"], r["rate"]) == (mode, rate)]
        count = {k: sum(r["result"] == k for r in cell)
                 for k in ("identical", "named-error", "wrong-bytes", "other-error")}
        times = sorted(r["seconds"] for r in cell)
        median = times[len(times) // 2]
        label = "100% (exhaust)" if rate == 1.0 else f"{rate:.0%}"
        lines.append(f"| {mode} | {label} | {len(cell)} | {count['identical']} | "
                     f"{count['named-error']} | {count['wrong-bytes']} | "
                     f"{count['other-error']} | {sum(r['faults'] for r in cell)} | "
                     f"{median:.2f} s | {median / base:.1f}x |")
    failed = [r for r in rows if r["result"] == "named-error" and r["rate"] == 1.0]
    if failed:
        lines += ["", "The 100% rows fail every ranged GET of the shards (max_attempts "
                      f"{EXHAUST_ATTEMPTS}); the first named error of each mode:", ""]
        seen = set()
        for r in failed:
            if r["mode"] not in seen:
                seen.add(r["mode"])
                lines.append(f"- {r['mode']}: `{r['error'][:240]}`")
    growth = max(r["rss_growth"] for r in rows) / (1 << 20)
    lines += ["", f"Largest RSS still held after a load's result was dropped: {growth:.1f} MiB "
                  "(over every load above)."]
    return "\n".join(lines)


def render_fuzz(fuzz: list[dict]) -> str:
    if not fuzz:
        return "Not run."
    if "note" in fuzz[0]:
        return fuzz[0]["note"]
    lines = ["Each target seeded with its corpus (fuzz/corpus/TARGET), inputs up to 8 KiB, "
             "run until its execution or time budget ran out. The layer target is slow per "
             "input (it writes a tar file and applies it; the 2000-component deep-path seed "
             "alone takes seconds, since a TOC stores full paths).", "",
             "| target | executions | seconds | crashes |", "|---|---|---|---|"]
    for f in fuzz:
        lines.append(f"| {f['target']} | {f['executions']} | {f['seconds']} | "
                     f"{f['crashes']} |")
    return "\n".join(lines)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_doc(out: Path, data: dict, fuzz: list[dict], command: str) -> None:
    text = out.read_text() if out.exists() else ""
    run = data.get("run") or {"command": command, "at": now()}
    origin = f"Measured {run['at']} by `{run['command']}`"
    if run["command"] != command:
        origin += f", rendered {now()} by `{command}`"
    block = (f"<!-- matrix:begin -->\n{origin}, on this project's machine kind (2 cores, "
             f"shared with other jobs: times are noisy).\n\n{render(data)}\n\n"
             f"### Fuzzing (atheris)\n\n{render_fuzz(fuzz)}\n<!-- matrix:end -->")
    if "<!-- matrix:begin -->" in text:
        text = re.sub(r"<!-- matrix:begin -->.*<!-- matrix:end -->", lambda _: block, text,
                      flags=re.S)
    else:
        text += "\n" + block + "\n"
    out.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="0.01,0.1,0.3")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fuzz-runs", type=int, default=20000)
    parser.add_argument("--fuzz-seconds", type=int, default=120, help="cap per target")
    parser.add_argument("--reuse", type=Path, help="take the load results from this --json "
                                                   "file instead of running them again")
    parser.add_argument("--no-exhaust", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--out", type=Path, help="markdown file to update (between the "
                                                 "matrix:begin/end markers)")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    command = ("python tests/reliability/matrix.py " + " ".join(argv or sys.argv[1:])).strip()
    saved_fuzz: list[dict] = []
    if args.reuse:  # --fuzz-runs 0 keeps the saved fuzz results too
        data = json.loads(args.reuse.read_text())
        saved_fuzz = data.pop("fuzz", [])
    else:
        data = run_matrix(rates, args.seeds, not args.no_exhaust)
        data["run"] = {"command": command, "at": now()}
    fuzz = run_fuzz(args.fuzz_runs, args.fuzz_seconds) if args.fuzz_runs else saved_fuzz
    if args.json:
        args.json.write_text(json.dumps({**data, "fuzz": fuzz}, indent=1))
    if args.out:
        write_doc(args.out, data, fuzz, command)
    print(render(data))
    print(render_fuzz(fuzz))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    threading.current_thread().name = "matrix"
    sys.exit(main())
