"""Docs match the code: every loader option is documented, and README's example runs."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from warmstart.loader import LoaderConfig

ROOT = Path(__file__).resolve().parents[1]


def test_every_option_in_config_doc():
    doc = (ROOT / "docs" / "CONFIG.md").read_text()
    for field in dataclasses.fields(LoaderConfig):
        assert f"| `{field.name}` | `WARMSTART_{field.name.upper()}` |" in doc, field.name


def test_readme_python_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- tested -->\n```python\n(.*?)```", readme, re.S)
    assert blocks, "README has no tested Python example"
    from warmstart.testing.checkpoints import make_checkpoint

    make_checkpoint(tmp_path / "my-model", 8 << 20, shards=2)
    for code in blocks:
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
