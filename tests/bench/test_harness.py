"""The benchmark harness itself: a tiny real run (generated checkpoint, local S3 server, every
installed peer in its own process) writes complete JSON, a markdown table and real plots, and a
peer whose module cannot be imported is reported as "not installed"."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from warmstart.benchmarks import report
from warmstart.benchmarks.harness import CEILING, run_order

MISSING = "warmstart_bench_no_such_module"


def _bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "warmstart.benchmarks", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    cache = tmp_path_factory.mktemp("bench-cache")
    proc = _bench("--quick", "--scenarios", "local-warm,s3", "--repeat", "1", "--out", str(out),
                  "--cache", str(cache), "--device", "cpu",
                  "--require", f"fastsafetensors={MISSING}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_json_has_every_declared_field(quick_run):
    out, _ = quick_run
    doc = json.loads((out / "results.json").read_text())
    assert set(report.TOP_FIELDS) <= set(doc)
    assert doc["schema"] == report.SCHEMA and doc["device"] == "cpu"
    assert doc["checkpoint"]["tensor_bytes"] > 0 and doc["checkpoint"]["generated"]
    for key in ("cpu_model", "cores", "memory_bytes", "disk", "gpu", "versions"):
        assert key in doc["machine"]
    assert doc["machine"]["versions"]["torch"]
    assert [s["name"] for s in doc["scenarios"]] == ["local-warm", "s3"]
    for scenario in doc["scenarios"]:
        assert set(report.SCENARIO_FIELDS) <= set(scenario)
        assert scenario["order"] == run_order([CEILING, *scenario["peers"]], 1)
        for ceiling in scenario["ceilings"].values():
            assert set(report.CEILING_FIELDS) <= set(ceiling)
            assert ceiling["median_gbps"] > 0, ceiling
        for row in scenario["peers"].values():
            assert set(report.PEER_FIELDS) <= set(row)
            for run in row["runs"]:
                if run["status"] == "ok":
                    assert set(report.RUN_FIELDS) <= set(run)
                    assert run["digest_ok"] and run["bytes"] == doc["checkpoint"]["tensor_bytes"]
    warm = doc["scenarios"][0]["peers"]
    s3 = doc["scenarios"][1]["peers"]
    assert warm["warmstart"]["status"] == "ok" and warm["warmstart"]["median_gbps"] > 0
    assert warm["safetensors"]["status"] == "ok"
    assert warm["warmstart"]["ratios"]["safetensors"] == pytest.approx(
        warm["warmstart"]["median_gbps"] / warm["safetensors"]["median_gbps"])
    assert warm["warmstart-stream"]["first_tensor_seconds"] > 0
    assert s3["warmstart"]["status"] == "ok" and s3["download-then-load"]["status"] == "ok"
    assert s3["warmstart"]["ceiling_fraction"] > 0


def test_missing_peer_is_reported_not_dropped(quick_run):
    out, proc = quick_run
    doc = json.loads((out / "results.json").read_text())
    row = doc["scenarios"][0]["peers"]["fastsafetensors"]
    assert row["status"] == "not installed" and MISSING in row["error"]
    md = (out / "results.md").read_text()
    assert "| fastsafetensors | - |" in md and "not installed" in md
    assert "not installed" in proc.stdout


def test_markdown_table(quick_run):
    out, proc = quick_run
    md = (out / "results.md").read_text()
    for name in ("### local-warm", "### s3", "| peer | GB/s median [min-max] |",
                 "× safetensors", "| warmstart |", "| download-then-load |", "Ceiling (disk)",
                 "Ceiling (s3)"):
        assert name in md
    assert "| peer | GB/s median" in proc.stdout  # the tables are printed too


def test_plots_are_real_images(quick_run):
    from PIL import Image

    out, _ = quick_run
    for name in report.PLOTS:
        with Image.open(out / name) as image:
            image.load()
            assert image.size[0] > 200 and image.size[1] > 200
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is not None and len(colours) > 8, name


def test_json_only_prints_json(tmp_path):
    proc = _bench("--quick", "--scenarios", "local-warm", "--peers", "warmstart,safetensors",
                  "--repeat", "1", "--out", str(tmp_path), "--cache", str(tmp_path / "cache"),
                  "--device", "cpu", "--json-only")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc == json.loads((tmp_path / "results.json").read_text())
    assert not (tmp_path / "results.md").exists()
    assert doc["scenarios"][0]["peers"]["warmstart"]["status"] == "ok"


def test_report_rerenders_from_json(quick_run, tmp_path):
    import shutil

    out, _ = quick_run
    shutil.copy(out / "results.json", tmp_path / "results.json")
    assert report.main([str(tmp_path)]) == 0
    assert (tmp_path / "results.md").read_text() == (out / "results.md").read_text()
    assert all((tmp_path / name).stat().st_size > 0 for name in report.PLOTS)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_run_order_is_balanced(n):
    """Every repeat runs every peer and the ceiling once; over a full square each one runs in
    every position equally often and directly after every other one equally often."""
    items = [CEILING, *(f"p{i}" for i in range(n - 1))]
    rows = run_order(items, n if n % 2 == 0 else 2 * n)
    assert all(sorted(row) == sorted(items) for row in rows)
    positions = {(row.index(item), item) for row in rows for item in row}
    assert len(positions) == n * n  # every item at every position
    pairs = [(a, b) for row in rows for a, b in zip(row, row[1:])]
    assert sorted(set(pairs)) == sorted((a, b) for a in items for b in items if a != b)
    assert len(pairs) == len(set(pairs)) * (1 if n % 2 == 0 else 2)
    assert run_order(items, 3 * len(rows)) == rows * 3  # more repeats start the square again


@pytest.mark.parametrize("n", [3, 4, 5])
def test_run_order_varies_the_predecessor_in_three_repeats(n):
    """The default --repeat 3: no peer (and not the ceiling) has the same predecessor, or the
    same position, in every repeat; the first repeat keeps the order given."""
    items = [CEILING, *(f"p{i}" for i in range(n - 1))]
    rows = run_order(items, 3)
    assert rows[0] == items
    for item in items:
        before = {row[row.index(item) - 1] if row.index(item) else None for row in rows}
        assert len(before) > 1, (item, rows)
        assert len({row.index(item) for row in rows}) > 1, (item, rows)


def test_gpu_check_script_parses():
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_image_scenario_runs_or_says_what_it_needs(tmp_path):
    """`--scenarios image`: lazy start vs full pull of a small image from a local S3 server,
    every mode measured; where umoci/skopeo/FUSE are missing, a note naming them instead."""
    from warmstart.benchmarks.harness import image_tools_missing

    out = tmp_path / "out"
    proc = _bench("--scenarios", "image", "--repeat", "1", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (out / "image" / "RESULTS.md").read_text()
    missing = image_tools_missing()
    if missing:
        assert "image scenario not run: needs" in text and missing[0] in text
        return
    doc = json.loads((out / "image" / "image_bench.json").read_text())
    modes = {s["mode"] for s in doc["samples"]}
    assert {"full-pull", "lazy", "lazy+profile"} <= modes
    assert all(s.get("seconds", 0) > 0 for s in doc["samples"] if "error" not in s)
    assert "lazy+profile" in text and "vs full pull" in text


def test_s3_https_scenario_measures_every_peer_over_tls(tmp_path):
    """`s3-https`: the same objects through nginx with a generated CA; warmstart, Run:ai and
    download-then-load load them bit for bit, and the raw ceiling is measured over TLS."""
    from warmstart.testing.tlsfront import nginx_missing

    if nginx_missing():
        pytest.skip(nginx_missing())
    proc = _bench("--quick", "--scenarios", "s3-https", "--peers",
                  "warmstart,runai,download-then-load", "--repeat", "1", "--out", str(tmp_path),
                  "--cache", str(tmp_path / "cache"), "--device", "cpu", "--json-only")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    [scenario] = doc["scenarios"]
    assert scenario["name"] == "s3-https" and "https" in scenario["note"]
    ceiling = scenario["ceilings"]["s3"]
    assert "over https" in ceiling["label"] and ceiling["median_gbps"] > 0
    for peer in ("warmstart", "download-then-load"):
        row = scenario["peers"][peer]
        assert row["status"] == "ok" and row["runs"][0]["digest_ok"], row
    assert scenario["peers"]["runai"]["status"] in {"ok", "not installed"}
