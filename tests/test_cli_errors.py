"""Command-line entry points answer bad arguments and missing optional packages in one line
naming the fix, never with a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Hides the named top-level modules from the import system, as if not installed.
HIDE = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {names!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Hide())
"""


def run(code: str, *argv: str, hide: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    prelude = HIDE.format(names=set(hide)) if hide else ""
    return subprocess.run([sys.executable, "-c", prelude + code, *argv], capture_output=True,
                          text=True, timeout=120)


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


MAIN = "import sys; from warmstart.cli import main; sys.exit(main(sys.argv[1:]))"


def test_bench_without_bench_extra_names_the_extra():
    proc = run(MAIN, "bench", "--quick", hide=("localbucket",))
    assert proc.returncode == 2
    line = one_line(proc)
    assert "localbucket" in line and ".[bench]" in line


def test_missing_module_inside_a_command_is_one_line():
    code = ("import sys\nfrom warmstart.extras import run_command\n"
            "def main():\n    import pyfuse3\n"
            "sys.exit(run_command('warmstart image mount', main))")
    proc = run(code, hide=("pyfuse3",))
    assert proc.returncode == 2
    assert ".[image]" in one_line(proc)


@pytest.mark.parametrize("argv, words", [
    (("load", "/nonexistent/model.safetensors"), "nonexistent"),
    (("load", "/tmp", "-o", "bogus=1"), "bogus"),
    (("load", "/tmp", "-o", "memory_budget=lots"), "memory_budget"),
    (("sums", "--block-size", "3000", "/tmp"), "block-size"),
])
def test_bad_arguments_are_one_line(argv, words):
    proc = run(MAIN, *argv)
    assert proc.returncode in (1, 2)
    assert words in one_line(proc)


def test_unknown_command():
    proc = run(MAIN, "frobnicate")
    assert proc.returncode == 2 and "unknown command" in proc.stderr
    assert "Traceback" not in proc.stderr
