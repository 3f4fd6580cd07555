"""containerd's snapshots gRPC API, compiled from the protos Debian ships.

`load()` compiles `api/services/snapshots/v1/snapshots.proto` and `api/types/mount.proto` of
`golang-github-containerd-containerd-dev` with grpcio-tools into a cache folder (once per
proto content) and imports them. The gogoproto options in those files only steer Go code
generation, so they are dropped first: the messages, their field numbers and the service path
(`/containerd.services.snapshots.v1.Snapshots/...`) stay exactly as containerd sends them.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
import threading
from types import SimpleNamespace

from warmstart.errors import ConfigError

PROTO_ROOT = "/usr/share/gocode/src/github.com/containerd/containerd/api"
_FILES = {"mount.proto": "types/mount.proto",
          "snapshots.proto": "services/snapshots/v1/snapshots.proto"}
_PACKAGE = "warmstart_containerd_api"
_lock = threading.Lock()
_loaded: SimpleNamespace | None = None


def _strip_gogo(text: str) -> str:
    text = re.sub(r'^\s*import\s+(weak\s+)?"gogoproto/gogo.proto";\s*$', "", text, flags=re.M)
    text = re.sub(r"^\s*option\s+\(gogoproto\.[^;]*;\s*$", "", text, flags=re.M)
    text = re.sub(r"\s*\[\s*\(gogoproto\.[^\]]*\]", "", text)
    return text.replace('"github.com/containerd/containerd/api/types/mount.proto"',
                        f'"{_PACKAGE}/mount.proto"')


def load(cache_dir: str, proto_root: str = PROTO_ROOT) -> SimpleNamespace:
    """Returns a namespace with `snapshots_pb2`, `snapshots_pb2_grpc` and `mount_pb2`."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        texts = {}
        for name, rel in _FILES.items():
            try:
                with open(os.path.join(proto_root, rel)) as f:
                    texts[name] = _strip_gogo(f.read())
            except FileNotFoundError:
                raise ConfigError(f"{proto_root}/{rel} is missing: install Debian's "
                                  "golang-github-containerd-containerd-dev") from None
        key = hashlib.sha256("".join(texts[n] for n in sorted(texts)).encode()).hexdigest()
        out = os.path.join(cache_dir, f"containerd-api-{key[:16]}")
        pkg = os.path.join(out, _PACKAGE)
        if not os.path.isfile(os.path.join(pkg, "snapshots_pb2_grpc.py")):
            _compile(texts, out, pkg)
        if out not in sys.path:
            sys.path.insert(0, out)
        mods = {m: importlib.import_module(f"{_PACKAGE}.{m}")
                for m in ("mount_pb2", "snapshots_pb2", "snapshots_pb2_grpc")}
        _loaded = SimpleNamespace(**mods)
        return _loaded


def _compile(texts: dict[str, str], out: str, pkg: str) -> None:
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        raise ConfigError("the containerd snapshotter needs grpcio-tools "
                          "(pip install grpcio-tools)") from None
    tmp = f"{out}.tmp-{os.getpid()}"
    src = os.path.join(tmp, "src", _PACKAGE)
    os.makedirs(src, exist_ok=True)
    os.makedirs(os.path.join(tmp, "out"), exist_ok=True)
    for name, text in texts.items():
        with open(os.path.join(src, name), "w") as f:
            f.write(text)
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{os.path.join(tmp, 'src')}", f"-I{include}",
                      f"--python_out={os.path.join(tmp, 'out')}",
                      f"--grpc_python_out={os.path.join(tmp, 'out')}",
                      *(os.path.join(src, n) for n in sorted(texts))])
    if rc != 0:
        raise ConfigError(f"protoc could not compile containerd's protos (exit {rc})")
    os.makedirs(out, exist_ok=True)
    generated = os.path.join(tmp, "out", _PACKAGE)
    open(os.path.join(generated, "__init__.py"), "w").close()
    import shutil
    if os.path.isdir(pkg):
        shutil.rmtree(pkg)
    os.replace(generated, pkg)
    shutil.rmtree(tmp, ignore_errors=True)
