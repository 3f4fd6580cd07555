"""`warmstart image ...` end to end through the top-level command."""

from __future__ import annotations

import json

from imageformat_helpers import snapshot

from warmstart.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["image", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_convert_push_inspect_pull_gc(capsys, py_rootfs, s3_servers, tmp_path, monkeypatch):
    local = str(tmp_path / "store")
    rc, out, _ = run(capsys, "convert", py_rootfs, "--store", local, "--tag", "v1",
                     "--blob-size", "2MiB")
    assert rc == 0 and json.loads(out)["new_chunks"] > 0
    srv = s3_servers["nanio"]
    for k, v in srv.env().items():
        monkeypatch.setenv(k, v)
    remote = f"s3://images/cli-{tmp_path.name}"
    rc, out, _ = run(capsys, "push", "v1", "--from", local, "--to", remote, "--blob-size", "2M")
    assert rc == 0 and json.loads(out)["reused_chunks"] == 0
    rc, out, _ = run(capsys, "push", "v1", "--from", local, "--to", remote)
    assert rc == 0 and json.loads(out)["new_bytes"] == 0
    rc, out, _ = run(capsys, "inspect", "v1", "--store", remote, "--json")
    info = json.loads(out)
    assert rc == 0 and info["entries"]["reg"] > 100 and info["blobs"] >= 3
    rc, out, _ = run(capsys, "pull", "v1", str(tmp_path / "out"), "--store", remote,
                     "--keep-setid")
    assert rc == 0 and snapshot(str(tmp_path / "out")) == snapshot(py_rootfs)
    rc, out, _ = run(capsys, "gc", "--store", remote)
    assert rc == 0 and json.loads(out) == {"deleted": []}


def test_errors_are_one_clear_line(capsys, tmp_path):
    rc, _, err = run(capsys, "inspect", "nope", "--store", str(tmp_path))
    assert rc == 1 and "no image tagged 'nope'" in err
    rc, _, err = run(capsys, "convert", str(tmp_path / "missing"), "--store", str(tmp_path),
                     "--tag", "x")
    assert rc == 1 and "missing" in err
