"""Facts about the machine a benchmark ran on, recorded in results.json."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata

PACKAGES = ("warmstart", "torch", "safetensors", "runai-model-streamer",
            "runai-model-streamer-s3", "fastsafetensors", "aiobotocore", "localbucket", "numpy")


def _first(path: str, prefix: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _run(*cmd: str) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def memory_bytes() -> int:
    value = _first("/proc/meminfo", "MemTotal")
    return int(value.split()[0]) * 1024 if value else 0


def available_bytes() -> int:
    value = _first("/proc/meminfo", "MemAvailable")
    return int(value.split()[0]) * 1024 if value else 0


def disk(path: str) -> dict:
    """The filesystem holding `path`: device, type, size, free space, rotational or not."""
    path = os.path.realpath(path)
    best = ("", "", "")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mount, fstype = line.split()[:3]
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and \
                        len(mount) >= len(best[1]):
                    best = (dev, mount, fstype)
    except OSError:
        pass
    stat = os.statvfs(path)
    name = os.path.basename(best[0])
    rotational = _first_line(f"/sys/class/block/{name}/queue/rotational")
    model = _first_line(f"/sys/class/block/{name}/device/model")
    return {"path": path, "device": best[0], "mount": best[1], "fstype": best[2],
            "size_bytes": stat.f_blocks * stat.f_frsize,
            "free_bytes": stat.f_bavail * stat.f_frsize,
            "rotational": None if rotational is None else rotational == "1",
            "model": model}


def _first_line(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return None


def gpu() -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    smi = _run("nvidia-smi", "--query-gpu=name,driver_version,memory.total",
               "--format=csv,noheader")
    return {"name": torch.cuda.get_device_name(), "count": torch.cuda.device_count(),
            "memory_bytes": torch.cuda.get_device_properties(0).total_memory,
            "cuda_runtime": torch.version.cuda,
            "driver": smi.splitlines()[0].split(",")[1].strip() if smi else None}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = sys.version.split()[0]
    out["fio"] = _run("fio", "--version")
    return out


def facts(data_path: str) -> dict:
    return {
        "cpu_model": _first("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": memory_bytes(),
        "memory_available_bytes": available_bytes(),
        "kernel": platform.release(),
        "disk": disk(data_path),
        "transparent_hugepages": _first_line("/sys/kernel/mm/transparent_hugepage/enabled"),
        "gpu": gpu(),
        "versions": versions(),
    }
