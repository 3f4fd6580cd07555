"""Results of one `warmstart bench` run: medians, ratios, results.json, results.md and plots.

Every figure here comes from the runs of this invocation; ratios compare peers measured in
the same run, and fractions of ceiling use the ceiling measured in the same scenario.
"""

from __future__ import annotations

import sys

import json
import statistics
from pathlib import Path

from warmstart.benchmarks.peers import BASELINES, PEERS
from warmstart.benchmarks.verify import DIGEST

SCHEMA = 1
TOP_FIELDS = ("schema", "date", "command", "device", "options", "checkpoint", "machine",
              "baselines", "digest", "scenarios")
SCENARIO_FIELDS = ("name", "source", "note", "ceilings", "peers", "not_applicable", "order")
PEER_FIELDS = ("peer", "status", "error", "runs", "median_gbps", "min_gbps", "max_gbps",
               "median_seconds", "first_tensor_seconds", "peak_rss_bytes", "alloc_seconds",
               "median_gbps_excl_alloc", "ratios", "ceiling_fraction")
RUN_FIELDS = ("status", "seconds", "bytes", "tensors", "gbps", "first_tensor_seconds",
              "alloc_seconds", "peak_rss_bytes", "digest_ok", "wall_seconds")
CEILING_FIELDS = ("label", "runs", "median_gbps", "min_gbps", "max_gbps")
PRIMARY_CEILING = {"local": "disk", "s3": "s3"}
PLOTS = ("throughput.png", "first_tensor.png", "peak_rss.png")
# How a peer's figures are to be read (behaviour, never numbers).
PEER_NOTES = {
    "safetensors": "on CPU, `load_file` returns copy-on-write mmaps of the files: a warm load "
                   "maps page-cache pages without copying them, a cold one faults them in "
                   "from disk, and its RSS counts those file pages",
    "runai": "tensors are copied out of the streamer's reused buffer into destinations "
             "allocated per tensor (fresh pages faulted in): `alloc` is that part of its time",
    "warmstart-stream": "`stream()`: first tensor = the first yielded tensor",
    "download-then-load": "time includes the download to a temporary folder and the "
                          "safetensors load of the downloaded files",
}
GB = 1e9
GiB = 1 << 30


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(scenario: dict) -> None:
    """Fills medians, ratios (to each baseline of this scenario) and fractions of ceiling."""
    for ceiling in scenario["ceilings"].values():
        speeds = [c["gbps"] for c in ceiling["runs"] if c.get("gbps")]
        ceiling.update(median_gbps=_median(speeds), min_gbps=min(speeds, default=None),
                       max_gbps=max(speeds, default=None))
        errors = [c["error"] for c in ceiling["runs"] if c.get("error")]
        if errors:
            ceiling["error"] = errors[0]
    primary = scenario["ceilings"].get(PRIMARY_CEILING[scenario["source"]], {})
    for row in scenario["peers"].values():
        runs = row["runs"]
        statuses = {r["status"] for r in runs}
        status = next((s for s in ("not installed", "error", "failed") if s in statuses), "ok")
        bad = next((r for r in runs if r["status"] == status), {}) if status != "ok" else {}
        row.update(status=status, error=bad.get("error"), median_gbps=None, min_gbps=None,
                   max_gbps=None, median_seconds=None, first_tensor_seconds=None,
                   peak_rss_bytes=None, alloc_seconds=None, median_gbps_excl_alloc=None,
                   ratios={}, ceiling_fraction=None)
        if status != "ok" or not runs:
            continue
        speeds = [r["gbps"] for r in runs]
        row.update(median_gbps=_median(speeds), min_gbps=min(speeds), max_gbps=max(speeds),
                   median_seconds=_median(r["seconds"] for r in runs),
                   first_tensor_seconds=_median(r["first_tensor_seconds"] for r in runs),
                   peak_rss_bytes=max(r["peak_rss_bytes"] for r in runs),
                   alloc_seconds=_median(r["alloc_seconds"] for r in runs),
                   median_gbps_excl_alloc=_median(
                       r["bytes"] / GB / max(r["seconds"] - r["alloc_seconds"], 1e-9)
                       for r in runs if r["alloc_seconds"] is not None))
        if primary.get("median_gbps"):
            row["ceiling_fraction"] = row["median_gbps"] / primary["median_gbps"]
    for row in scenario["peers"].values():
        for base in BASELINES:
            other = scenario["peers"].get(base)
            if row["median_gbps"] and other and other.get("median_gbps"):
                row["ratios"][base] = row["median_gbps"] / other["median_gbps"]


