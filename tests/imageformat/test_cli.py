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


def on_a_terminal(*argv: str) -> tuple[int, str]:
    """Runs `warmstart ARGV` with stderr on a pseudo-terminal (120 columns); returns the exit
    status and what the terminal showed, carriage returns as new lines."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "warmstart.cli", *argv], stdin=slave,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    shown = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        shown += data
    os.close(master)
    return proc.wait(timeout=120), shown.decode(errors="replace").replace("\r", "\n")


def test_progress_bars_on_a_terminal(tmp_path):
    """convert (total unknown), push and pull (total known) draw their bars from the one
    `(done, total)` protocol and end at 100% of the image's bytes."""
    import os

    root = tmp_path / "root"
    root.mkdir()
    (root / "f.bin").write_bytes(os.urandom(3_000_000))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    rc, shown = on_a_terminal("image", "convert", str(root), "--store", a, "--tag", "v1")
    assert rc == 0 and "convert: 3.00MB" in shown, shown[-500:]
    rc, shown = on_a_terminal("image", "push", "--from", a, "--to", b, "v1")
    assert rc == 0 and "push: 100%" in shown and "3.00M/3.00M" in shown, shown[-500:]
    rc, shown = on_a_terminal("image", "pull", "--store", b, "v1", str(tmp_path / "out"))
    assert rc == 0 and "pull: 100%" in shown and "3.00M/3.00M" in shown, shown[-500:]
    assert (tmp_path / "out" / "f.bin").read_bytes() == (root / "f.bin").read_bytes()
