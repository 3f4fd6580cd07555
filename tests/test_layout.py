"""No test folder or module shadows a package.

pytest imports test files in "prepend" mode: each folder that holds a test module or a
conftest.py (none has an `__init__.py`) goes on `sys.path`, so every folder and module beside
it becomes importable under its own name. A folder `tests/vllm/` then answers `import vllm`
as a namespace package whenever vLLM is not installed, and `pytest.importorskip("vllm")`
imports the test folder instead of skipping. So no such name may equal a top-level module of
an installed distribution, of an optional dependency (installed here or not), or of the
standard library.
"""

from __future__ import annotations

import pkgutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_ROOTS = [ROOT / "tests", ROOT / "benchmarks" / "micro"]

# Top-level modules of warmstart's dependencies and optional dependencies (setup.py's extras,
# .ci/run's vLLM and Ray, what those import), listed because a machine without them has no
# distribution metadata to find them by.
KNOWN = {
    "warmstart", "torch", "numpy", "aiobotocore", "botocore", "boto3", "tqdm", "pytest",
    "_pytest", "hypothesis", "safetensors", "localbucket", "nanio", "moto", "zstandard", "trio",
    "jsonschema", "pyfuse3", "matplotlib", "pytest_benchmark", "runai_model_streamer",
    "runai_model_streamer_s3", "fastsafetensors", "vllm", "transformers", "tokenizers",
    "ray", "pyarrow", "pandas", "jsonref", "grpc", "grpc_tools", "atheris", "triton",
    "fastapi", "starlette", "uvicorn", "aiohttp", "requests", "yaml", "regex",
}
PYTEST_OWN = {"conftest"}


def importable_names() -> dict[str, Path]:
    """{name: path} of every folder and module that sits beside a test module or conftest,
    i.e. in a folder pytest may put on sys.path."""
    names: dict[str, Path] = {}
    for root in TEST_ROOTS:
        for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            if "__pycache__" in folder.parts or not any(folder.glob("*.py")):
                continue
            for child in folder.iterdir():
                if child.name.startswith((".", "__")):
                    continue
                if child.is_dir():
                    names.setdefault(child.name, child)
                elif child.suffix == ".py" and child.stem not in PYTEST_OWN:
                    names.setdefault(child.stem, child)
    return names


def taken_names() -> set[str]:
    """Modules importable from sys.path outside this repository (its own folders, and those
    pytest inserted, aside), the known optional ones, and the standard library's."""
    outside = [p for p in sys.path if p and not Path(p).resolve().is_relative_to(ROOT)]
    installed = {m.name for m in pkgutil.iter_modules(outside)}
    return KNOWN | installed | set(sys.stdlib_module_names)


def test_no_test_folder_or_module_shadows_a_package():
    names = importable_names()
    assert "loader" in names and "test_layout" in names, "the scan found nothing: fix the test"
    clashes = {name: str(path.relative_to(ROOT)) for name, path in names.items()
               if name in taken_names()}
    assert not clashes, (f"these test folders/modules shadow an importable package of the same "
                         f"name; rename them: {clashes}")


def test_the_check_catches_a_shadowing_folder(tmp_path, monkeypatch):
    """The scan sees a folder named after a package: the check above can fail."""
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "conftest.py").write_text("")
    (tmp_path / "suite" / "vllm").mkdir()
    (tmp_path / "suite" / "vllm" / "test_x.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "TEST_ROOTS", [tmp_path / "suite"])
    assert set(importable_names()) & taken_names() == {"vllm"}