def document(*, argv, started, device, args, ckpt, scenarios, machine) -> dict:
    return {
        "schema": SCHEMA,
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(argv),
        "device": device,
        "options": {"scenarios": [s["name"] for s in scenarios], "peers": args.peers,
                    "repeat": args.repeat, "budget": args.budget,
                    "concurrency": args.concurrency, "quick": args.quick,
                    "require": args.require},
        "checkpoint": {"path": ckpt.uri or None, "files": ckpt.files, "s3": ckpt.s3,
                       "tensor_bytes": ckpt.tensor_bytes, "tensors": ckpt.tensors,
                       "generated": ckpt.generated, "reference_digest": ckpt.reference},
        "machine": machine,
        "baselines": list(BASELINES),
        "digest": DIGEST,
        "scenarios": scenarios,
    }


def _num(value, fmt: str, none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def run_line(scenario: str, peer: str, index: int, total: int, run: dict) -> str:
    head = f"{scenario:<13} {peer:<19} {index}/{total}"
    if run["status"] not in {"ok", "failed"}:
        return f"{head}  {run['status']}: {run.get('error', '')}"
    return (f"{head}  {run['gbps']:7.3f} GB/s  {run['seconds']:7.3f} s  "
            f"first {_num(run['first_tensor_seconds'], '.3f')} s  "
            f"rss {run['peak_rss_bytes'] / GiB:5.2f} GiB  "
            f"{'digest ok' if run['digest_ok'] else 'DIGEST MISMATCH'}")


def scenario_markdown(scenario: dict, baselines: list[str]) -> str:
    bases = [b for b in baselines if b in scenario["peers"]]
    lines = [f"### {scenario['name']}", "", scenario["note"] + ".", ""]
    for kind, c in scenario["ceilings"].items():
        if c["median_gbps"]:
            lines.append(f"Ceiling ({kind}): {c['label']}: {c['median_gbps']:.3f} GB/s "
                         f"[{c['min_gbps']:.3f}-{c['max_gbps']:.3f}]  ")
        else:
            lines.append(f"Ceiling ({kind}): not measured ({c.get('error', '')})  ")
    lines += ["", "| peer | GB/s median [min-max] | " + " | ".join(f"× {b}" for b in bases)
              + " | of ceiling | first tensor (s) | peak RSS (GiB) | alloc (s) [GB/s without] "
              "| status |",
              "|---|---|" + "---|" * len(bases) + "---|---|---|---|---|"]
    for row in scenario["peers"].values():
        if row["status"] != "ok":
            status = row["status"] + (f": {row['error']}" if row.get("error") else "")
            status = status.replace("|", "/").replace("\n", " ")
            lines.append(f"| {row['peer']} | - | " + " | ".join("-" for _ in bases)
                         + f" | - | - | - | - | {status} |")
            continue
        speed = (f"{row['median_gbps']:.3f} [{row['min_gbps']:.3f}-{row['max_gbps']:.3f}]")
        ratios = " | ".join(_num(row["ratios"].get(b), ".2f") for b in bases)
        lines.append(
            f"| {row['peer']} | {speed} | {ratios} | {_num(row['ceiling_fraction'], '.0%')} | "
            f"{_num(row['first_tensor_seconds'], '.3f')} | "
            f"{row['peak_rss_bytes'] / GiB:.2f} | {_alloc(row)} | "
            f"ok ({len(row['runs'])} runs, digests match) |")
    if scenario["not_applicable"]:
        lines += ["", "Not applicable to this source: " + ", ".join(scenario["not_applicable"])
                  + "."]
    return "\n".join(lines)


def _alloc(row: dict) -> str:
    if row["alloc_seconds"] is None:
        return "-"
    return f"{row['alloc_seconds']:.3f} [{row['median_gbps_excl_alloc']:.3f}]"


def markdown(doc: dict) -> str:
    m, ck = doc["machine"], doc["checkpoint"]
    gpu = m.get("gpu")
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    lines = [
        "# warmstart bench results", "",
        f"- date: {doc['date']}", f"- command: `{doc['command']}`",
        f"- device: {doc['device']}",
        f"- machine: {m['cpu_model']}, {m['cores']} cores ({m['cores_usable']} usable), "
        f"{m['memory_bytes'] / GiB:.1f} GiB RAM, kernel {m['kernel']}",
        f"- disk: {m['disk']['device']} ({m['disk']['fstype']}, "
        f"{'rotational' if m['disk']['rotational'] else 'non-rotational'})",
        f"- GPU: {gpu['name'] + ', driver ' + str(gpu['driver']) if gpu else 'none'}",
        f"- versions: {versions}",
        f"- checkpoint: {ck['tensor_bytes'] / GiB:.2f} GiB of tensors, {ck['tensors']} tensors, "
        f"{len(ck['files']) or len(ck['s3'].get('keys', []))} file(s)"
        + (" (generated, bf16, Llama-shaped)" if ck["generated"] else f" ({ck['path']})"),
        f"- runs per peer: {doc['options']['repeat']} (median [min-max]); ratios compare peers "
        f"of the same run; every output checked against the reference digest "
        f"({doc['digest']})", "",
    ]
    for scenario in doc["scenarios"]:
        lines += [scenario_markdown(scenario, doc["baselines"]), ""]
    present = {p for s in doc["scenarios"] for p in s["peers"]}
    notes = [f"- {peer}: {note}" for peer, note in PEER_NOTES.items() if peer in present]
    if notes:
        lines += ["Reading the rows:", "", *notes, ""]
    lines += ["Fairness rules: see benchmarks/README.md in the warmstart repository.", ""]
    return "\n".join(lines)


def write(doc: dict, out: Path, json_only: bool = False) -> None:
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    if json_only:
        return
    (out / "results.md").write_text(markdown(doc))
    plot(doc, out)


def plot(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(PEERS, plt.get_cmap("tab10").colors))
    specs = [("throughput.png", "median_gbps", "GB/s (median, whiskers min-max)",
              "Load throughput", 1.0),
             ("first_tensor.png", "first_tensor_seconds", "seconds", "Time to first tensor", 1),
             ("peak_rss.png", "peak_rss_bytes", "GiB", "Peak RSS above the process baseline",
              1 / GiB)]
    scenarios = doc["scenarios"]
    for name, key, ylabel, title, scale in specs:
        fig, ax = plt.subplots(figsize=(max(6, 2.6 * len(scenarios)), 4.5), dpi=110)
        for i, sc in enumerate(scenarios):
            rows = list(sc["peers"].values())
            width = 0.8 / max(len(rows), 1)
            for j, row in enumerate(rows):
                x = i - 0.4 + width * (j + 0.5)
                value = row.get(key)
                if value is None:
                    ax.text(x, 0.02, row["status"] if row["status"] != "ok" else "n/a",
                            rotation=90, ha="center", va="bottom", fontsize=7,
                            transform=ax.get_xaxis_transform())
                    continue
                yerr = None
                if key == "median_gbps":
                    yerr = [[value - row["min_gbps"]], [row["max_gbps"] - value]]
                ax.bar(x, value * scale, width * 0.9, yerr=yerr, capsize=3,
                       color=colors.get(row["peer"]),
                       label=row["peer"] if i == 0 or row["peer"] not in
                       [r["peer"] for s in scenarios[:i] for r in s["peers"].values()]
                       else None)
            if key == "median_gbps":
                for kind, c in sc["ceilings"].items():
                    if c.get("median_gbps"):
                        ax.hlines(c["median_gbps"], i - 0.45, i + 0.45, colors="black",
                                  linestyles="--" if kind != "gpu" else ":")
                        ax.text(i + 0.45, c["median_gbps"], f" {kind} ceiling", fontsize=7,
                                va="bottom", ha="right")
        values = [r[key] for s in scenarios for r in s["peers"].values() if r.get(key)]
        if key == "median_gbps" and values and max(values) > 20 * min(values):
            ax.set_yscale("log")  # one peer far above the rest would flatten them
            ylabel += ", log scale"
        ax.set_xticks(range(len(scenarios)))
        ax.set_xticklabels([s["name"] for s in scenarios])
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} ({doc['device']}, {doc['checkpoint']['tensor_bytes'] / GiB:.2f}"
                     f" GiB)")
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Re-renders results.md and the plots of an output folder from its results.json."""
    import sys

    folder = Path((sys.argv[1:] if argv is None else argv)[0])
    doc = json.loads((folder / "results.json").read_text())
    for scenario in doc["scenarios"]:
        summarize(scenario)
    write(doc, folder)
    return 0


if __name__ == "__main__":
    from warmstart.extras import run_command

    sys.exit(run_command("python -m warmstart.benchmarks.report", main))
